#!/usr/bin/env python3
"""Bit-parity harness: superswallow vs. mergekit 0.1.5 (or any two merge tools).

For every config YAML given on the command line this script

  1. runs mergekit  (``<mergekit-bin> CONFIG OUT_A --random-seed SEED [extra]``),
  2. runs ours      (``<ours...> merge CONFIG OUT_B --seed SEED [extra]``),
  3. compares the two output folders:
       * every tensor: name set, shape, dtype, raw bytes.  For differing tensors it
         reports the number of differing elements and the max ulp distance;
       * config.json: vocab_size, number of layers, dtype (``dtype`` or ``torch_dtype``);
       * tokenizer vocabulary (tokenizer.json): ids of the base part must be equal,
         tokens appended after it are compared as *sets of strings* (mergekit's
         appended-id order changes from run to run).  Rows of vocabulary-axis tensors
         (embed_tokens / lm_head ...) are re-ordered by token string before comparing,
         so a different appended-id order is not reported as a tensor mismatch.

It prints one summary line per config::

    <config>: N tensors, M bit-exact, vocab OK, config OK

and exits non-zero if anything differs.

Only stdlib + numpy (+ ml_dtypes, optional, for pretty printing of values) are used.
Safetensors files are parsed directly (header JSON + raw bytes), so bfloat16 needs no
framework.  Neither mergekit nor torch is imported: both tools are run as subprocesses.

Examples::

    # ours vs mergekit
    .venv/bin/python scripts/mergekit_parity.py \
        --mergekit-bin /work/oracle/venv/bin/mergekit-yaml \
        --ours "superswallow" configs/*.yml

    # mergekit vs a second mergekit run (checks the harness / mergekit determinism)
    .venv/bin/python scripts/mergekit_parity.py \
        --mergekit-bin /work/oracle/venv/bin/mergekit-yaml --mergekit-vs-mergekit cfg.yml

    # compare two existing output folders (no merge is run)
    .venv/bin/python scripts/mergekit_parity.py --compare-dirs OUT_A OUT_B [--config cfg.yml]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

# --------------------------------------------------------------------------------------
# safetensors reading (no framework needed)
# --------------------------------------------------------------------------------------

# safetensors dtype -> (itemsize, unsigned view dtype, kind)
#   kind: "f" float (ulp comparison), "i" signed int, "u" unsigned int, "b" bool
_DTYPES = {
    "F64": (8, np.uint64, "f"),
    "F32": (4, np.uint32, "f"),
    "F16": (2, np.uint16, "f"),
    "BF16": (2, np.uint16, "f"),
    "F8_E4M3": (1, np.uint8, "f"),
    "F8_E5M2": (1, np.uint8, "f"),
    "I64": (8, np.int64, "i"),
    "I32": (4, np.int32, "i"),
    "I16": (2, np.int16, "i"),
    "I8": (1, np.int8, "i"),
    "U64": (8, np.uint64, "u"),
    "U32": (4, np.uint32, "u"),
    "U16": (2, np.uint16, "u"),
    "U8": (1, np.uint8, "u"),
    "BOOL": (1, np.uint8, "b"),
}

# exponent / mantissa bit widths, for NaN detection on raw bit patterns
_FLOAT_LAYOUT = {
    "F64": (11, 52),
    "F32": (8, 23),
    "F16": (5, 10),
    "BF16": (8, 7),
    "F8_E5M2": (5, 2),
}


@dataclass
class TensorRef:
    name: str
    dtype: str
    shape: Tuple[int, ...]
    path: str
    start: int  # absolute byte offset in file
    end: int

    def raw(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            return f.read(self.end - self.start)

    def array(self) -> np.ndarray:
        """Bit-pattern view (unsigned ints for floats) with the tensor's shape."""
        itemsize, view, _ = _DTYPES[self.dtype]
        buf = self.raw()
        arr = np.frombuffer(buf, dtype=view)
        return arr.reshape(self.shape) if self.shape else arr.reshape(())


