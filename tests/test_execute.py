"""The executor's writer lanes (superswallow_jax.execute._Sink) and pipelined reads (stream.InputFetcher.read)."""

from __future__ import annotations

import random
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from superswallow_jax.execute import _Sink


class _Ctx:
    def __init__(self, name: str, released: list):
        self.step = SimpleNamespace(name=name)
        self.released = released

    def release(self, a: int, b: int) -> None:
        self.released.append((self.step.name, a))


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_lanes_keep_each_tensors_chunks_in_order_and_bound_what_is_in_flight(workers):
    got: dict[str, list[int]] = {}
    lock = threading.Lock()
    in_flight, most = [0], [0]
    rng = random.Random(workers)

    def sink(name, a, arr):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(rng.random() * 0.002)  # lanes finish in a scrambled order
        with lock:
            got.setdefault(name, []).append(a)
            in_flight[0] -= 1
        assert arr.shape == (3,)

    released: list = []
    s = _Sink(sink, workers)
    names = [f"t{i}" for i in range(12)]
    for start in range(0, 12, 3):  # tensors interleaved 3 at a time, 6 chunks each
        for a in range(6):
            for name in names[start:start + 3]:
                s.put((_Ctx(name, released), a * 3, a * 3 + 3, np.zeros(5, np.float32)))
    s.close()
    assert got == {n: [a * 3 for a in range(6)] for n in names}
    assert len(released) == 72
    assert most[0] <= workers
    if workers > 1:
        assert most[0] > 1  # the lanes really ran at once


def test_a_sink_error_reaches_the_main_thread_and_stops_the_rest():
    seen = []

    def sink(name, a, arr):
        seen.append((name, a))
        if (name, a) == ("b", 3):
            raise OSError("disk full")

    s = _Sink(sink, 3)
    with pytest.raises(OSError, match="disk full"):
        for a in range(0, 300, 3):
            for name in "abc":
                s.put((_Ctx(name, []), a, a + 3, np.zeros(3, np.float32)))
        s.close()
    assert len(seen) < 300  # drained, not written


def test_pipelined_reads_equal_plain_reads(tmp_path):
    """InputFetcher.read (parallel, one chunk ahead) gives the bytes padded() gives, chunk after chunk."""
    from superswallow_jax.config import parse_config
    from superswallow_jax.plan import build_plan
    from superswallow_jax.stream import InputFetcher
    from superswallow_jax.tiny import make_tiny_models

    models = make_tiny_models(tmp_path / "m", models=["swallow", "tulu"])
    cfg = parse_config(f"""models:
  - model: {models['swallow']}
    parameters: {{weight: 0.5}}
  - model: {models['tulu']}
    parameters: {{weight: 0.5}}
merge_method: linear
dtype: bfloat16
tokenizer_source: union
""")
    with build_plan(cfg) as plan:
        plain, piped = InputFetcher(plan, 1), InputFetcher(plan, 4)
        biggest = max((s for s in plan.steps if not s.embed), key=lambda s: s.numel)
        embed = next(s for s in plan.steps if s.embed)  # vocabulary-aligned rows, padding means
        for step in (biggest, embed):
            chunk, n = 1000, 1024
            for a in range(0, step.numel, chunk):
                b = min(step.numel, a + chunk)
                then = (b, min(step.numel, b + chunk)) if b < step.numel else None
                want = [np.array(plain.padded(step, i, a, b, n)) for i in range(len(step.sources))]
                have = piped.read(step, a, b, n, then)
                assert all(np.array_equal(w.view(np.uint8), h.view(np.uint8)) for w, h in zip(want, have))
            assert not piped.ahead  # the last chunk starts nothing
        piped.close()
        plain.close()


def test_read_ahead_hints_move_forward_and_are_never_repeated(tmp_path, monkeypatch):
    from superswallow_jax.config import parse_config
    from superswallow_jax.io.tensor_file import TensorFile
    from superswallow_jax.plan import build_plan
    from superswallow_jax.stream import InputFetcher
    from superswallow_jax.tiny import make_tiny_models

    calls = []
    monkeypatch.setattr(TensorFile, "prefetch", lambda self, info, lo, hi: calls.append((info.name, lo, hi)))
    models = make_tiny_models(tmp_path / "m", models=["tulu"])
    cfg = parse_config(f"models:\n  - model: {models['tulu']}\n    parameters: {{weight: 1}}\nmerge_method: linear\n")
    with build_plan(cfg) as plan:
        fetch = InputFetcher(plan)
        step = next(s for s in plan.steps if s.numel >= 4096 and not s.embed)
        fetch.prefetch(step, 0, 1000)
        fetch.prefetch(step, 500, 3000)  # only [1000, 3000) is new
        fetch.prefetch(step, 0, 2000)  # nothing new
        isz = step.sources[0].tensor.np_dtype.itemsize
        assert calls == [(step.sources[0].tensor.name, 0, 1000 * isz), (step.sources[0].tensor.name, 1000 * isz, 3000 * isz)]
        assert fetch.window(step) == (64 << 20) // isz
        fetch.close()
