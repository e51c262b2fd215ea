"""Config loading: every shipped config parses; errors name the file and the key."""

from pathlib import Path

import pytest

from superswallow_jax.config import load_config, parse_config
from superswallow_jax.recipe import load_recipe
from superswallow_jax.errors import ConfigError
from superswallow_jax.params import Gradient

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"superswallow.yaml", "superswallow-tiny.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_loads(path):
    for stage in load_recipe(path).stages:  # an ordinary config is a recipe of one stage
        cfg = stage.config
        assert cfg.method.name == cfg.merge_method
        assert cfg.referenced_models()


def test_superswallow_recipe_parsed():
    cfg = load_config(ROOT / "configs" / "superswallow.yaml")
    assert cfg.merge_method == "dare_ties"
    assert cfg.base_model == "tokyotech-llm/Swallow-70b-instruct-hf"
    assert cfg.dtype == "BF16" and cfg.tokenizer.source == "union"
    tulu = cfg.models[1]
    w = tulu.parameters["weight"]
    assert w.rules[0].filter == "mlp.down_proj"
    assert w.rules[0].value == Gradient((0.3, 0.25, 0.25, 0.15, 0.1))
    assert w.rules[-1].filter is None and w.rules[-1].value == 0.0
    # filter rule: substring, first match wins, catch-all
    assert w.evaluate("model.layers.0.mlp.down_proj.weight", 0.0) == 0.3
    assert w.evaluate("model.layers.0.self_attn.q_proj.weight", 0.0) == 0.7
    assert w.evaluate("model.layers.0.post_attention_layernorm.weight", 0.0) == 0.0
    assert w.evaluate("model.embed_tokens.weight", 0.0) == 0.0


def test_gradient_interpolation_matches_spec_appendix_a():
    g = Gradient((0.3, 0.25, 0.25, 0.15, 0.1))
    h = Gradient((0.7, 0.25, 0.5, 0.45, 0.4))
    assert g.at(0.0) == 0.3 and g.at(1.0) == 0.1
    assert abs(h.at(20 / 79) - 0.253165) < 1e-6
    assert abs(g.at(40 / 79) - 0.247468) < 1e-6
    assert abs(h.at(40 / 79) - 0.498734) < 1e-6
    assert Gradient((0.5,)).at(0.3) == 0.5


BASE = """
models:
  - model: a
  - model: b
    parameters: {weight: 0.5}
merge_method: dare_ties
base_model: a
"""


@pytest.mark.parametrize(
    "text, needle",
    [
        (BASE.replace("dare_ties", "dare_tiez"), "merge_method"),
        (BASE.replace("weight: 0.5", "wieght: 0.5"), "models[1].parameters.wieght"),
        (BASE + "dtype: float8\n", "dtype"),
        (BASE + "tokenizer_source: union\ntokenizer: {source: base}\n", "tokenizer"),
        (BASE + "frobnicate: 1\n", "frobnicate"),
        ("merge_method: linear\n", "exactly one of models, slices"),
        (BASE.replace("merge_method: dare_ties", ""), "merge_method"),
        ("slices:\n  - sources:\n      - model: a\n        layer_range: [4, 2]\nmerge_method: passthrough\n", "slices[0].sources[0].layer_range"),
        ("slices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n      - {model: b, layer_range: [0, 3]}\nmerge_method: linear\n", "same number of layers"),
        (BASE.replace("{weight: 0.5}", "{weight: [{filter: mlp, value: 1}, 3]}"), "cannot mix"),
        ("models: [", "invalid YAML"),
        (BASE + "tokenizer: {source: union, pad_to_multiple_of: -3}\n", "pad_to_multiple_of"),
        (BASE.replace("model: b", "model: b+lora+x"), "at most one"),
        (BASE.replace("model: b", "model: b+ "), "on either side"),
    ],
)
def test_errors_name_the_key(text, needle, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert needle in msg and str(path) in msg and "\n" not in msg


def test_parameter_of_another_method_is_ignored_with_warning():
    cfg = parse_config(BASE.replace("{weight: 0.5}", "{weight: 0.5, gamma: 0.01}"))
    assert "gamma" not in cfg.models[1].parameters
    assert any("gamma" in w and "ignored" in w for w in cfg.warnings)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_parameter_precedence_and_types():
    cfg = parse_config(
        """
slices:
  - sources:
      - model: a
        layer_range: [0, 4]
      - model: b
        layer_range: [0, 4]
        parameters: {weight: 0.25}
    parameters: {weight: 0.5, normalize: false}
merge_method: linear
parameters:
  weight: 1
  normalize: true
"""
    )
    sl = cfg.slices[0]
    assert sl.sources[1].parameters["weight"].evaluate("x", 0) == 0.25
    assert sl.parameters["weight"].evaluate("x", 0) == 0.5
    assert cfg.parameters["weight"].evaluate("x", 0) == 1.0  # ints become floats
    assert cfg.parameters["normalize"].evaluate("x", 0) is True  # bools stay bools


def test_single_module_form_equals_top_level():
    top = parse_config(BASE + "parameters: {normalize: true}\n")
    mod = parse_config(
        """
modules:
  default:
    models:
      - model: a
      - model: b
        parameters: {weight: 0.5}
    parameters:
      normalize: [{filter: mlp, value: false}]
merge_method: dare_ties
base_model: a
parameters: {normalize: true}
"""
    )
    assert mod.models == top.models
    # module rules first, then the global ones (fall-through)
    assert mod.parameters["normalize"].evaluate("model.layers.0.mlp.up_proj.weight", 0) is False
    assert mod.parameters["normalize"].evaluate("model.norm.weight", 0) is True


def test_multi_module_is_a_clear_error():
    with pytest.raises(ConfigError, match="single module"):
        parse_config("modules: {text: {models: [{model: a}]}, vision: {models: [{model: a}]}}\nmerge_method: linear\n")


def test_public_api_is_curated_and_lazy():
    import subprocess
    import sys

    import superswallow_jax as ssj

    for name in ssj.__all__:
        assert getattr(ssj, name) is not None, name
    assert ssj.run_merge.__module__ == "superswallow_jax.merge" and ssj.MergeOptions().seed == 0
    out = subprocess.run([sys.executable, "-c", "import sys, superswallow_jax; print('jax' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_config_reference_documents_every_method_and_parameter():
    from superswallow_jax.registry import METHODS

    doc = (ROOT / "docs" / "config.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in doc.splitlines() if line.startswith("| `")}
    for name, spec in METHODS.items():
        assert name in rows, f"docs/config.md lacks method {name}"
        for p in spec.params:
            if p != "int8_mask" or "int8_mask" in rows[name]:
                assert f"`{p}`" in rows[name], f"docs/config.md: {name} lacks parameter {p}"
