"""``verify`` checks the whole folder: each tampering is caught, named, and exits 1; a true folder exits 0."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from superswallow_jax.cli import app
from superswallow_jax.config import parse_config
from superswallow_jax.merge import run_merge
from superswallow_jax.options import MergeOptions
from superswallow_jax.tiny import make_tiny_models

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    models = make_tiny_models(tmp / "models", models=["swallow", "tulu"])
    cfg = tmp / "cfg.yaml"
    cfg.write_text((ROOT / "configs" / "superswallow-tiny.yaml").read_text().replace("models/", f"{tmp / 'models'}/"))
    out = tmp / "clean" / "out"
    run_merge(parse_config(cfg.read_text()), out, MergeOptions(fsync=False, shard_size=200_000))
    assert models
    return cfg, out


def _copy(merged, tmp_path) -> tuple[Path, Path]:
    cfg, out = merged
    d = tmp_path / "out"  # the same folder name as the clean merge: it titles the model card
    shutil.copytree(out, d)
    return cfg, d


def _verify(cfg: Path, out: Path, *extra: str):
    return runner.invoke(app, ["verify", str(cfg), str(out), "-q", *extra])


def test_a_true_folder_verifies(merged):
    cfg, out = merged
    r = _verify(cfg, out)
    assert r.exit_code == 0, r.output
    assert "0 differences" in r.output and "39 of 39 tensors match" in r.output


def _edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _swap_ids(tj: dict) -> None:
    v = tj["model"]["vocab"]
    v["▁the"], v["▁of"] = v["▁of"], v["▁the"]


def _header_seed(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    head = raw[8:8 + n].decode()
    assert '"seed":"0"' in head
    raw[8:8 + n] = head.replace('"seed":"0"', '"seed":"7"').encode()
    path.write_bytes(bytes(raw))


def _flip_tensor_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40
    path.write_bytes(bytes(raw))


def _zero_digests(path: Path) -> None:
    def change(m):
        m["files_sha256"] = {k: "0" * 64 for k in m["files_sha256"]}

    _edit_json(path, change)


TAMPERINGS = {
    "config rope_theta": ("config.json", lambda p: _edit_json(p, lambda c: c.update(rope_theta=500000.0)), "DIFFERS config.json"),
    "two token ids swapped": ("tokenizer.json", lambda p: _edit_json(p, _swap_ids), "DIFFERS tokenizer.json"),
    "chat template": ("tokenizer_config.json", lambda p: _edit_json(p, lambda c: c.update(chat_template="{{ x }}")),
                      "DIFFERS tokenizer_config.json"),
    "config deleted": ("config.json", Path.unlink, "MISSING config.json"),
    "tokenizer deleted": ("tokenizer.json", Path.unlink, "MISSING tokenizer.json"),
    "header metadata": ("model-00001-of-00003.safetensors", _header_seed, "DIFFERS model-00001-of-00003.safetensors: header"),
    "tensor byte": ("model-00003-of-00003.safetensors", _flip_tensor_byte, "MISMATCH lm_head.weight"),
    "manifest digests zeroed": ("merge_manifest.json", _zero_digests, "DIFFERS config.json: its sha256 is not the one"),
    "model card": ("README.md", lambda p: p.write_text(p.read_text() + "x"), "DIFFERS README.md"),
    "index": ("model.safetensors.index.json", lambda p: _edit_json(p, lambda i: i["metadata"].update(total_size=1)),
              "DIFFERS model.safetensors.index.json"),
}


@pytest.mark.parametrize("case", sorted(TAMPERINGS))
def test_each_tampering_is_caught_and_named(merged, tmp_path, case):
    cfg, out = _copy(merged, tmp_path)
    name, tamper, needle = TAMPERINGS[case]
    tamper(out / name)
    r = _verify(cfg, out)
    assert r.exit_code == 1, r.output
    assert needle in r.output, r.output
    assert "does not match" in r.output


def test_tensors_pattern_matching_nothing_is_an_error(merged):
    cfg, out = merged
    r = _verify(cfg, out, "--tensors", "no_such_tensor")
    assert r.exit_code == 2 and "matches no tensor" in r.output


def test_tensors_pattern_checks_only_those_tensors_but_every_file(merged, tmp_path):
    cfg, out = _copy(merged, tmp_path)
    r = _verify(cfg, out, "--tensors", "mlp")
    assert r.exit_code == 0 and "12 of 12 tensors match" in r.output, r.output
    (out / "generation_config.json").write_text("{}")
    r = _verify(cfg, out, "--tensors", "mlp")
    assert r.exit_code == 1 and "DIFFERS generation_config.json" in r.output


def test_out_dtype_and_seed_are_replayed_from_the_manifest(merged, tmp_path):
    cfg, _ = merged
    out = tmp_path / "out"
    dare = ROOT / "configs" / "examples" / "dare-ties-d05.yaml"
    text = dare.read_text().replace("models/", str(Path(cfg.read_text().split("model: ")[1].split("/swallow")[0])) + "/")
    c2 = tmp_path / "dare.yaml"
    c2.write_text(text)
    run_merge(parse_config(text), out, MergeOptions(fsync=False, seed=3, out_dtype="F32"))
    man = json.loads((out / "merge_manifest.json").read_text())
    assert man["options"] == {"seed": 3, "shard_size": 5_000_000_000, "out_dtype": "F32"}
    r = _verify(c2, out)
    assert r.exit_code == 0, r.output
    r = _verify(c2, out, "--seed", "4")
    assert r.exit_code == 1 and "MISMATCH" in r.output
