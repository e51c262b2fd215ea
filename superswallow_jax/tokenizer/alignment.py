"""Embedding rows aligned to the output vocabulary.

Embedding alignment (:func:`align_embeddings`, :class:`EmbeddingAlignment`)
    ``p_M[o]`` = id of output token ``o`` in model ``M`` if present and below
    ``M``'s config vocab size, else ``-1``. Rows of a model whose ``p >= 0``
    (and not forced) are copied; other rows get the token's default vector:
    one owner -> its row; none -> zeros; ``>= 2`` and the base has it -> the
    base's row; otherwise the unweighted mean. ``tokenizer.tokens`` overrides
    (model row, ``model_token`` row of the *original* matrix, zeros) replace
    the default, and ``force`` applies them to every model. Padding rows are
    the mean of the model's first ``len(tokens)`` aligned rows.

    Arithmetic is torch-on-CPU bit-exact (checked against mergekit 0.1.5 with
    torch 2.13 on x86-64): the per-token mean starts from a zero row, adds the
    rows in model order in the working dtype (f32 compute, one rounding per
    add for bf16/f16) and divides by the count (f32 true division, one
    rounding). The padding mean is torch's ``mean(dim=0)``: f32 cascade sum
    (emulated by :class:`_TorchDim0Sum`), f32 division by ``len(tokens)``, one
    rounding. The cascade's column blocking depends on torch's intra-op
    thread count only when ``hidden % 32 != 0``; ``torch_threads`` selects it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, MutableMapping, Sequence

import numpy as np

from ..dtypes import NP, WORK_CODES
from ..errors import TokenizerError
from .load import ModelTokenizer
from .output import OutputTokenizer
from .overrides import TokenOverride
from ..host.torch_sum import TorchDim0Sum

__all__ = ["EmbeddingAlignment", "align_embeddings"]

_F32 = np.dtype(np.float32)
_WORK_DTYPES = tuple(NP[c] for c in WORK_CODES)
_K_NONE, _K_ROW, _K_ZERO, _K_MEAN = 0, 1, 2, 3
_PAD_BLOCK_ROWS = 1024


def _ro(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _work_dtype(dtype: Any) -> np.dtype:
    d = np.dtype(dtype)
    if d not in _WORK_DTYPES:
        raise ValueError(f"embedding work dtype must be bfloat16, float16 or float32, got {d}")
    return d


def _add(a: np.ndarray, b: np.ndarray, d: np.dtype) -> np.ndarray:
    """``a + b`` as torch does it in dtype ``d`` (f32 compute, one rounding)."""
    if d == _F32:
        return a + b
    return (a.astype(_F32) + b.astype(_F32)).astype(d)


def _div(a: np.ndarray, n: int, d: np.dtype) -> np.ndarray:
    """``a / n`` (torch true division by a Python int: f32, one rounding)."""
    return (a.astype(_F32) / np.float32(n)).astype(d)


@dataclass(frozen=True, eq=False)
class EmbeddingAlignment:
    """Row mapping from the models' embedding matrices to the output vocabulary.

    ``rows`` = ``padded_vocab_size``; ``num_tokens`` = ``len(tokens)``;
    ``model_keys[m]`` names model ``m`` (the order given to
    :func:`align_embeddings`, which is also the order in which default means
    are accumulated). Immutable: the padding means a caller wants to keep
    go into a mapping it passes (``pad_cache``), keyed by ``(m, dtype,
    tensor)`` and checked against two probe rows.
    """

    rows: int
    num_tokens: int
    model_keys: tuple[str, ...]
    base_index: int | None
    torch_threads: int
    _perm: tuple[np.ndarray, ...] = field(repr=False)
    _forced: np.ndarray = field(repr=False)
    _kind: np.ndarray = field(repr=False)
    _src_model: np.ndarray = field(repr=False)
    _src_row: np.ndarray = field(repr=False)

    def permutation(self, m: int) -> np.ndarray:
        """int64 ``[num_tokens]`` (read-only): row of output token ``o`` in model
        ``m``'s original matrix, or ``-1`` when the model lacks it."""
        return self._perm[m]

    def default_kind(self, o: int) -> str:
        """How token ``o``'s default vector is made: ``"none"`` (not needed),
        ``"row"``, ``"zero"`` or ``"mean"``."""
        return ("none", "row", "zero", "mean")[int(self._kind[o])]

    def forced(self, o: int) -> bool:
        """Whether every model uses token ``o``'s configured vector."""
        return bool(self._forced[o])

    # -- row reading

    @staticmethod
    def _read(read_rows: Callable[[int, np.ndarray], np.ndarray], m: int, ids: np.ndarray, d: np.dtype,
              hidden: int | None) -> np.ndarray:
        x = np.asarray(read_rows(m, np.ascontiguousarray(ids, dtype=np.int64)))
        if x.ndim != 2 or x.shape[0] != len(ids) or (hidden is not None and x.shape[1] != hidden):
            raise ValueError(f"read_rows({m}, ...) returned shape {x.shape} for {len(ids)} rows")
        return x.astype(d, copy=False)

    def aligned_rows(
        self,
        m: int,
        r0: int,
        r1: int,
        read_rows: Callable[[int, np.ndarray], np.ndarray],
        dtype: Any,
        *,
        tensor: Hashable = None,
        pad_cache: MutableMapping | None = None,
    ) -> np.ndarray:
        """Model ``m``'s aligned embedding rows ``[r0, r1)``.

        Returns a new array ``[r1 - r0, hidden]`` of ``dtype`` (``ml_dtypes.bfloat16``,
        ``np.float16`` or ``np.float32``; the working dtype of the merge).
        ``read_rows(j, ids)`` must return rows ``ids`` (int64 ``[k]``, ``k`` may
        be 0) of model ``j``'s ORIGINAL matrix of this tensor as ``[k, hidden]``
        in any float dtype; it is called for other models too (default vectors).
        Rows ``>= num_tokens`` are padding: the first request computes the
        model's padding mean with one full pass over its ``num_tokens`` aligned
        rows (the one non-streaming step), cached per ``(m, dtype, tensor)``.
        """
        d = _work_dtype(dtype)
        if not (0 <= m < len(self._perm)):
            raise IndexError(f"model index {m} out of range")
        if not (0 <= r0 <= r1 <= self.rows):
            raise IndexError(f"rows [{r0}, {r1}) out of range [0, {self.rows})")
        T = self.num_tokens
        a, b = min(r0, T), min(r1, T)
        hidden: int | None = None
        parts: list[tuple[np.ndarray, np.ndarray]] = []  # (positions in block, rows)

        p = self._perm[m][a:b]
        use = (p >= 0) & ~self._forced[a:b]
        pos = np.nonzero(use)[0]
        if len(pos):
            x = self._read(read_rows, m, p[pos], d, hidden)
            hidden = x.shape[1]
            parts.append((pos, x))
        need = np.nonzero(~use)[0]
        kinds = self._kind[a:b][need]
        # model-row defaults, one read per source model
        rowpos = need[kinds == _K_ROW]
        if len(rowpos):
            src_m = self._src_model[a:b][rowpos]
            src_r = self._src_row[a:b][rowpos]
            for j in np.unique(src_m):
                sel = src_m == j
                x = self._read(read_rows, int(j), src_r[sel], d, hidden)
                hidden = x.shape[1]
                parts.append((rowpos[sel], x))
        # means: accumulate in model order from a zero row, then divide
        meanpos = need[kinds == _K_MEAN]
        mean_rows = None
        if len(meanpos):
            toks = meanpos + a
            acc = None
            count = np.zeros(len(toks), np.int64)
            for j in range(len(self._perm)):
                pj = self._perm[j][toks]
                sel = np.nonzero(pj >= 0)[0]
                if not len(sel):
                    continue
                x = self._read(read_rows, j, pj[sel], d, hidden)
                hidden = x.shape[1]
                if acc is None:
                    acc = np.zeros((len(toks), hidden), d)
                acc[sel] = _add(acc[sel], x, d)
                count[sel] += 1
            assert acc is not None and (count >= 2).all()
            mean_rows = np.empty_like(acc)
            for c in np.unique(count):
                sel = count == c
                mean_rows[sel] = _div(acc[sel], int(c), d)
            parts.append((meanpos, mean_rows))
        if hidden is None:
            hidden = self._read(read_rows, m, np.zeros(0, np.int64), d, None).shape[1]
        out = np.zeros((r1 - r0, hidden), d)  # zero defaults stay zero
        for where, x in parts:
            out[where] = x
        if r1 > T:
            out[max(r0, T) - r0:] = self.padding_row(m, read_rows, d, tensor=tensor, cache=pad_cache)
        return out

    def padding_row(
        self, m: int, read_rows: Callable[[int, np.ndarray], np.ndarray], dtype: Any, *, tensor: Hashable = None,
        cache: MutableMapping | None = None,
    ) -> np.ndarray:
        """``[hidden]`` of ``dtype`` (read-only): torch ``mean(dim=0)`` of model
        ``m``'s first ``num_tokens`` aligned rows. Streams the rows in blocks
        (a full pass over the model's matrix). Kept in ``cache`` (when given)
        per ``(m, dtype, tensor)``; a hit is only used if two probe rows read
        through ``read_rows`` still match, so a cache shared by several tensors
        stays correct."""
        d = _work_dtype(dtype)
        key = (m, d.name, tensor)
        present = np.nonzero(self._perm[m] >= 0)[0]
        probe = self._perm[m][present[[0, -1]]] if len(present) else np.zeros(0, np.int64)
        fp = np.ascontiguousarray(np.asarray(read_rows(m, probe))).tobytes()
        hit = cache.get(key) if cache is not None else None
        if hit is not None and hit[0] == fp:
            return hit[1]
        T = self.num_tokens
        if T == 0:
            raise TokenizerError("output vocabulary is empty; cannot compute padding rows")
        acc: TorchDim0Sum | None = None
        for s in range(0, T, _PAD_BLOCK_ROWS):
            blk = self.aligned_rows(m, s, min(T, s + _PAD_BLOCK_ROWS), read_rows, d)
            if acc is None:
                acc = TorchDim0Sum(T, blk.shape[1], self.torch_threads)
            acc.feed(blk)
        assert acc is not None
        row = _ro((acc.result() / np.float32(T)).astype(d))
        if cache is not None:
            cache[key] = (fp, row)
        return row


