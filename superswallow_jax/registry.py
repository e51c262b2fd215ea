"""Merge methods by mergekit name: one entry holds everything the rest of the code knows of a method.

An entry (:class:`MethodSpec`) names the method's parameters with their
defaults, its input contract, the facts the planner needs (whether every
tensor needs the base's, whether the base takes per-model parameters, one
source per slice, what the model card says), a ``validate`` hook run at plan
time for each model's resolved parameters, and its chunk program: the
``prepare`` function in :mod:`superswallow_jax.programs` that turns a step
into a chunk program over the pure kernels of :mod:`superswallow_jax.methods`.
Parameter names and defaults follow mergekit 0.1.5.

Adding a method: a kernel module in ``methods/``, a ``prepare`` function in
``programs/``, and one entry here (docs/design.md, "Adding a method").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """A method parameter: its type (float, int or bool), default, description, and
    the closed interval ``range`` its values must lie in (``None`` ends: unbounded)."""

    name: str
    type: type
    default: object = REQUIRED
    doc: str = ""
    range: tuple[float | None, float | None] | None = None

    def check(self, value: object, where: str) -> None:
        """ConfigError naming ``where`` when a resolved value lies outside :attr:`range`."""
        if self.range is None or value is None or isinstance(value, bool):
            return
        lo, hi = self.range
        if (lo is not None and value < lo) or (hi is not None and value > hi) or value != value:
            from .errors import ConfigError

            span = f"[{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"
            raise ConfigError(f"{where}: {self.name} = {value:g} is outside {span}")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Inputs:
    """mergekit's input contract of a method (checked per slice and per tensor).

    Counts are of all inputs (the base included) and of non-base inputs;
    ``base_ignored`` makes the base an ordinary input. ``optional`` is what
    happens when an optional tensor is missing from some models: ``"error"``
    (the rest must still satisfy the contract), ``"passthrough_singleton"``
    (one input left: copy it), ``"passthrough_base_singleton"`` (only the base
    left: copy it) or ``"base_or_skip"`` (too few inputs: copy the base if it
    is the only one, else leave the tensor out).
    """

    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    base_ignored: bool = False
    optional: str = "error"


#: ``validate(params, sources, tensor)``: one tensor's resolved global
#: parameters and, per input model, ``(model reference, its parameters with the
#: global ones under them, is the base)``; raises ConfigError naming the tensor.
Validator = Callable[[Mapping[str, Any], "list[tuple[str, Mapping[str, Any], bool]]", str], None]


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: mergekit name, parameters, and the program that runs it.

    ``program`` is ``"<module of superswallow_jax.programs>:<prepare function>"``,
    imported when a merge first needs it. For the GTA family ``sparsify`` is
    ``None``, ``"random"``, ``"magnitude"``, ``"magnitude_outliers"`` or
    ``"della"`` and ``consensus`` is ``None`` or ``"sum"``. ``result_dtype``,
    when set, is the dtype mergekit returns (and saves, unless ``out_dtype``
    is set) for tensors with at least one non-base input, whatever the working
    dtype (ramplus_tl promotes to float32).

    Planner facts: ``base_takes_model_params`` (False: per-model parameters
    apply to the other models only, mergekit's ``PerNonBase``);
    ``needs_base_tensor`` (every output tensor needs the base model's);
    ``one_source_per_slice``; ``card_names_base`` (the model card says
    "using <base> as a base"); ``validate`` (run for every non-base model at
    tensor once its parameters are resolved, with every model's).
    """

    name: str
    program: str
    doc: str
    per_model: Mapping[str, Param] = field(default_factory=dict)
    global_: Mapping[str, Param] = field(default_factory=dict)
    sparsify: str | None = None
    consensus: str | None = None
    base: str = "optional"  # "required", "optional" or "none"
    pretty: str = ""
    reference: str = ""
    result_dtype: str | None = None
    inputs: Inputs | None = None  # None: no contract checks beyond ``base``
    base_takes_model_params: bool = True
    needs_base_tensor: bool = False
    one_source_per_slice: bool = False
    card_names_base: bool = True
    validate: Validator | None = None

    @property
    def params(self) -> Mapping[str, Param]:
        return {**self.per_model, **self.global_}


def _della_ranges(params: Mapping[str, Any], sources: list, tensor: str) -> None:
    from .errors import ConfigError

    for key, p, is_base in sources:
        dens, eps = p.get("density", 1.0), p.get("epsilon", 0.15)
        if not is_base and 0 < dens < 1 and (dens + eps >= 1 or dens - eps <= 0):
            raise ConfigError(f"tensor {tensor}, model {key}: della needs 0 < density -/+ epsilon < 1 "
                              f"(density={dens:g}, epsilon={eps:g})")


