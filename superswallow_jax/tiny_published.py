"""Tiny models in the forms real checkpoints are published in, written without torch.

Llama-2 fine-tunes such as ``allenai/tulu-2-dpo-70b`` publish pickled
``pytorch_model-000NN-of-000MM.bin`` shards and only a sentencepiece
``tokenizer.model``; :mod:`superswallow_jax.tiny` uses these writers for its
``published`` variants:

* :func:`write_torch_bin`: a zip-format ``torch.save`` file of a state dict,
  as torch >= 2.1 writes it (members ``<archive>/data.pkl``,
  ``<archive>/byteorder``, ``<archive>/data/<k>``, ``<archive>/version``;
  stored, storage bytes aligned to 64 bytes). ``data.pkl`` is pickle
  protocol 2 calling ``torch._utils._rebuild_tensor_v2`` with typed storages
  and an empty ``collections.OrderedDict`` of hooks, the globals real
  checkpoints use. The opcodes are emitted here because the standard pickler
  needs the torch objects themselves; ``torch.load(..., weights_only=True)``
  reads the result (checked by ``scripts/make_published_fixtures.py``).
* :func:`sentencepiece_model`: a sentencepiece BPE ``ModelProto`` over a
  Llama-style vocabulary (unknown, control and byte pieces, then normal
  pieces scored by decreasing id), serialized with sentencepiece's protobuf
  schema.
* :func:`slow_tokenizer_config` / :func:`special_tokens_map`: the JSON files a
  Llama-2-era ``LlamaTokenizer.save_pretrained`` wrote beside it.
"""

from __future__ import annotations

import math
import struct
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .dtypes import CODES

__all__ = ["sentencepiece_model", "slow_tokenizer_config", "special_tokens_map", "write_torch_bin"]

_STORAGE = {"BF16": "BFloat16Storage", "F16": "HalfStorage", "F32": "FloatStorage", "F64": "DoubleStorage",
            "I8": "CharStorage", "U8": "ByteStorage", "I16": "ShortStorage", "I32": "IntStorage",
            "I64": "LongStorage", "BOOL": "BoolStorage"}
_ALIGN = 64


def _unicode(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def _int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if -(1 << 31) <= v < (1 << 31):
        return b"J" + struct.pack("<i", v)
    n = (v.bit_length() + 8) // 8
    return b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)


def _ints(vals: Sequence[int]) -> bytes:
    return b"(" + b"".join(_int(v) for v in vals) + b"t"


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _state_dict_pickle(entries: Sequence[tuple[str, str, tuple[int, ...], str]]) -> bytes:
    """Protocol-2 pickle of ``OrderedDict(name -> tensor)``; entries are (name, code, shape, storage key)."""
    out = [b"\x80\x02", _global("collections", "OrderedDict"), b")R"]
    for name, code, shape, key in entries:
        stride = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            stride[i] = stride[i + 1] * shape[i + 1]
        numel = math.prod(shape)
        storage = (b"(" + _unicode("storage") + _global("torch", _STORAGE[code]) + _unicode(key) + _unicode("cpu")
                   + _int(numel) + b"tQ")
        args = (b"(" + storage + _int(0) + _ints(shape) + _ints(stride) + b"\x89"
                + _global("collections", "OrderedDict") + b")R" + b"t")
        out.append(b"(" + _unicode(name) + _global("torch._utils", "_rebuild_tensor_v2") + args + b"Ru")
    out.append(b".")
    return b"".join(out)


def _member(zf: zipfile.ZipFile, name: str, data: bytes | memoryview) -> None:
    """Add a stored member whose bytes start at a multiple of 64 (torch's padding extra field 'FB')."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    pos = zf.fp.tell()  # type: ignore[union-attr]
    pad = (-(pos + 30 + len(name.encode()) + 4)) % _ALIGN
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    with zf.open(info, "w", force_zip64=len(data) >= 0xFFFFFFFF) as f:
        f.write(data)


def write_torch_bin(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` (name -> C-contiguous array, bf16/f16/f32/... as numpy dtypes)
    as a zip-format ``torch.save`` state dict at ``path`` (one storage per tensor)."""
    path = Path(path)
    archive = path.name.rsplit(".", 1)[0] or "archive"
    entries = [(name, CODES[np.dtype(a.dtype)], tuple(int(d) for d in a.shape), str(i))
               for i, (name, a) in enumerate(arrays.items())]
    with open(path, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        _member(zf, f"{archive}/data.pkl", _state_dict_pickle(entries))
        _member(zf, f"{archive}/byteorder", b"little")
        for (_, _, _, key), a in zip(entries, arrays.values()):
            _member(zf, f"{archive}/data/{key}", memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
        _member(zf, f"{archive}/version", b"3\n")


def sentencepiece_model(tokens: Sequence[str]) -> bytes:
    """A serialized sentencepiece BPE model over ``tokens`` (id = index).

    ``<unk>``, ``<s>`` and ``</s>`` must be ids 0, 1 and 2; ``<0xNN>`` pieces
    are byte pieces (byte fallback on). Normal pieces score ``-id`` so that
    sentencepiece merges in id order, as the converted tokenizer does.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    if tuple(tokens[:3]) != ("<unk>", "<s>", "</s>"):
        raise ValueError("tokens must start with <unk>, <s>, </s>")
    m = pb.ModelProto()
    for i, t in enumerate(tokens):
        p = m.pieces.add()
        p.piece = t
        if i < 3:
            p.type = p.UNKNOWN if i == 0 else p.CONTROL
            p.score = 0.0
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            p.type, p.score = p.BYTE, 0.0
        else:
            p.type, p.score = p.NORMAL, float(-i)
    ts = m.trainer_spec
    ts.model_type = ts.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = True
    ts.split_digits = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = 0, 1, 2, -1
    ts.unk_piece, ts.bos_piece, ts.eos_piece = "<unk>", "<s>", "</s>"
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = True
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return m.SerializeToString()


def _added(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False}


def slow_tokenizer_config(chat_template: str | None, max_len: int) -> dict:
    """``tokenizer_config.json`` as Llama-2-era checkpoints publish it (``LlamaTokenizer``, ``legacy: false``)."""
    cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": _added("</s>"),
        "legacy": False,
        "model_max_length": max_len,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _added("<unk>"),
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    return cfg


def special_tokens_map() -> dict:
    def tok(t: str) -> dict:
        return {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {"bos_token": tok("<s>"), "eos_token": tok("</s>"), "unk_token": tok("<unk>")}