def _permutations(out: OutputTokenizer, models: Sequence[ModelTokenizer]) -> list[np.ndarray]:
    """Per model: int64 [T], the model's id of each output token, -1 when absent or beyond its rows."""
    perms = []
    for mt in models:
        limit = mt.config_vocab_size if mt.config_vocab_size is not None else len(mt.vocab)
        get = mt.vocab.get
        p = np.fromiter((get(t, -1) for t in out.tokens), dtype=np.int64, count=len(out.tokens))
        p[p >= limit] = -1
        perms.append(_ro(p))
    return perms


@dataclass
class _Defaults:
    """How each output token's default vector is made (mutable while overrides are applied)."""

    kind: np.ndarray  # int8 [T]: _K_NONE, _K_ROW, _K_ZERO, _K_MEAN
    src_m: np.ndarray  # int64 [T]: the model of a _K_ROW default
    src_r: np.ndarray  # int64 [T]: its row
    missing: np.ndarray  # bool [T]: some model lacks the token
    forced: np.ndarray  # bool [T]


def _defaults(perms: Sequence[np.ndarray], T: int, base_index: int | None) -> _Defaults:
    """One owner: its row; none: zeros; several and the base has it: the base's row; else the mean."""
    present = np.stack(perms) >= 0 if perms else np.zeros((0, T), bool)
    n_present = present.sum(axis=0) if perms else np.zeros(T, np.int64)
    d = _Defaults(np.full(T, _K_NONE, np.int8), np.full(T, -1, np.int64), np.full(T, -1, np.int64),
                  n_present < len(perms), np.zeros(T, bool))
    one = d.missing & (n_present == 1)
    d.kind[one] = _K_ROW
    d.src_m[one] = np.argmax(present[:, one], axis=0) if one.any() else d.src_m[one]
    d.src_r[one] = [perms[j][o] for j, o in zip(d.src_m[one], np.nonzero(one)[0])]
    d.kind[d.missing & (n_present == 0)] = _K_ZERO
    many = d.missing & (n_present >= 2)
    if base_index is not None:
        from_base = many & present[base_index]
        d.kind[from_base] = _K_ROW
        d.src_m[from_base] = base_index
        d.src_r[from_base] = perms[base_index][from_base]
        many &= ~from_base
    d.kind[many] = _K_MEAN
    return d


