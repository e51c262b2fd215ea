"""Strict where a mistake costs a model, lenient where mergekit is, one line for hostile input.

Each case of ``scripts/strictness_cases.py`` (which prints the before/after
table) with what it must now give: a one-line error naming the key or file,
a warning, or acceptance.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from superswallow_jax.cli import app
from superswallow_jax.config import MAX_CONFIG_BYTES, parse_config
from superswallow_jax.errors import ConfigError, ModelError, PlanError, SafetensorsError, TokenizerError
from superswallow_jax.io.reader import read_header
from superswallow_jax.merge import run_merge
from superswallow_jax.options import MergeOptions
from superswallow_jax.plan import build_plan
from superswallow_jax.tiny import make_tiny_models

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_tiny_models(tmp_path_factory.mktemp("strict"), models=["llama", "tulu", "hermes"])


def _ta(models, params: str = "weight: 1.0", method: str = "task_arithmetic", extra: str = "") -> str:
    return f"""models:
  - model: {models['llama']}
  - model: {models['tulu']}
    parameters: {{{params}}}
merge_method: {method}
base_model: {models['llama']}
dtype: bfloat16
{extra}"""


def _one_line(e: BaseException, *needles: str) -> str:
    msg = str(e)
    assert "\n" not in msg and len(msg) < 1000, msg[:300]
    for n in needles:
        assert n in msg, (n, msg)
    return msg


@pytest.mark.parametrize("value", ["-0.2", "1.5"])
def test_density_outside_its_range_is_an_error(models, value):
    with pytest.raises(ConfigError) as ei:
        build_plan(parse_config(_ta(models, f"weight: 1.0, density: {value}", "dare_ties")))
    _one_line(ei.value, "density", "outside [0, 1]", "models[1].parameters")


def test_config_json_layer_count_must_be_an_integer(models, tmp_path):
    d = tmp_path / "tulu"
    shutil.copytree(models["tulu"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = "four"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as ei:
        build_plan(parse_config(_ta(models).replace(str(models["tulu"]), str(d))))
    _one_line(ei.value, "config.json", "num_hidden_layers", "'four'")


def test_linear_weights_summing_to_zero_is_an_error(models):
    text = f"""models:
  - model: {models['llama']}
    parameters: {{weight: 0.5}}
  - model: {models['tulu']}
    parameters: {{weight: -0.5}}
