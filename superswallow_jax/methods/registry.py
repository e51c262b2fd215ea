"""Merge methods by mergekit name: their parameters, defaults and roles.

This is data, not behaviour: the executor maps ``MethodSpec.kind`` to a pure
kernel in :mod:`superswallow_jax.methods`. Parameter names and defaults follow
mergekit 0.1.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """A method parameter: its type (float or bool), default, and a description."""

    name: str
    type: type
    default: object = REQUIRED
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: mergekit name, parameters, and which kernel runs it.

    ``kind`` is ``"linear"``, ``"gta"`` or ``"passthrough"``. For ``gta``,
    ``sparsify`` is ``None``, ``"random"`` or ``"magnitude"`` and ``consensus``
    is ``None`` or ``"sum"``.
    """

    name: str
    kind: str
    doc: str
    per_model: Mapping[str, Param] = field(default_factory=dict)
    global_: Mapping[str, Param] = field(default_factory=dict)
    sparsify: str | None = None
    consensus: str | None = None
    base: str = "optional"  # "required", "optional" or "none"
    pretty: str = ""
    reference: str = ""

    @property
    def params(self) -> Mapping[str, Param]:
        return {**self.per_model, **self.global_}


def _gta(name: str, doc: str, *, sparsify, consensus, normalize: bool, rescale: bool, pretty: str, ref: str) -> MethodSpec:
    return MethodSpec(
        name=name,
        kind="gta",
        doc=doc,
        per_model={
            "weight": Param("weight", float, REQUIRED, "scale of this model's task vector"),
            "density": Param("density", float, 1.0, "fraction of the task vector kept"),
        },
        global_={
            "normalize": Param("normalize", bool, normalize, "divide by the sum of (selected) weights"),
            "rescale": Param("rescale", bool, rescale, "L1-rescale sparsified task vectors"),
            "int8_mask": Param("int8_mask", bool, False, "storage hint; no effect on results"),
            "lambda": Param("lambda", float, 1.0, "scale of the merged task vector"),
        },
        sparsify=sparsify,
        consensus=consensus,
        base="required",
        pretty=pretty,
        reference=ref,
    )


TIES_REF = "https://arxiv.org/abs/2306.01708"
DARE_REF = "https://arxiv.org/abs/2311.03099"
TA_REF = "https://arxiv.org/abs/2212.04089"

METHODS: Mapping[str, MethodSpec] = {
    "linear": MethodSpec(
        "linear",
        "linear",
        "weighted average of the models (f32 accumulation)",
        per_model={"weight": Param("weight", float, REQUIRED, "weight of this model")},
        global_={"normalize": Param("normalize", bool, True, "divide by the sum of weights")},
        base="optional",
        pretty="Linear",
        reference="https://arxiv.org/abs/2203.05482",
    ),
    "task_arithmetic": _gta(
        "task_arithmetic", "base + weighted sum of task vectors",
        sparsify=None, consensus=None, normalize=False, rescale=False, pretty="Task Arithmetic", ref=TA_REF,
    ),
    "ties": _gta(
        "ties", "TIES: magnitude pruning + sign consensus",
        sparsify="magnitude", consensus="sum", normalize=True, rescale=False, pretty="TIES", ref=TIES_REF,
    ),
    "dare_ties": _gta(
        "dare_ties", "DARE random pruning + TIES sign consensus",
        sparsify="random", consensus="sum", normalize=False, rescale=True, pretty="DARE TIES", ref=DARE_REF,
    ),
    "dare_linear": _gta(
        "dare_linear", "DARE random pruning, no consensus",
        sparsify="random", consensus=None, normalize=False, rescale=True, pretty="Linear DARE", ref=DARE_REF,
    ),
    "passthrough": MethodSpec(
        "passthrough",
        "passthrough",
        "copy the single input tensor (optionally scaled)",
        per_model={"scale": Param("scale", float, None, "multiply the tensor by this")},
        base="none",
        pretty="Passthrough",
    ),
}


def get_method(name: object, where: str) -> MethodSpec:
    """Look up a method by mergekit name, raising ConfigError naming ``where``."""
    from ..errors import ConfigError

    if not isinstance(name, str) or name not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise ConfigError(f"{where}: unknown merge method {name!r} (supported: {known})")
    return METHODS[name]


#: Every parameter name some method accepts. A config naming a parameter that no
#: method knows is an error (a typo); one that another method uses is ignored
#: with a warning, as mergekit ignores it.
ALL_PARAMS = frozenset(p for m in METHODS.values() for p in m.params) | frozenset(
    {"gamma", "epsilon", "select_topk", "t", "filter_wise", "nuslerp_flatten", "nuslerp_row_wise",
     "normalize_weights", "eps", "max_iter", "tol", "r", "alpha"}
)