def _override_row(tok: str, ov: TokenOverride, j: int, mt: ModelTokenizer, perm: np.ndarray, o: int,
                  is_base: bool) -> int:
    """The row of model ``mt`` (position ``j``) that token ``tok``'s configured vector comes from."""
    if ov.kind == "model":
        row = int(perm[o])
        if row < 0:
            raise TokenizerError(f"tokenizer.tokens.{tok}: token {tok!r} not found in model {ov.model!r}")
        return row
    if ov.kind != "model_token":
        raise TokenizerError(f"tokenizer.tokens.{tok}: unknown source kind {ov.kind!r}")
    if ov.token_id is not None:
        row = int(ov.token_id)
    else:
        row = mt.vocab.get(ov.token, -1)  # type: ignore[arg-type]
        if is_base and mt.config_vocab_size is not None and row >= mt.config_vocab_size:
            row = -1  # the base's vocabulary is the stripped one
        if row < 0:
            raise TokenizerError(f"tokenizer.tokens.{tok}: token {ov.token!r} not found in model {ov.model!r}")
    if row < 0 or (mt.config_vocab_size is not None and row >= mt.config_vocab_size):
        raise TokenizerError(f"tokenizer.tokens.{tok}: token id {row} out of range for model {ov.model!r}")
    return row


