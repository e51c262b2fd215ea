"""``base+adapter``: the weights of a base model with a LoRA adapter merged in, described, never written.

mergekit materialises such a model with transformers and PEFT
(``from_pretrained`` then ``merge_and_unload``, into ``--lora-merge-cache``).
What that computes, tensor by tensor, and what :class:`AdaptedCheckpoint`
describes so that the merge streams it (:mod:`superswallow_jax.lora.fetch`):

1. transformers loads every float tensor in one **load dtype** ``D``: the
   ``dtype`` (or ``torch_dtype``) of the base's ``config.json``, else the
   dtype of its weights (:func:`load_dtype`);
2. tensors the adapter saves whole (``modules_to_save``, an embedding's
   ``base_layer``) replace the base's, also cast to ``D``;
3. a module with LoRA factors gets ``W + scale * B @ A`` (embeddings and
   GPT-2's ``Conv1D`` layers: ``W + scale * (B @ A)^T``), with ``B @ A`` in
   float32 (PEFT upcasts the factors), the scale a float32 multiply, and the
   sum in float32 rounded once to ``D`` (an embedding's delta is rounded to
   ``D`` before the sum, as PEFT's embedding merge does).

Every other tensor is the base's, unchanged. The model's ``config.json`` and
tokenizer are the base's (mergekit reads them from the base too).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from ..dtypes import BY_CODE, FLOAT_CODES
from ..errors import ModelError
from ..io.checkpoint import Checkpoint
from ..io.tensor_file import TensorFile, TensorInfo
from .adapter import Adapter, LoraFactors

#: Module names that are transformers ``Conv1D`` layers (weights stored ``[in, out]``), by ``model_type``:
#: PEFT transposes ``B @ A`` for them whatever ``fan_in_fan_out`` says (and for nn.Linear never does).
CONV1D_MODULES: Mapping[str, tuple[str, ...]] = {"gpt2": ("c_attn", "c_proj", "c_fc", "q_attn")}


@dataclass(frozen=True)
class LoraDelta:
    """``scale * B @ A`` (``transposed``: its transpose) added to one tensor."""

    a: TensorInfo  # [r, in] (transposed: [r, rows of W])
    b: TensorInfo  # [out, r] (transposed: [columns of W, r])
    scale: float
    transposed: bool
    module: str
    embedding: bool = False  # PEFT's embedding merge rounds the delta to W's dtype before adding

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class Adaptation:
    """How one tensor of a ``base+adapter`` model is made from what is stored: cast to ``dtype``, plus ``delta``."""

    dtype: str  # the load dtype code, what the merge sees
    delta: LoraDelta | None
    adapter: str  # the adapter's reference, for messages


def load_dtype(config: Mapping, ckpt: Checkpoint, where: str) -> str:
    """The dtype transformers loads the base in: config.json's ``dtype``/``torch_dtype``, else its weights' one."""
    names = {BY_CODE[c].name: c for c in FLOAT_CODES}
    for key in ("dtype", "torch_dtype"):
        v = config.get(key)
        if isinstance(v, str) and v.removeprefix("torch.") in names:
            code = names[v.removeprefix("torch.")]
            break
    else:
        found = sorted({i.dtype for i in ckpt.tensors.values() if i.dtype in FLOAT_CODES})
        if len(found) != 1:
            raise ModelError(f"{where}: config.json names no dtype and the weights mix {', '.join(found) or 'none'}: "
                             "the dtype to apply the adapter in is ambiguous (set torch_dtype in config.json)")
        code = found[0]
    if code == "F64":
        raise ModelError(f"{where}: a float64 base: applying an adapter in float64 is not supported")
    return code


def _transposed(factors: LoraFactors, model_type: object) -> bool:
    if factors.embedding:
        return True
    return factors.module.rsplit(".", 1)[-1] in CONV1D_MODULES.get(str(model_type), ())


class AdaptedCheckpoint:
    """A base :class:`Checkpoint` with an :class:`Adapter` applied (the same ``tensors``/``file``/``files`` interface).

    ``tensors`` maps names to what is *stored* (the base's tensor, or the
    adapter's replacement renamed to the model's name); :meth:`adaptation`
    says how a tensor is made from it (None: read it as stored).
    """

    def __init__(self, base: Checkpoint, adapter: Adapter, config: Mapping, where: str):
        self.base, self.adapter, self.where = base, adapter, where
        self.format = base.format
        self.dtype = load_dtype(config, base, where)
        self.tensors: dict[str, TensorInfo] = dict(base.tensors)
        for name, info in adapter.saved.items():
            self.tensors[name] = dataclasses.replace(info, name=name)
            self._check_shape(name, info.shape)
        deltas = {}
        for module, f in adapter.factors.items():
            name = f"{module}.weight"
            t = _transposed(f, config.get("model_type"))
            self._check_shape(name, (f.a.shape[1], f.b.shape[0]) if t else (f.b.shape[0], f.a.shape[1]), module)
            deltas[name] = LoraDelta(f.a, f.b, adapter.config.scale(module), t, module, f.embedding)
        self._adapt = {
            n: Adaptation(self.dtype, deltas.get(n), adapter.ref)
            for n, info in self.tensors.items()
            if info.dtype in FLOAT_CODES and (info.dtype != self.dtype or n in deltas)
        }

    def _check_shape(self, name: str, shape: tuple[int, ...], module: str | None = None) -> None:
        base = self.base.tensors.get(name)
        what = f"the LoRA of module {module}" if module else f"tensor {name} of the adapter"
        if base is None:
            raise ModelError(f"{self.where}: {what} has no tensor {name} in the base model to apply to")
        if tuple(base.shape) != tuple(shape):
            raise ModelError(f"{self.where}: {what} is {list(shape)} but {name} of the base is {list(base.shape)}")

    def adaptation(self, name: str) -> Adaptation | None:
        """How tensor ``name`` is made, or None when it is read as stored."""
        return self._adapt.get(name)

    def file(self, info: TensorInfo) -> TensorFile:
        return self.adapter.file if info.path == self.adapter.file.path else self.base.file(info)

    @property
    def files(self):
        """The base's weight files (the adapter's are :attr:`Adapter.files`)."""
        return self.base.files

    def close(self) -> None:
        self.base.close()
        self.adapter.close()

    def __enter__(self) -> "AdaptedCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