def _weights_sum(params: Mapping[str, Any], sources: list, tensor: str) -> None:
    """linear with normalize divides by the float32 sum of the weights: a zero sum makes NaN and inf."""
    import numpy as np

    from .errors import ConfigError

    if not params.get("normalize"):
        return
    total = np.float32(0)
    for _, p, _ in sources:
        total = np.float32(total + np.float32(p["weight"]))
    if total == 0:
        names = ", ".join(f"{key}: {p['weight']:g}" for key, p, _ in sources)
        raise ConfigError(f"tensor {tensor}: the weights sum to 0 ({names}) and normalize divides by their sum; "
                          "set normalize: false or change a weight")


def _gta(name: str, doc: str, *, sparsify, consensus, normalize: bool, rescale: bool, pretty: str, ref: str,
         extra: tuple[Param, ...] = ()) -> MethodSpec:
    return MethodSpec(
        name=name,
        program="gta:prepare_gta",
        doc=doc,
        per_model={
            "weight": Param("weight", float, REQUIRED, "scale of this model's task vector"),
            "density": Param("density", float, 1.0, "fraction of the task vector kept", (0, 1)),
            **{p.name: p for p in extra},
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
        base_takes_model_params=False,
        needs_base_tensor=True,
        validate=_della_ranges if sparsify == "della" else None,
    )


TIES_REF = "https://arxiv.org/abs/2306.01708"
DARE_REF = "https://arxiv.org/abs/2311.03099"
TA_REF = "https://arxiv.org/abs/2212.04089"
BREADCRUMBS_REF = "https://arxiv.org/abs/2312.06795"
DELLA_REF = "https://arxiv.org/abs/2406.11617"
RAM_REF = "https://arxiv.org/abs/2601.13572"
GAMMA = Param("gamma", float, 0.01, "fraction of the largest-magnitude entries dropped as outliers", (0, 1))
EPSILON = Param("epsilon", float, 0.15, "keep probabilities span density -/+ epsilon by per-row magnitude rank", (0, 1))

METHODS: Mapping[str, MethodSpec] = {
    "linear": MethodSpec(
        "linear",
        "basic:prepare_linear",
        "weighted average of the models (f32 accumulation)",
        per_model={"weight": Param("weight", float, REQUIRED, "weight of this model")},
        global_={"normalize": Param("normalize", bool, True, "divide by the sum of weights")},
        base="optional",
        pretty="Linear",
        validate=_weights_sum,
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
    "breadcrumbs": _gta(
        "breadcrumbs", "Model Breadcrumbs: drop the largest (gamma) and smallest entries, no consensus",
        sparsify="magnitude_outliers", consensus=None, normalize=False, rescale=False,
        pretty="Model Breadcrumbs", ref=BREADCRUMBS_REF, extra=(GAMMA,),
    ),
    "breadcrumbs_ties": _gta(
        "breadcrumbs_ties", "Model Breadcrumbs pruning + TIES sign consensus",
        sparsify="magnitude_outliers", consensus="sum", normalize=False, rescale=False,
        pretty="Model Breadcrumbs with TIES", ref=BREADCRUMBS_REF, extra=(GAMMA,),
    ),
    "della": _gta(
        "della", "DELLA: per-row magnitude-ranked random pruning + TIES sign consensus",
        sparsify="della", consensus="sum", normalize=True, rescale=True, pretty="DELLA", ref=DELLA_REF, extra=(EPSILON,),
    ),
    "della_linear": _gta(
        "della_linear", "DELLA pruning, no consensus",
        sparsify="della", consensus=None, normalize=False, rescale=True, pretty="Linear DELLA", ref=DELLA_REF,
        extra=(EPSILON,),
    ),
    "sce": MethodSpec(
        "sce",
        "sce:prepare_sce",
        "SCE: select high-variance entries, weight task vectors by mean square, erase minority signs",
        global_={
            "int8_mask": Param("int8_mask", bool, False, "storage hint; no effect on results"),
            "select_topk": Param("select_topk", float, 1.0, "fraction of the nonzero-variance entries kept", (0, 1)),
        },
        base="required",
        pretty="SCE",
        reference="https://arxiv.org/abs/2408.07990",
    ),
    "ram": MethodSpec(
        "ram",
        "ram:prepare_ram",
        "RAM: keep changes made by one model, average changes made by several",
        global_={"epsilon": Param("epsilon", float, 1e-5, "|task vector| above this counts as a change", (0, None))},
        base="required",
        pretty="Reinforced Agent Merging",
        reference=RAM_REF,
    ),
    "ramplus_tl": MethodSpec(
        "ramplus_tl",
        "ram:prepare_ramplus_tl",
        "RAM+ (tensor-local): RAM with unique changes scaled up by the tensor's shared/unique ratio (float32 result)",
        global_={
            "r": Param("r", float, 0.1, "scale of the shared/unique ratio", (0, None)),
            "alpha": Param("alpha", float, 0.2, "upper clip of the shared/unique ratio", (0, None)),
            "epsilon": Param("epsilon", float, 1e-5, "|task vector| above this counts as a change", (0, None)),
        },
        base="required",
        pretty="Reinforced Agent Merging Plus (Tensor-Local)",
        reference=RAM_REF,
        result_dtype="F32",
    ),
    "passthrough": MethodSpec(
        "passthrough",
        "basic:prepare_passthrough",
        "copy the single input tensor (optionally scaled)",
        per_model={"scale": Param("scale", float, None, "multiply the tensor by this")},
        base="none",
        pretty="Passthrough",
        one_source_per_slice=True,
    ),
    "slerp": MethodSpec(
        "slerp",
        "geometric:prepare_slerp",
        "spherical interpolation from the base (t = 0) to the other model (t = 1), float32 math",
        global_={"t": Param("t", float, REQUIRED, "interpolation factor")},
        base="required",
        pretty="SLERP",
        reference="https://en.wikipedia.org/wiki/Slerp",
        inputs=Inputs(min_inputs=2, max_inputs=2, optional="passthrough_singleton"),
        card_names_base=False,  # mergekit's card lists every model of a slerp as merged
    ),
    "nuslerp": MethodSpec(
        "nuslerp",
        "geometric:prepare_nuslerp",
        "spherical interpolation of two models (or their task vectors) at t = w2 / (w1 + w2)",
        per_model={"weight": Param("weight", float, REQUIRED, "relative weight of this model")},
        global_={
            "nuslerp_row_wise": Param("nuslerp_row_wise", bool, False, "interpolate columns (vectors along axis 0)"),
            "nuslerp_flatten": Param("nuslerp_flatten", bool, True, "interpolate the whole flattened tensor"),
        },
        base="optional",
        pretty="NuSLERP",
        inputs=Inputs(min_non_base=2, max_non_base=2, optional="passthrough_singleton"),
        base_takes_model_params=False,
    ),
    "multislerp": MethodSpec(
        "multislerp",
        "geometric:prepare_multislerp",
        "barycentric interpolation of any number of models on the hypersphere",
        per_model={"weight": Param("weight", float, REQUIRED, "weight of this model")},
        global_={
            "normalize_weights": Param("normalize_weights", bool, True, "divide the weights by their sum"),
            "eps": Param("eps", float, 1e-8, "added to norms", (0, None)),
        },
        base="optional",
        pretty="Multi-SLERP",
        reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        inputs=Inputs(min_non_base=1),
        base_takes_model_params=False,
    ),
    "karcher": MethodSpec(
        "karcher",
        "geometric:prepare_karcher",
        "equal-weight Karcher mean of all inputs on the hypersphere, scaled by their mean norm",
        global_={
            "max_iter": Param("max_iter", int, 10, "maximum iterations", (1, None)),
            "tol": Param("tol", float, 1e-5, "convergence tolerance", (0, None)),
        },
        base="optional",
        pretty="Karcher Mean",
        reference="https://arxiv.org/abs/2603.04972",
        inputs=Inputs(base_ignored=True),
    ),
    "model_stock": MethodSpec(
        "model_stock",
        "geometric:prepare_model_stock",
        "interpolate between the base and the average of >= 2 models by their task-vector angles",
        global_={"filter_wise": Param("filter_wise", bool, False, "one ratio per row instead of per tensor")},
        base="required",
        pretty="Model Stock",
        reference="https://arxiv.org/abs/2403.19522",
        inputs=Inputs(min_inputs=3, optional="base_or_skip"),
    ),
    "nearswap": MethodSpec(
        "nearswap",
        "geometric:prepare_nearswap",
        "move the base towards the other model where they are within t of each other",
        global_={"t": Param("t", float, REQUIRED, "distance scale")},
        base="required",
        pretty="NearSwap",
        reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        inputs=Inputs(min_inputs=2, max_inputs=2, optional="passthrough_base_singleton"),
    ),
    "task_median": MethodSpec(
        "task_median",
        "basic:prepare_task_median",
        "base + elementwise (lower) median of the task vectors: robust to one outlier model",
        global_={"lambda": Param("lambda", float, 1.0, "scale of the median task vector")},
        base="required",
        pretty="Task Median",
        needs_base_tensor=True,
        inputs=Inputs(min_non_base=1, optional="passthrough_base_singleton"),
    ),
    "arcee_fusion": MethodSpec(
        "arcee_fusion",
        "geometric:prepare_arcee_fusion",
        "take the other model's values where their KL-weighted change is an upper outlier (float32 result)",
        base="required",
        pretty="Arcee Fusion",
        reference="https://arcee.ai",
        result_dtype="F32",
        inputs=Inputs(min_inputs=2, max_inputs=2, optional="passthrough_singleton"),
    ),
}


def get_method(name: object, where: str) -> MethodSpec:
    """Look up a method by mergekit name, raising ConfigError naming ``where``."""
    from .errors import ConfigError, short

    if not isinstance(name, str) or name not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise ConfigError(f"{where}: unknown merge method {short(name)} (supported: {known})")
    return METHODS[name]


#: Every parameter name some method accepts. A config naming a parameter that no
#: method knows is an error (a typo); one that another method uses is ignored
#: with a warning, as mergekit ignores it.
ALL_PARAMS = frozenset(p for m in METHODS.values() for p in m.params)
