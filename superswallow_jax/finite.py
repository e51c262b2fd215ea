"""Counts of NaN and ±Inf values in what a merge reads and writes.

A NaN in an input weight silently spreads (a ``linear`` merge) or silently
disappears (TIES takes the base's value where the sign election drops it);
neither is visible in the output's bytes. The merge counts non-finite values
in every input chunk it feeds to a method and in every output chunk, and
says so at the end (and in ``merge_manifest.json``, under ``nonfinite``).

Counting is by bit pattern: an IEEE value is NaN or ±Inf exactly when its
exponent bits are all ones (bfloat16 ``0x7F80``, float16 ``0x7C00``,
float32 ``0x7F800000``, float64 ``0x7FF0...``). Integer tensors count 0.
"""

from __future__ import annotations

import threading
from typing import Mapping

import numpy as np

#: Elements examined per step (bounds the temporary masks: 3 bytes per element).
BLOCK = 1 << 20

_EXPONENT = {2: np.uint16(0x7C00), 4: np.uint32(0x7F800000), 8: np.uint64(0x7FF0000000000000)}
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _exponent_mask(dtype: np.dtype) -> object | None:
    """The all-ones exponent pattern of a floating dtype (None: not floating, nothing to count)."""
    if dtype.name == "bfloat16":
        return np.uint16(0x7F80)
    if dtype.kind == "f" and dtype.itemsize in _EXPONENT:
        return _EXPONENT[dtype.itemsize]
    return None


def count_nonfinite(x: np.ndarray) -> int:
    """Number of NaN and ±Inf elements of ``x`` (any shape; bfloat16, float16/32/64; others: 0)."""
    mask = _exponent_mask(x.dtype)
    if mask is None or x.size == 0:
        return 0
    bits = np.ascontiguousarray(x).reshape(-1).view(_UINT[x.dtype.itemsize])
    n = 0
    for a in range(0, bits.size, BLOCK):
        exponents = bits[a : a + BLOCK] & mask
        if exponents.max() == mask:  # a quick reduction first: weights are almost always all finite
            n += int(np.count_nonzero(exponents == mask))
    return n


class NonFiniteTally:
    """Non-finite counts of one merge, filled from the reader and writer threads.

    Inputs are counted per chunk and kept by output tensor (step), then
    (model, input tensor, chunk start), so a chunk read twice (a statistics
    pass, then the merge) counts once; an input tensor read for two outputs
    reports the larger count. Outputs are counted per written chunk. A
    finished step's counts (:meth:`of_step`) go into the resume journal, and
    a resumed run puts them back (:meth:`restore`).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._inputs: dict[str, dict[tuple[str, str, int], int]] = {}
        self._outputs: dict[str, int] = {}

    def input(self, model: str, tensor: str, step: str, a: int, n: int) -> None:
        """Chunk at ``a`` of ``tensor`` of ``model``, read for output ``step``, holds ``n`` non-finite values."""
        with self._lock:
            self._inputs.setdefault(step, {})[(model, tensor, a)] = n

    def output(self, tensor: str, n: int) -> None:
        """A written chunk of output ``tensor`` holds ``n`` more non-finite values."""
        if n:
            with self._lock:
                self._outputs[tensor] = self._outputs.get(tensor, 0) + n

    def of_step(self, step: str) -> dict:
        """Output tensor ``step``'s counts, ``{"inputs": {model: {tensor: n}}, "output": n}``, zeros left out."""
        inputs: dict[str, dict[str, int]] = {}
        with self._lock:
            for (m, t, _a), n in self._inputs.get(step, {}).items():
                if n:
                    inputs.setdefault(m, {})[t] = inputs.get(m, {}).get(t, 0) + n
            out = self._outputs.get(step, 0)
        return {**({"inputs": inputs} if inputs else {}), **({"output": out} if out else {})}

    def restore(self, step: str, counts: Mapping) -> None:
        """Put back the :meth:`of_step` record of a step a resumed run kept."""
        with self._lock:
            self._inputs[step] = {(m, t, -1): int(n) for m, ts in (counts.get("inputs") or {}).items()
                                  for t, n in ts.items()}
            if counts.get("output"):
                self._outputs[step] = int(counts["output"])

    def record(self) -> dict:
        """``{"inputs": {model: {tensor: n}}, "outputs": {tensor: n}}``, non-zero counts only, sorted."""
        with self._lock:
            steps = list(self._inputs)
            outputs = dict(self._outputs)
        return combine([{"inputs": self.of_step(s).get("inputs", {})} for s in steps] + [{"outputs": outputs}])


def combine(records: list[Mapping]) -> dict:
    """One record from several (processes', or steps') records: an input tensor's largest count,
    the sum of each output tensor's."""
    inputs: dict[str, dict[str, int]] = {}
    outputs: dict[str, int] = {}
    for r in records:
        for m, ts in r.get("inputs", {}).items():
            for t, n in ts.items():
                inputs.setdefault(m, {})[t] = max(n, inputs.get(m, {}).get(t, 0))
        for t, n in r.get("outputs", {}).items():
            outputs[t] = outputs.get(t, 0) + n
    return {"inputs": {m: dict(sorted(ts.items())) for m, ts in sorted(inputs.items())},
            "outputs": dict(sorted(outputs.items()))}


def warnings(record: Mapping, limit: int = 8) -> list[str]:
    """Lines for the user: each model's and the output's non-finite values, at most ``limit`` tensors each."""
    lines = []
    for m, ts in record.get("inputs", {}).items():
        lines.append(f"warning: model {m}: {sum(ts.values())} NaN/Inf values in {_tensors(len(ts))}: {_some(ts, limit)}")
    outs = record.get("outputs", {})
    if outs:
        lines.append(f"warning: the output has {sum(outs.values())} NaN/Inf values in {_tensors(len(outs))}: "
                     f"{_some(outs, limit)}")
    if lines:
        lines.append("warning: the counts are in merge_manifest.json under nonfinite")
    return lines


def _tensors(n: int) -> str:
    return f"{n} tensor" if n == 1 else f"{n} tensors"


def _some(counts: Mapping[str, int], limit: int) -> str:
    items = [f"{t} ({n})" for t, n in list(counts.items())[:limit]]
    more = len(counts) - limit
    return ", ".join(items) + (f" and {more} more" if more > 0 else "")