def read_safetensors_header(path: str) -> Tuple[Dict[str, TensorRef], Dict[str, str]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out = {}
    for name, info in header.items():
        s, e = info["data_offsets"]
        out[name] = TensorRef(
            name=name,
            dtype=info["dtype"],
            shape=tuple(info["shape"]),
            path=path,
            start=base + s,
            end=base + e,
        )
    return out, meta


def load_model_tensors(folder: str) -> Tuple[Dict[str, TensorRef], Dict[str, dict]]:
    """All tensors of a safetensors model folder (sharded or not).

    Returns (tensors, per-file metadata)."""
    files = sorted(
        fn for fn in os.listdir(folder) if fn.endswith(".safetensors")
    )
    tensors: Dict[str, TensorRef] = {}
    metas = {}
    for fn in files:
        t, meta = read_safetensors_header(os.path.join(folder, fn))
        metas[fn] = meta
        for k, v in t.items():
            if k in tensors:
                raise RuntimeError(f"{folder}: tensor {k} present in several shards")
            tensors[k] = v
    return tensors, metas


# --------------------------------------------------------------------------------------
# element-wise comparison
# --------------------------------------------------------------------------------------


def _ordered_keys(bits: np.ndarray, width: int) -> np.ndarray:
    """Map IEEE bit patterns to integers whose difference is the ulp distance.

    +0 and -0 both map to 0."""
    u = bits.astype(np.uint64)
    sign = (u >> np.uint64(width - 1)) & np.uint64(1)
    mag = (u & np.uint64((1 << (width - 1)) - 1)).astype(np.int64)
    return np.where(sign == 1, -mag, mag)


def _is_nan(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F8_E4M3":  # e4m3fn: NaN is S.1111.111
        return (bits.astype(np.uint64) & np.uint64(0x7F)) == np.uint64(0x7F)
    e, m = _FLOAT_LAYOUT[dtype]
    u = bits.astype(np.uint64)
    exp = (u >> np.uint64(m)) & np.uint64((1 << e) - 1)
    man = u & np.uint64((1 << m) - 1)
    return (exp == np.uint64((1 << e) - 1)) & (man != np.uint64(0))


@dataclass
class ElemDiff:
    n_diff: int = 0  # elements whose bit pattern differs
    max_ulp: float = 0.0  # max ulp distance (floats) / abs difference (ints)
    n_nan_mismatch: int = 0  # one side NaN, the other not
    first_index: Optional[Tuple[int, ...]] = None


def compare_bits(a: np.ndarray, b: np.ndarray, dtype: str) -> ElemDiff:
    """a, b: bit-pattern arrays of identical shape and dtype."""
    res = ElemDiff()
    neq = a != b
    res.n_diff = int(np.count_nonzero(neq))
    if res.n_diff == 0:
        return res
    res.first_index = tuple(int(i) for i in np.argwhere(neq)[0])
    kind = _DTYPES[dtype][2]
    av, bv = a[neq], b[neq]
    if kind == "f":
        width = 8 * _DTYPES[dtype][0]
        na, nb = _is_nan(av, dtype), _is_nan(bv, dtype)
        res.n_nan_mismatch = int(np.count_nonzero(na != nb))
        both = ~(na | nb)
        if np.any(both):
            ka = _ordered_keys(av[both], width)
            kb = _ordered_keys(bv[both], width)
            res.max_ulp = float(np.max(np.abs(ka - kb)))
        if res.n_nan_mismatch:
            res.max_ulp = float("inf")
    else:
        res.max_ulp = float(
            np.max(np.abs(av.astype(np.float64) - bv.astype(np.float64)))
        )
    return res


def _decode_values(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Best-effort decode of a few bit patterns to float64 for messages."""
    try:
        if dtype == "BF16":
            return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        if dtype == "F16":
            return bits.view(np.float16).astype(np.float64)
        if dtype == "F32":
            return bits.view(np.float32).astype(np.float64)
        if dtype == "F64":
            return bits.view(np.float64)
        if _DTYPES[dtype][2] in "iub":
            return bits.astype(np.float64)
    except Exception:
        pass
    return np.full(bits.shape, np.nan)


# --------------------------------------------------------------------------------------
# tokenizer handling
# --------------------------------------------------------------------------------------


def read_tokenizer_json(folder: str) -> Optional[Tuple[Dict[int, str], Dict[str, dict]]]:
    """id -> token string (model vocab + added tokens) and added-token flags by content."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        return None
    with open(path, "r", encoding="utf-8") as f:
        tj = json.load(f)
    id2tok: Dict[int, str] = {}
    vocab = (tj.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        for tok, idx in vocab.items():
            id2tok[int(idx)] = tok
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        for idx, entry in enumerate(vocab):
            id2tok[idx] = entry[0] if isinstance(entry, (list, tuple)) else entry
    added = {}
    for entry in tj.get("added_tokens") or []:
        id2tok[int(entry["id"])] = entry["content"]
        added[entry["content"]] = {
            k: entry.get(k)
            for k in ("special", "normalized", "lstrip", "rstrip", "single_word")
        }
    return id2tok, added


def load_yaml(path: str):
    """Minimal YAML loading: PyYAML if importable, else None."""
    try:
        import yaml  # type: ignore
    except Exception:
        return None
    with open(path, "r", encoding="utf-8") as f:
        return yaml.safe_load(f)


def _scan_yaml_scalar(text: str, key: str) -> Optional[str]:
    """Fallback: top-level `key: value` scalar from YAML text."""
    m = re.search(rf"^{re.escape(key)}\s*:\s*(.+?)\s*$", text, re.MULTILINE)
    if not m:
        return None
    v = m.group(1)
    if v.startswith("#"):
        return None
    v = v.split(" #")[0].strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        v = v[1:-1]
    return v or None


@dataclass
class TokenizerPlan:
    """What the config says about the output vocabulary."""

    built: bool  # a tokenizer is built (tokenizer_source / tokenizer:)
    source: Optional[str]  # "union", "base", a model path, or None
    base_model: Optional[str]


def tokenizer_plan(config_path: Optional[str]) -> TokenizerPlan:
    if not config_path:
        return TokenizerPlan(False, None, None)
    cfg = load_yaml(config_path)
    if cfg is None:
        text = open(config_path, "r", encoding="utf-8").read()
        src = _scan_yaml_scalar(text, "tokenizer_source")
        base = _scan_yaml_scalar(text, "base_model")
        has_block = re.search(r"^tokenizer\s*:", text, re.MULTILINE) is not None
        if has_block and src is None:
            m = re.search(r"^tokenizer\s*:\s*\n((?:[ \t]+.*\n?)*)", text, re.MULTILINE)
            src = "union"
            if m:
                mm = re.search(r"^[ \t]+source\s*:\s*(\S+)", m.group(1), re.MULTILINE)
                if mm:
                    src = mm.group(1).strip("'\"")
        return TokenizerPlan(src is not None, src, base)

    def model_str(v):
        if v is None:
            return None
        if isinstance(v, dict):
            return v.get("model") if isinstance(v.get("model"), str) else None
        return str(v)

    base = model_str(cfg.get("base_model"))
    src = None
    if cfg.get("tokenizer_source") is not None:
        src = model_str(cfg.get("tokenizer_source"))
    elif cfg.get("tokenizer") is not None:
        src = model_str((cfg.get("tokenizer") or {}).get("source", "union")) or "union"
    return TokenizerPlan(src is not None, src, base)


def _local_model_path(ref: str) -> Optional[str]:
    # strip "@revision" and "+lora"
    path = ref.split("+")[0]
    if "@" in path and not os.path.exists(path):
        path = path.split("@")[0]
    return path if os.path.isdir(path) else None


def base_prefix_length(plan: TokenizerPlan, n_out: int) -> Tuple[int, str]:
    """Number of leading output ids that must be identical in both outputs."""
    if not plan.built:
        return n_out, "copied tokenizer: all ids"
    if plan.source not in ("union", "base"):
        return n_out, "tokenizer from a model: all ids"
    if plan.source == "base":
        return n_out, "base tokenizer: all ids"
    # union: the (stripped) base vocabulary keeps its ids; the rest is appended
    if plan.base_model:
        p = _local_model_path(plan.base_model)
        if p and os.path.exists(os.path.join(p, "config.json")):
            with open(os.path.join(p, "config.json")) as f:
                cfg = json.load(f)
            vsize = cfg.get("vocab_size")
            if vsize is None and isinstance(cfg.get("text_config"), dict):
                vsize = cfg["text_config"].get("vocab_size")
            tok = read_tokenizer_json(p)
            if tok is not None:
                ids = tok[0].keys()
                n = sum(1 for i in ids if vsize is None or i < vsize)
                return min(n, n_out), f"base vocab ({n} ids < vocab_size {vsize})"
    return -1, "unknown base (longest common prefix used)"


@dataclass
class VocabResult:
    ok: bool = True
    status: str = "n/a"
    details: List[str] = field(default_factory=list)
    # output row permutation for vocabulary tensors: row i of A <-> row perm[i] of B
    perm: Optional[np.ndarray] = None
    n_tokens: int = 0


def compare_vocab(dir_a: str, dir_b: str, plan: TokenizerPlan) -> VocabResult:
    ta, tb = read_tokenizer_json(dir_a), read_tokenizer_json(dir_b)
    res = VocabResult()
    if ta is None and tb is None:
        res.status = "vocab n/a"
        return res
    if ta is None or tb is None:
        res.ok = False
        res.status = "vocab MISSING " + ("A" if ta is None else "B")
        return res
    (a_id2tok, a_added), (b_id2tok, b_added) = ta, tb
    n_a, n_b = len(a_id2tok), len(b_id2tok)
    res.n_tokens = n_a
    problems = []
    if sorted(a_id2tok) != list(range(n_a)):
        problems.append("A ids are not contiguous")
    if sorted(b_id2tok) != list(range(n_b)):
        problems.append("B ids are not contiguous")
    if n_a != n_b:
        problems.append(f"size {n_a} vs {n_b}")

    prefix, why = base_prefix_length(plan, min(n_a, n_b))
    if prefix < 0:
        prefix = 0
        while (
            prefix < min(n_a, n_b)
            and a_id2tok.get(prefix) == b_id2tok.get(prefix)
        ):
            prefix += 1
        why = f"longest common prefix {prefix}"
    base_diff = [i for i in range(prefix) if a_id2tok.get(i) != b_id2tok.get(i)]
    if base_diff:
        i = base_diff[0]
        problems.append(
            f"{len(base_diff)} base ids differ (first id {i}: "
            f"{a_id2tok.get(i)!r} vs {b_id2tok.get(i)!r})"
        )
    tail_a = {a_id2tok[i] for i in a_id2tok if i >= prefix}
    tail_b = {b_id2tok[i] for i in b_id2tok if i >= prefix}
    if tail_a != tail_b:
        only_a, only_b = sorted(tail_a - tail_b), sorted(tail_b - tail_a)
        problems.append(
            f"appended token sets differ: {len(only_a)} only in A {only_a[:5]!r}, "
            f"{len(only_b)} only in B {only_b[:5]!r}"
        )
    all_a, all_b = set(a_id2tok.values()), set(b_id2tok.values())
    if len(all_a) != n_a or len(all_b) != n_b:
        problems.append("duplicate token strings in a vocabulary")
    # added-token flags (special / normalized / ...) by content
    flag_diff = [
        c for c in set(a_added) & set(b_added) if a_added[c] != b_added[c]
    ]
    if flag_diff:
        c = sorted(flag_diff)[0]
        problems.append(
            f"{len(flag_diff)} added tokens with different flags "
            f"(e.g. {c!r}: {a_added[c]} vs {b_added[c]})"
        )
    if set(a_added) != set(b_added):
        problems.append(
            f"added_tokens sets differ ({len(set(a_added) ^ set(b_added))} tokens)"
        )

    if not problems or (n_a == n_b and all_a == all_b):
        b_tok2id = {t: i for i, t in b_id2tok.items()}
        perm = np.arange(n_a, dtype=np.int64)
        for i in range(n_a):
            j = b_tok2id.get(a_id2tok.get(i))
            perm[i] = -1 if j is None else j
        if np.any(perm != np.arange(n_a)):
            res.perm = perm
    res.ok = not problems
    n_app = n_a - prefix
    res.status = (
        f"vocab OK ({n_a} tokens, {prefix} base, {n_app} appended)"
        if res.ok
        else "vocab MISMATCH"
    )
    res.details = [f"base prefix: {why}"] + problems
    return res


# --------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _cfg_get(cfg: dict, key: str):
    if key in cfg:
        return cfg[key]
    for sub in ("text_config", "llm_config", "language_config"):
        if isinstance(cfg.get(sub), dict) and key in cfg[sub]:
            return cfg[sub][key]
    return None


def compare_config(dir_a: str, dir_b: str) -> Tuple[bool, List[str], Dict[str, object]]:
    pa, pb = os.path.join(dir_a, "config.json"), os.path.join(dir_b, "config.json")
    if not (os.path.exists(pa) and os.path.exists(pb)):
        return False, ["config.json missing in " + ("A" if not os.path.exists(pa) else "B")], {}
    ca, cb = json.load(open(pa)), json.load(open(pb))
    problems = []
    values = {}
    checks = [("vocab_size", "vocab_size")]
    layer_key = next((k for k in _LAYER_KEYS if _cfg_get(ca, k) is not None), None)
    if layer_key:
        checks.append((layer_key, layer_key))
    for label, key in checks:
        va, vb = _cfg_get(ca, key), _cfg_get(cb, key)
        values[label] = va
        if va != vb:
            problems.append(f"{label}: {va!r} vs {vb!r}")

    def dt(c):
        v = _cfg_get(c, "dtype")
        if v is None:
            v = _cfg_get(c, "torch_dtype")
        return str(v).replace("torch.", "") if v is not None else None

    values["dtype"] = dt(ca)
    if dt(ca) != dt(cb):
        problems.append(f"dtype: {dt(ca)!r} vs {dt(cb)!r}")
    return not problems, problems, values


# --------------------------------------------------------------------------------------
# whole-output comparison
# --------------------------------------------------------------------------------------

_VOCAB_NAME_RE = re.compile(
    r"(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out|tok_embeddings"
    r"|shared|output\.weight$|embeddings\.weight$)"
)


@dataclass
class TensorReport:
    name: str
    ok: bool
    message: str


@dataclass
class CompareResult:
    n_tensors: int = 0
    n_exact: int = 0
    n_within_tol: int = 0
    tensor_reports: List[TensorReport] = field(default_factory=list)
    vocab: VocabResult = field(default_factory=VocabResult)
    config_ok: bool = True
    config_problems: List[str] = field(default_factory=list)
    layout_notes: List[str] = field(default_factory=list)
    ok: bool = True


def _permute_vocab_rows(a: np.ndarray, b: np.ndarray, perm: np.ndarray):
    """Return (a_rows, b_rows) aligned by token; rows past the vocab are positional."""
    n_tok = perm.shape[0]
    rows = a.shape[0]
    if b.shape[0] != rows or rows < n_tok or np.any(perm < 0) or np.any(perm >= rows):
        return None
    idx = np.concatenate([perm, np.arange(n_tok, rows, dtype=np.int64)])
    return a, b[idx]


def compare_outputs(
    dir_a: str,
    dir_b: str,
    config_path: Optional[str] = None,
    max_ulp: float = 0.0,
    vocab_tensor_re: Optional[str] = None,
    strict_layout: bool = False,
) -> CompareResult:
    res = CompareResult()
    plan = tokenizer_plan(config_path)
    res.vocab = compare_vocab(dir_a, dir_b, plan)
    cfg_ok, cfg_problems, cfg_values = compare_config(dir_a, dir_b)
    res.config_ok, res.config_problems = cfg_ok, cfg_problems

    ta, meta_a = load_model_tensors(dir_a)
    tb, meta_b = load_model_tensors(dir_b)
    res.n_tensors = len(ta)

    # output layout notes (informational)
    if sorted(meta_a) != sorted(meta_b):
        res.layout_notes.append(f"shard files differ: {sorted(meta_a)} vs {sorted(meta_b)}")
    ma = {json.dumps(m, sort_keys=True) for m in meta_a.values()}
    mb = {json.dumps(m, sort_keys=True) for m in meta_b.values()}
    if ma != mb:
        res.layout_notes.append(f"safetensors __metadata__ differs: {ma} vs {mb}")
    for fn in ("model.safetensors.index.json",):
        pa, pb = os.path.join(dir_a, fn), os.path.join(dir_b, fn)
        if os.path.exists(pa) != os.path.exists(pb):
            res.layout_notes.append(f"{fn} present only in {'A' if os.path.exists(pa) else 'B'}")
        elif os.path.exists(pa):
            ia, ib = json.load(open(pa)), json.load(open(pb))
            if ia.get("weight_map") != ib.get("weight_map"):
                res.layout_notes.append(f"{fn}: weight_map differs")
            if ia.get("metadata") != ib.get("metadata"):
                res.layout_notes.append(
                    f"{fn}: metadata {ia.get('metadata')} vs {ib.get('metadata')}"
                )

    names_a, names_b = set(ta), set(tb)
    for n in sorted(names_a - names_b):
        res.tensor_reports.append(TensorReport(n, False, "missing in B"))
    for n in sorted(names_b - names_a):
        res.tensor_reports.append(TensorReport(n, False, "missing in A (extra in B)"))

    vre = re.compile(vocab_tensor_re) if vocab_tensor_re else _VOCAB_NAME_RE
    vocab_rows = cfg_values.get("vocab_size")
    perm = res.vocab.perm

    for n in sorted(names_a & names_b):
        x, y = ta[n], tb[n]
        if x.dtype != y.dtype or x.shape != y.shape:
            res.tensor_reports.append(
                TensorReport(n, False, f"dtype/shape {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
            )
            continue
        if x.dtype not in _DTYPES:
            same = x.raw() == y.raw()
            res.n_exact += same
            res.n_within_tol += same
            if not same:
                res.tensor_reports.append(TensorReport(n, False, f"bytes differ (dtype {x.dtype})"))
            continue
        a, b = x.array(), y.array()
        permuted = False
        if (
            perm is not None
            and a.ndim >= 1
            and vre.search(n)
            and (vocab_rows is None or a.shape[0] == vocab_rows)
        ):
            aligned = _permute_vocab_rows(a, b, perm)
            if aligned is not None:
                a, b = aligned
                permuted = True
        d = compare_bits(a, b, x.dtype)
        if d.n_diff == 0:
            res.n_exact += 1
            res.n_within_tol += 1
            continue
        within = d.max_ulp <= max_ulp and d.n_nan_mismatch == 0
        res.n_within_tol += within
        idx = d.first_index
        va = float(_decode_values(np.asarray(a[idx]).reshape(1), x.dtype)[0])
        vb = float(_decode_values(np.asarray(b[idx]).reshape(1), x.dtype)[0])
        msg = (
            f"{x.dtype}{list(x.shape)}: {d.n_diff}/{a.size} elements differ, "
            f"max ulp {d.max_ulp:g}"
            + (f", {d.n_nan_mismatch} NaN mismatches" if d.n_nan_mismatch else "")
            + f"; first at {list(idx)}: {va!r} vs {vb!r}"
            + (" (rows aligned by token)" if permuted else "")
        )
        res.tensor_reports.append(TensorReport(n, within, msg))

    tensors_ok = (
        names_a == names_b
        and all(r.ok for r in res.tensor_reports)
    )
    res.ok = tensors_ok and res.vocab.ok and res.config_ok
    if strict_layout and res.layout_notes:
        res.ok = False
    return res


# --------------------------------------------------------------------------------------
# running the tools
# --------------------------------------------------------------------------------------


@dataclass
class RunResult:
    ok: bool
    seconds: float
    cmd: List[str]
    log: str


def run_tool(cmd: List[str], log_path: str, timeout: float, env=None) -> RunResult:
    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        try:
            p = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env
            )
            ok = p.returncode == 0
            if not ok:
                log.write(f"\n[exit status {p.returncode}]\n")
        except subprocess.TimeoutExpired:
            ok = False
            log.write(f"\n[timeout after {timeout}s]\n")
        except OSError as e:
            ok = False
            log.write(f"\n[could not start: {e}]\n")
    return RunResult(ok, time.time() - t0, cmd, log_path)


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        return "\n".join("    | " + ln for ln in lines[-n:])
    except OSError:
        return ""


def mergekit_cmd(args, config: str, out: str) -> List[str]:
    cmd = [args.mergekit_bin, config, out, "--random-seed", str(args.seed)]
    if args.mergekit_threads:
        cmd += ["--num-threads", str(args.mergekit_threads)]
    cmd += shlex.split(args.mergekit_args or "")
    return cmd


def ours_cmd(args, config: str, out: str) -> List[str]:
    cmd = shlex.split(args.ours) + ["merge", config, out, "--seed", str(args.seed)]
    cmd += shlex.split(args.ours_args or "")
    return cmd


def print_result(label: str, res: CompareResult, args) -> None:
    bad = [r for r in res.tensor_reports if not r.ok]
    tol = [r for r in res.tensor_reports if r.ok]
    vocab = res.vocab.status.split(" (")[0] if res.vocab.ok else res.vocab.status
    cfg = "config OK" if res.config_ok else "config MISMATCH"
    line = f"{label}: {res.n_tensors} tensors, {res.n_exact} bit-exact"
    if args.max_ulp > 0:
        line += f", {res.n_within_tol} within {args.max_ulp:g} ulp"
    line += f", {vocab}, {cfg}"
    if res.layout_notes:
        line += ", layout differs" if args.strict_layout else ", layout notes"
    if not res.ok:
        line += "  -> MISMATCH"
    print(line, flush=True)
    limit = None if args.verbose else 20
    for r in (bad + (tol if args.verbose else []))[:limit]:
        print(f"    {'FAIL' if not r.ok else 'tol '} {r.name}: {r.message}")
    if limit is not None and len(bad) > limit:
        print(f"    ... {len(bad) - limit} more mismatching tensors (use -v)")
    if not res.vocab.ok or args.verbose:
        for d in res.vocab.details:
            print(f"    vocab: {d}")
    for p in res.config_problems:
        print(f"    config.json: {p}")
    for note in res.layout_notes:
        print(f"    note: {note}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description="Compare superswallow merge outputs with mergekit 0.1.5, bit for bit.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[-1],
    )
    ap.add_argument("configs", nargs="*", help="merge config YAML files")
    ap.add_argument("--mergekit-bin", default="mergekit-yaml", help="mergekit-yaml executable")
    ap.add_argument(
        "--ours",
        help='command prefix of our CLI, e.g. "superswallow" or ".venv/bin/superswallow";'
        " it is run as: <ours> merge CONFIG OUT --seed SEED",
    )
    ap.add_argument("--ours-args", default="", help="extra arguments for our CLI")
    ap.add_argument("--mergekit-args", default="", help='extra arguments for mergekit-yaml, e.g. "--no-write-model-card"')
    ap.add_argument(
        "--mergekit-threads",
        type=int,
        default=None,
        help="pass --num-threads N to mergekit (torch intra-op threads; changes the"
        " rounding of full-tensor sums used by DARE/TIES rescaling for tensors > 32768 elements)",
    )
    ap.add_argument(
        "--mergekit-vs-mergekit",
        action="store_true",
        help="compare mergekit with a second mergekit run instead of our CLI",
    )
    ap.add_argument(
        "--compare-dirs",
        nargs=2,
        metavar=("DIR_A", "DIR_B"),
        help="compare two existing output folders (optionally with --config)",
    )
    ap.add_argument("--config", help="config YAML for --compare-dirs (tokenizer base detection)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-ulp", type=float, default=0.0, help="tolerated ulp distance (default 0: bit-exact)")
    ap.add_argument("--vocab-tensor-regex", default=None, help="regex for vocabulary-axis tensors (rows re-ordered by token)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per tool run")
    ap.add_argument("--workdir", default=None, help="where to put outputs (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep output folders")
    ap.add_argument(
        "--strict-layout",
        action="store_true",
        help="also fail on output-layout differences (shard files, index json, safetensors metadata)",
    )
    ap.add_argument(
        "--both-fail-ok",
        action="store_true",
        help="count a config as matching when both tools exit non-zero (error-parity configs)",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    if args.compare_dirs:
        res = compare_outputs(
            args.compare_dirs[0], args.compare_dirs[1], args.config,
            max_ulp=args.max_ulp, vocab_tensor_re=args.vocab_tensor_regex,
            strict_layout=args.strict_layout,
        )
        print_result(args.config or f"{args.compare_dirs[0]} vs {args.compare_dirs[1]}", res, args)
        return 0 if res.ok else 1

    if not args.configs:
        ap.error("no config files given")
    if not args.ours and not args.mergekit_vs_mergekit:
        ap.error("--ours is required (or use --mergekit-vs-mergekit / --compare-dirs)")

    root = args.workdir or tempfile.mkdtemp(prefix="mergekit_parity_")
    os.makedirs(root, exist_ok=True)
    n_fail = 0
    for i, cfg in enumerate(args.configs):
        cfg_abs = os.path.abspath(cfg)
        label = os.path.basename(cfg)
        slot = os.path.join(root, f"{i:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', label)}")
        if os.path.exists(slot):
            shutil.rmtree(slot)
        os.makedirs(slot)
        out_a, out_b = os.path.join(slot, "mergekit"), os.path.join(slot, "ours")
        ra = run_tool(mergekit_cmd(args, cfg_abs, out_a), os.path.join(slot, "mergekit.log"), args.timeout)
        if args.mergekit_vs_mergekit:
            rb = run_tool(mergekit_cmd(args, cfg_abs, out_b), os.path.join(slot, "ours.log"), args.timeout)
        else:
            rb = run_tool(ours_cmd(args, cfg_abs, out_b), os.path.join(slot, "ours.log"), args.timeout)
        if not ra.ok and not rb.ok and args.both_fail_ok:
            print(f"{label}: both tools failed (accepted by --both-fail-ok)", flush=True)
            if args.verbose:
                print(_tail(ra.log, 3))
                print(_tail(rb.log, 3))
            continue
        if not (ra.ok and rb.ok):
            n_fail += 1
            which = []
            if not ra.ok:
                which.append(("mergekit", ra))
            if not rb.ok:
                which.append(("ours" if not args.mergekit_vs_mergekit else "mergekit#2", rb))
            print(f"{label}: RUN FAILED ({', '.join(w for w, _ in which)})", flush=True)
            for w, r in which:
                print(f"    {w}: {' '.join(shlex.quote(c) for c in r.cmd)}")
                print(_tail(r.log))
            continue
        try:
            res = compare_outputs(
                out_a, out_b, cfg_abs, max_ulp=args.max_ulp,
                vocab_tensor_re=args.vocab_tensor_regex,
                strict_layout=args.strict_layout,
            )
        except Exception as e:  # malformed output
            n_fail += 1
            print(f"{label}: COMPARE FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        print_result(label, res, args)
        if args.verbose:
            print(f"    times: mergekit {ra.seconds:.1f}s, other {rb.seconds:.1f}s; outputs in {slot}")
        n_fail += not res.ok
        if not args.keep and res.ok:
            shutil.rmtree(slot, ignore_errors=True)
    if args.keep or n_fail:
        print(f"outputs kept under {root}")
    elif not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{len(args.configs) - n_fail}/{len(args.configs)} configs match")
    return 0 if n_fail == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