merge_method: linear
dtype: bfloat16
"""
    with pytest.raises(ConfigError) as ei:
        build_plan(parse_config(text))
    _one_line(ei.value, "weights sum to 0", "normalize")
    build_plan(parse_config(text.replace("merge_method: linear", "merge_method: linear\nparameters: {normalize: false}")))


def test_a_filter_that_matches_nothing_is_a_warning_in_plan_and_merge(models, tmp_path):
    text = _ta(models, "weight: [{filter: mlp.down_prj, value: 0.3}, {value: 1.0}]")
    with build_plan(parse_config(text)) as p:
        assert any("filter 'mlp.down_prj' matches no tensor" in w for w in p.warnings)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    r = runner.invoke(app, ["plan", str(cfg)])
    assert r.exit_code == 0 and "warning: models[1].parameters.weight: filter 'mlp.down_prj'" in r.output


def test_a_key_given_twice_is_an_error():
    with pytest.raises(ConfigError) as ei:
        parse_config("merge_method: linear\nmodels: [{model: a}]\nmerge_method: ties\n")
    _one_line(ei.value, "merge_method", "given twice", "line 3", "line 1")


def test_numbers_in_quotes_are_numbers_as_in_mergekit(models, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_merge(parse_config(_ta(models, 'weight: "0.5"')), a, MergeOptions(fsync=False))
    run_merge(parse_config(_ta(models, "weight: 0.5")), b, MergeOptions(fsync=False))
    ma, mb = (json.loads((d / "merge_manifest.json").read_text()) for d in (a, b))
    assert ma["model_digest"] == mb["model_digest"]
    parse_config(_ta(models, 'weight: ["0.1", "0.9"]'))  # a gradient of quoted numbers too
    with pytest.raises(ConfigError, match="expected float"):
        build_plan(parse_config(_ta(models, 'weight: "half"')))


def test_several_yaml_documents_are_a_recipe_not_a_config():
    with pytest.raises(ConfigError) as ei:
        parse_config("merge_method: linear\nmodels: [{model: a}]\n---\nmerge_method: linear\nmodels: [{model: b}]\n")
    _one_line(ei.value, "2 YAML documents", "multi-stage", "load_recipe")


def test_deep_nesting_is_one_line_everywhere(models, tmp_path):
    with pytest.raises(ConfigError) as ei:
        parse_config("merge_method: linear\nmodels: " + "[" * 100_000)
    _one_line(ei.value, "nested too deeply")
    for name, err in (("config.json", ModelError), ("tokenizer.json", TokenizerError)):
        d = tmp_path / f"deep-{name}"
        shutil.copytree(models["tulu"], d)
        (d / name).write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
        text = _ta(models, extra="tokenizer_source: union\n").replace(str(models["tulu"]), str(d))
        with pytest.raises(err) as ei:
            build_plan(parse_config(text))
        _one_line(ei.value, name)


@pytest.mark.parametrize("where", ["weight", "dtype", "ignored"])
def test_alias_bombs_are_refused_without_expanding(models, where):
    bomb = ("x0: &a0 [1,1,1,1,1,1,1,1,1,1]\n"
            + "".join(f"x{i}: &a{i} [{', '.join(f'*a{i - 1}' for _ in range(10))}]\n" for i in range(1, 9)))
    target = {"weight": "weight: *a8", "dtype": "weight: 1.0", "ignored": "weight: 1.0, gamma: *a8"}[where]
    text = bomb + _ta(models, target)
    if where == "dtype":
        text = text.replace("dtype: bfloat16", "dtype: *a8")
    with pytest.raises(ConfigError) as ei:
        parse_config(text)
    _one_line(ei.value, "values once its YAML aliases are expanded")


def test_huge_configs_are_refused_by_size(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_text("merge_method: linear\nmodels:\n" + "".join(f"  - model: m{i}\n" for i in range(170_000)))
    assert p.stat().st_size > MAX_CONFIG_BYTES
    r = runner.invoke(app, ["plan", str(p)])
    assert r.exit_code == 2 and "limit for a config" in r.output and r.output.count("\n") == 1


def test_error_lines_do_not_echo_huge_values(models):
    with pytest.raises(ConfigError) as ei:
        parse_config(_ta(models, 'weight: [1, "' + "x" * 500_000 + '"]'))
    _one_line(ei.value, "gradient")
    with pytest.raises(ConfigError) as ei:
        build_plan(parse_config(_ta(models, 'weight: "' + "y" * 500_000 + '"')))
    _one_line(ei.value, "expected float", "...")
    with pytest.raises(ConfigError) as ei:  # over the normalized-size limit: the key is named
        parse_config(_ta(models, 'weight: [1, "' + "x" * 2_000_000 + '"]'))
    _one_line(ei.value, "models:", "byte limit")


def test_lone_surrogate_tensor_names_are_refused(tmp_path):
    header = json.dumps({"\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "s.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(SafetensorsError) as ei:
        read_header(path)
    _one_line(ei.value, "not valid UTF-8", str(path))


@pytest.mark.parametrize("victim", ["tokenizer.json", "model.safetensors", "config.json"])
def test_links_out_of_the_model_folder_are_refused(models, tmp_path, victim):
    d = tmp_path / "m"
    shutil.copytree(models["llama"], d)
    outside = tmp_path / "secret"
    shutil.copyfile(d / victim, outside)
    outside.chmod(0o600)
    (d / victim).unlink()
    os.symlink(outside, d / victim)
    text = _ta(models, extra="tokenizer_source: union\n").replace(str(models["llama"]), str(d))
    with pytest.raises((ModelError, SafetensorsError)) as ei:
        build_plan(parse_config(text))
    _one_line(ei.value, "outside the model folder", str(d / victim))


def test_hidden_size_mismatch_does_not_suggest_a_tokenizer(models, tmp_path):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "narrow"
    shutil.copytree(models["llama"], d)
    t = load_file(str(d / "model.safetensors"))
    t["model.embed_tokens.weight"] = np.ascontiguousarray(t["model.embed_tokens.weight"][:, :32])
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(PlanError) as ei:  # the hidden size differs: a tokenizer would not help
        build_plan(parse_config(_ta(models).replace(str(models["tulu"]), str(d))))
    msg = _one_line(ei.value, "model.embed_tokens.weight", "[500, 32]")
    assert "tokenizer_source" not in msg
    with pytest.raises(PlanError) as ei:  # only the vocabulary differs: the hint stays
        build_plan(parse_config(_ta(models).replace(str(models["tulu"]), str(models["hermes"]))))
    assert "tokenizer_source" in str(ei.value)


def test_a_model_path_that_is_a_file_says_so(models, tmp_path):
    f = tmp_path / "notafolder"
    f.write_text("x")
    with pytest.raises(ModelError) as ei:
        build_plan(parse_config(_ta(models).replace(str(models["tulu"]), str(f))))
    _one_line(ei.value, "is a file, expected a model folder")


def test_tokenizer_source_typo_lists_the_choices(models):
    with pytest.raises(ConfigError) as ei:
        build_plan(parse_config(_ta(models, extra="tokenizer_source: unoin\n")))
    _one_line(ei.value, "'unoin'", "base, union", str(models["llama"]))


def test_version_and_plain_flags_in_help():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.startswith("superswallow_jax ")
    r = runner.invoke(app, ["merge", "--help"])
    assert "<bool>" not in r.output and "--fsync / --no-fsync" in r.output
