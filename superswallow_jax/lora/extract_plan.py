"""Which tensors of a fine-tune ``extract-lora`` factorises, saves whole, or leaves out (as mergekit-extract-lora).

Per tensor of the fine-tune (every one must be in the base, float, of the base's shape but for a resized vocabulary):

* a 2-D weight of a linear layer (``<module>.weight``; GPT-2 ``Conv1D`` layers
  too, stored ``[in, out]``) whose module matches ``--modules`` (regular
  expressions searched in the module name; default: every module): a LoRA;
* an embedding or the output layer (the architecture's vocabulary tensors,
  or a module named like ``embed``/``wte``/``wpe``/``lm_head``): saved whole in
  ``modules_to_save`` (or left out with ``--skip-embeddings``), as mergekit
  does unless told to factorise them;
* any other tensor (norms: one dimension) that differs from the base: its
  module saved whole in ``modules_to_save``, as mergekit saves modules it
  cannot factorise; a linear layer's bias that differs cannot be (the
  module would be replaced, weight and all): left out, and reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..dtypes import FLOAT_CODES
from ..errors import ConfigError, ModelError
from ..io.checkpoint import Checkpoint
from ..io.tensor_file import TensorInfo
from .adapted import CONV1D_MODULES

#: Module name parts that mark an embedding (or the output layer), whatever the architecture table says.
EMBED_HINTS = ("embed", "wte", "wpe", "lm_head", "embed_out", "word_embeddings")


@dataclass(frozen=True)
class Factorise:
    """A LoRA to extract: ``ΔW = finetuned - base`` of one 2-D weight (``transposed``: a Conv1D, ΔW = (B @ A)ᵀ)."""

    name: str
    module: str
    ft: TensorInfo
    base: TensorInfo
    transposed: bool


@dataclass(frozen=True)
class Save:
    """A tensor saved whole (``modules_to_save`` entry ``key``) from the fine-tune."""

    name: str
    key: str
    ft: TensorInfo


@dataclass(frozen=True)
class ExtractPlan:
    factorise: tuple[Factorise, ...]
    save: tuple[Save, ...]
    left_out: tuple[tuple[str, str], ...]  # (tensor, why)


def _module(name: str) -> str:
    return name.rpartition(".")[0]


def _is_embedding(name: str, embed_names: set[str]) -> bool:
    return name in embed_names or any(h in _module(name).rsplit(".", 1)[-1] for h in EMBED_HINTS)


def _check_pair(name: str, ft: TensorInfo, base: TensorInfo | None, embedding: bool) -> None:
    if base is None:
        raise ModelError(f"tensor {name} of the fine-tune is not in the base model ({ft.path.parent})")
    if ft.dtype not in FLOAT_CODES or base.dtype not in FLOAT_CODES:
        raise ModelError(f"tensor {name}: dtype {ft.dtype} / {base.dtype}: not a float tensor")
    if ft.shape != base.shape and not (embedding and ft.shape[1:] == base.shape[1:]):
        raise ModelError(f"tensor {name}: {list(ft.shape)} in the fine-tune, {list(base.shape)} in the base")


def _differs(ft_ck: Checkpoint, base_ck: Checkpoint, ft: TensorInfo, base: TensorInfo) -> bool:
    """Whether two small tensors differ (read whole: norms and biases)."""
    a = np.asarray(ft_ck.file(ft).view_of(ft), np.float32)
    b = np.asarray(base_ck.file(base).view_of(base), np.float32)
    return a.shape != b.shape or not np.array_equal(a, b)


def _compile(patterns: Sequence[str]) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"--modules: {p!r} is not a valid regular expression ({e})") from None
    return out


def plan_extraction(ft: Checkpoint, base: Checkpoint, config: Mapping, embed_names: Iterable[str],
                    modules: Sequence[str] = (), skip_embeddings: bool = False) -> ExtractPlan:
    """Sort the fine-tune's tensors (see the module docstring). ``config``: the fine-tune's config.json;
    ``embed_names``: the architecture's vocabulary tensors."""
    pats = _compile(modules)
    embeds = set(embed_names)
    conv1d = CONV1D_MODULES.get(str(config.get("model_type")), ())
    linear = {_module(n) for n, i in ft.tensors.items() if len(i.shape) == 2 and n.endswith(".weight")
              and not _is_embedding(n, embeds)}
    fac, save, out = [], [], []
    for name in sorted(ft.tensors):
        info, binfo, module = ft.tensors[name], base.tensors.get(name), _module(name)
        emb = _is_embedding(name, embeds)
        _check_pair(name, info, binfo, emb)
        assert binfo is not None
        if emb:
            if skip_embeddings:
                out.append((name, "an embedding (--skip-embeddings)"))
            else:
                save.append(Save(name, module.rsplit(".", 1)[-1], info))
        elif module in linear and name.endswith(".weight"):
            if pats and not any(p.search(module) for p in pats):
                out.append((name, "not matched by --modules"))
            else:
                fac.append(Factorise(name, module, info, binfo, module.rsplit(".", 1)[-1] in conv1d))
        elif _differs(ft, base, info, binfo):
            if module in linear:
                out.append((name, "the bias of a linear layer changed: not representable (the module would be saved whole)"))
            else:
                save.append(Save(name, module.rsplit(".", 1)[-1], info))
    return ExtractPlan(tuple(fac), tuple(save), tuple(out))