def _apply_overrides(d: _Defaults, out: OutputTokenizer, models: Sequence[ModelTokenizer], model_keys: Sequence[str],
                     perms: Sequence[np.ndarray], base_index: int | None, overrides: Mapping[str, TokenOverride]) -> None:
    index = {k: i for i, k in enumerate(model_keys)}
    vocab_ids = out.vocab
    for tok, ov in overrides.items():
        o = vocab_ids.get(tok)
        if o is None:
            raise TokenizerError(f"tokenizer.tokens: {tok!r} is not in the output vocabulary")
        d.forced[o] = ov.force
        if not (ov.force or d.missing[o]):
            d.kind[o] = _K_NONE
            continue
        if ov.kind == "zero":
            d.kind[o], d.src_m[o], d.src_r[o] = _K_ZERO, -1, -1
            continue
        j = index.get(ov.model)  # type: ignore[arg-type]
        if j is None:
            raise TokenizerError(
                f"tokenizer.tokens.{tok}: needs a row from model {ov.model!r}, which is not among this tensor's models"
            )
        row = _override_row(tok, ov, j, models[j], perms[j], o, j == base_index)
        d.kind[o], d.src_m[o], d.src_r[o] = _K_ROW, j, row


def align_embeddings(
    out: OutputTokenizer,
    models: Sequence[ModelTokenizer],
    model_keys: Sequence[str],
    base_index: int | None,
    overrides: Mapping[str, TokenOverride],
    *,
    torch_threads: int = 1,
) -> EmbeddingAlignment:
    """Permutations and default-vector plan for the models of one embedding tensor.

    ``models[i]`` / ``model_keys[i]``: the models that have this tensor, in
    mergekit's tensor order (slice-source order); default means accumulate in
    this order. ``base_index``: position of the base model in ``models`` or
    ``None``. ``overrides``: ``tokenizer.tokens``. ``torch_threads``: torch's
    intra-op thread count of the reference run (only matters for padding when
    ``hidden % 32 != 0``). Raises TokenizerError when a needed override cannot
    be resolved (unknown model, token missing from that model, id out of range).
    Cost: one dict lookup per (token, model); no weights are read.
    """
    if len(models) != len(model_keys):
        raise ValueError("models and model_keys must have the same length")
    if base_index is not None and not (0 <= base_index < len(models)):
        raise ValueError(f"base_index {base_index} out of range")
    perms = _permutations(out, models)
    d = _defaults(perms, len(out.tokens), base_index)
    _apply_overrides(d, out, models, model_keys, perms, base_index, overrides)
    return EmbeddingAlignment(
        rows=out.padded_vocab_size,
        num_tokens=len(out.tokens),
        model_keys=tuple(model_keys),
        base_index=base_index,
        torch_threads=int(torch_threads),
        _perm=tuple(perms),
        _forced=_ro(d.forced),
        _kind=_ro(d.kind),
        _src_model=_ro(d.src_m),
        _src_row=_ro(d.src_r),
    )
