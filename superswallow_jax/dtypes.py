"""Dtypes, one table for the whole code base, keyed by the safetensors code (``"BF16"``).

A :class:`DType` knows its numpy dtype (``ml_dtypes.bfloat16`` for BF16,
which is also JAX's), its Hugging Face / torch name (``"bfloat16"``) and
whether merges can compute in it. Readers, the writer, the planner, the
kernels and the host-side rounding all look dtypes up here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import ml_dtypes
import numpy as np

__all__ = ["BY_CODE", "CODES", "DType", "FLOAT_CODES", "NP", "WORK_CODES", "code_of", "config_code", "np_dtype"]


@dataclass(frozen=True)
class DType:
    code: str  # safetensors code, "BF16"
    np: np.dtype  # numpy (and JAX) dtype
    name: str  # Hugging Face / torch name, "bfloat16"
    is_float: bool

    @property
    def itemsize(self) -> int:
        return self.np.itemsize


_ALL = (
    DType("BF16", np.dtype(ml_dtypes.bfloat16), "bfloat16", True),
    DType("F16", np.dtype(np.float16), "float16", True),
    DType("F32", np.dtype(np.float32), "float32", True),
    DType("F64", np.dtype(np.float64), "float64", True),
    DType("I8", np.dtype(np.int8), "int8", False),
    DType("U8", np.dtype(np.uint8), "uint8", False),
    DType("I16", np.dtype(np.int16), "int16", False),
    DType("U16", np.dtype(np.uint16), "uint16", False),
    DType("I32", np.dtype(np.int32), "int32", False),
    DType("U32", np.dtype(np.uint32), "uint32", False),
    DType("I64", np.dtype(np.int64), "int64", False),
    DType("U64", np.dtype(np.uint64), "uint64", False),
    DType("BOOL", np.dtype(np.bool_), "bool", False),
)

#: code -> DType
BY_CODE: Mapping[str, DType] = {d.code: d for d in _ALL}
#: code -> numpy dtype (every readable code)
NP: Mapping[str, np.dtype] = {d.code: d.np for d in _ALL}
#: numpy dtype -> code
CODES: Mapping[np.dtype, str] = {d.np: d.code for d in _ALL}
#: codes of float formats (mergeable inputs)
FLOAT_CODES: tuple[str, ...] = tuple(d.code for d in _ALL if d.is_float)
#: codes a merge can compute in (``dtype:`` of a config; float64 is refused)
WORK_CODES: tuple[str, ...] = ("BF16", "F16", "F32")


def np_dtype(code: str) -> np.dtype:
    return NP[code]


def code_of(dtype: object) -> str:
    """The code of a numpy/JAX dtype (KeyError for other dtypes)."""
    return CODES[np.dtype(dtype)]


def config_code(name: str) -> str | None:
    """The code of a config's ``dtype:`` value (``float32``, ``float16``, ``bfloat16``,
    optionally ``torch.``-prefixed), or None when it names no work dtype."""
    key = name.removeprefix("torch.")
    for code in WORK_CODES:
        if BY_CODE[code].name == key:
            return code
    return None
