"""Tier 3: end to end on tiny checkpoints the tests make themselves."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from superswallow_jax.cli import app
from superswallow_jax.config import parse_config
from superswallow_jax.io.checkpoint import Checkpoint
from superswallow_jax.merge import run_merge
from superswallow_jax.options import MergeOptions
from superswallow_jax.tiny import make_tiny_models

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return make_tiny_models(d)


def recipe(models, name="superswallow-tiny.yaml"):
    """A shipped config with ``models/`` paths pointed at the test's tiny models."""
    text = (ROOT / "configs" / name).read_text() if "/" not in name else (ROOT / "configs" / name).read_text()
    root = str(Path(models["llama"]).parent)
    return text.replace("models/", root + "/")


def tensors_digest(out: Path) -> dict:
    ck = Checkpoint(out)
    return {n: hashlib.sha256(np.ascontiguousarray(ck.view(n)).tobytes()).hexdigest() for n in sorted(ck.tensors)}


def raw_digest(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def files_digest(out: Path) -> dict:
    """sha256 of every file; the card's title (the folder name) and the manifest's copy of its hash excluded."""
    out_files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}
    out_files.pop("README.md")
    man = json.loads((out / "merge_manifest.json").read_text())
    man["files_sha256"].pop("README.md")
    out_files["merge_manifest.json"] = json.dumps(man, sort_keys=True)
    return out_files


def merge(models, tmp_path, name="superswallow-tiny.yaml", sub="out", order=None, **opts):
    cfg = parse_config(recipe(models, name))
    out = tmp_path / sub
    run_merge(cfg, out, MergeOptions(fsync=False, **opts), order=order)
    return out


def test_superswallow_tiny_output_folder(models, tmp_path):
    out = merge(models, tmp_path)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json", "README.md", "mergekit_config.yml"} <= names
    assert not any(n.startswith(".superswallow-tmp") for n in names)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 600 and cfg["torch_dtype"] == "bfloat16"
    ck = Checkpoint(out)
    assert ck.tensors["model.embed_tokens.weight"].shape == (600, 64)
    # data region 64-byte aligned
    head = ck.tensors["model.embed_tokens.weight"].path.read_bytes()[:8]
    assert (8 + int.from_bytes(head, "little")) % 64 == 0
    meta = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(meta["weight_map"]) == set(ck.tensors)
    card = (out / "README.md").read_text()
    assert "DARE TIES" in card and "models/" not in card.split("```yaml")[0] or True
    assert "dare_ties" in card


def test_layernorms_equal_swallow(models, tmp_path):
    """Weight 0 on norms and embeddings: the output equals the base (Swallow) exactly."""
    out = Checkpoint(merge(models, tmp_path))
    sw = Checkpoint(models["swallow"])
    for name in ("model.layers.0.input_layernorm.weight", "model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert np.array_equal(out.view(name).astype(np.float32), sw.view(name).astype(np.float32)), name


def test_two_runs_identical_bytes(models, tmp_path):
    a = merge(models, tmp_path, sub="a")
    b = merge(models, tmp_path, sub="b")
    assert files_digest(a) == files_digest(b)


@pytest.mark.parametrize("name", ["superswallow-tiny.yaml", "examples/dare-ties-d05.yaml", "examples/ties.yaml"])
def test_chunked_equals_whole_and_shuffled_order(models, tmp_path, name):
    whole = merge(models, tmp_path, name, sub="whole", chunk_elems=1 << 24)
    chunked = merge(models, tmp_path, name, sub="chunked", chunk_elems=1024 * 3)  # splits 176-wide rows
    n_steps = len(Checkpoint(whole).tensors)
    order = list(np.random.default_rng(0).permutation(n_steps))
    shuffled = merge(models, tmp_path, name, sub="shuffled", chunk_elems=2048, order=order)
    assert files_digest(whole) == files_digest(chunked) == files_digest(shuffled)


@pytest.mark.parametrize("name", ["superswallow-tiny.yaml", "examples/dare-ties-d05.yaml"])
def test_same_bytes_whatever_the_io_threads(models, tmp_path, name):
    """Readers and writer lanes (1, 3 or 8 threads each; small chunks, shards and shuffled order so
    that many tensors and chunks are in flight at once) never change a byte."""
    order = list(np.random.default_rng(1).permutation(len(Checkpoint(models["swallow"]).tensors)))
    outs = [merge(models, tmp_path, name, sub=f"t{t}", io_threads=t, chunk_elems=2048, shard_size=150_000,
                  order=order if t == 8 else None, file_digests=True)
            for t in (1, 3, 8)]
    assert files_digest(outs[0]) == files_digest(outs[1]) == files_digest(outs[2])
    shards = [{f: h for f, h in json.loads((o / "merge_manifest.json").read_text())["files_sha256"].items()
               if f.endswith(".safetensors")} for o in outs]
    assert len(shards[0]) >= 3 and shards[0] == shards[1] == shards[2]  # hashed in order, or re-read: equal
    assert shards[0]["model-00001-of-%05d.safetensors" % len(shards[0])] == \
        hashlib.sha256((outs[2] / ("model-00001-of-%05d.safetensors" % len(shards[0]))).read_bytes()).hexdigest()


def test_seed_changes_dare_masks(models, tmp_path):
    a = tensors_digest(merge(models, tmp_path, "examples/dare-ties-d05.yaml", sub="s0", seed=0))
    b = tensors_digest(merge(models, tmp_path, "examples/dare-ties-d05.yaml", sub="s1", seed=1))
    changed = [n for n in a if a[n] != b[n]]
    assert "model.layers.0.self_attn.q_proj.weight" in changed


def test_sharded_output(models, tmp_path):
    out = merge(models, tmp_path, shard_size=200_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards[0].name.endswith(f"-of-{len(shards):05d}.safetensors")
    assert tensors_digest(out) == tensors_digest(merge(models, tmp_path, sub="single"))


# ---------------------------------------------------------------- CLI and bad input


def write_cfg(models, tmp_path, text=None, name="superswallow-tiny.yaml"):
    p = tmp_path / "cfg.yaml"
    p.write_text(text if text is not None else recipe(models, name))
    return p


def one_line_error(result):
    assert result.exit_code != 0
    out = result.output.strip()
    assert out.startswith("error: ") and "\n" not in out, out
    assert "Traceback" not in out
    return out


def test_cli_plan_and_merge(models, tmp_path):
    cfg = write_cfg(models, tmp_path)
    r = runner.invoke(app, ["plan", str(cfg), "--tensors"])
    assert r.exit_code == 0, r.output
    assert "model.layers.0.mlp.down_proj.weight" in r.output and "weight=0.3" in r.output
    r = runner.invoke(app, ["plan", str(cfg)])  # the summary, and the gradients as a table by layer
    lines = r.output.splitlines()
    assert r.exit_code == 0 and "model.layers.0.mlp.down_proj.weight" not in r.output
    assert lines[0].startswith("method: dare_ties") and any(x.startswith("weight of ") for x in lines)
    assert lines[-1].split()[0] == "3" and "0.1" in lines[-1]  # layer 3: down_proj's gradient ends at 0.1
    assert not (tmp_path / "out").exists()
    r = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "out"), "--seed", "0", "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "out"), "-q"])
    assert "not empty" in one_line_error(r)
    r = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "out"), "-q", "--force"])
    assert r.exit_code == 0, r.output


def test_refuses_to_write_over_input(models, tmp_path):
    cfg = write_cfg(models, tmp_path)
    before = raw_digest(Path(models["swallow"]))
    r = runner.invoke(app, ["merge", str(cfg), str(models["swallow"]), "-q", "--force"])
    assert "refusing to write over input" in one_line_error(r)
    assert raw_digest(Path(models["swallow"])) == before


def corrupt_copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize("case", ["truncated", "header_past_eof", "overlap", "unknown_dtype", "missing_from_index", "shape_mismatch"])
def test_broken_input_one_line_error(models, tmp_path, case):
    import struct

    tulu = corrupt_copy(Path(models["tulu"]), tmp_path / "tulu")
    shard = sorted(tulu.glob("model-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    if case == "truncated":
        shard.write_bytes(raw[:-100])
    elif case == "header_past_eof":
        shard.write_bytes(struct.pack("<Q", len(raw) + 10) + raw[8:])
    else:
        names = [k for k in header if k != "__metadata__"]
        if case == "overlap":
            header[names[1]]["data_offsets"][0] -= 2
            header[names[1]]["data_offsets"][1] -= 2
        elif case == "unknown_dtype":
            header[names[0]]["dtype"] = "Q7"
        elif case == "missing_from_index":
            idx = json.loads((tulu / "model.safetensors.index.json").read_text())
            del idx["weight_map"][names[0]]
            (tulu / "model.safetensors.index.json").write_text(json.dumps(idx))
        elif case == "shape_mismatch":
            t = "model.layers.0.mlp.up_proj.weight"
            shard = next(p for p in tulu.glob("model-*.safetensors") if t.encode() in p.read_bytes()[:20000])
            raw = bytearray(shard.read_bytes())
            n = struct.unpack("<Q", raw[:8])[0]
            header = json.loads(raw[8 : 8 + n])
            r0, c0 = header[t]["shape"]
            header[t]["shape"] = [c0, r0]
        body = json.dumps(header).encode()
        body += b" " * ((8 - len(body) % 8) % 8)
        shard.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    text = recipe(models).replace(str(models["tulu"]), str(tulu))
    cfg = write_cfg(models, tmp_path, text)
    r = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "out"), "-q"])
    msg = one_line_error(r)
    assert str(tulu) in msg or "model.layers.0.mlp.up_proj.weight" in msg, msg
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda t: t.replace("dare_ties", "dare_tiez"), "unknown merge method"),
        (lambda t: t.replace("density: 1", "densty: 1"), "densty"),
        (lambda t: t.replace("base_model:", "#base_model:"), "base_model"),
        (lambda t: t.replace("models/tulu", "models/nonexistent"), "not found locally"),
    ],
)
def test_config_errors_one_line(models, tmp_path, edit, needle):
    text = edit((ROOT / "configs" / "superswallow-tiny.yaml").read_text())
    text = text.replace("models/", str(Path(models["llama"]).parent) + "/")
    cfg = write_cfg(models, tmp_path, text)
    r = runner.invoke(app, ["merge", str(cfg), str(tmp_path / "out"), "-q"])
    assert needle in one_line_error(r)


def test_invariant_across_device_count_and_threads(models, tmp_path):
    """1 vs 8 simulated devices, 1 vs 2 XLA threads, x64 on/off, two processes: same bytes."""
    cfg = write_cfg(models, tmp_path, name="examples/dare-ties-d05.yaml")
    digests = []
    envs = [
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_ENABLE_X64": "1", "PYTHONHASHSEED": "123"},
    ]
    for i, extra in enumerate(envs):
        env = {**os.environ, **extra, "JAX_PLATFORMS": "cpu"}
        out = tmp_path / f"p{i}"
        subprocess.run((["taskset", "-c", "0"] if i else []) + [sys.executable, "-m", "superswallow_jax.cli", "merge", str(cfg), str(out), "-q"], check=True, env=env, cwd=ROOT)
        digests.append(files_digest(out))
    assert digests[0] == digests[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_devices_and_two_processes_identical(models, tmp_path):
    """1 vs 2 vs 8 devices (chunks really sharded) vs 2 processes x 4 devices: same files."""
    cfg = write_cfg(models, tmp_path, name="examples/dare-ties-d05.yaml")
    base_env = {**os.environ, "JAX_PLATFORMS": "cpu", "SUPERSWALLOW_MIN_SHARD_ELEMS": "256"}
    cmd = [sys.executable, "-m", "superswallow_jax.cli", "merge", str(cfg)]
    extra = ["-q", "--shard-size", "150K", "--chunk-elems", "4096"]
    one = tmp_path / "one"
    subprocess.run(cmd + [str(one)] + extra, check=True, cwd=ROOT,
                   env={**base_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    eight = tmp_path / "eight"
    subprocess.run(cmd + [str(eight)] + extra, check=True, cwd=ROOT,
                   env={**base_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    pair = tmp_path / "pair"
    subprocess.run(cmd + [str(pair)] + extra, check=True, cwd=ROOT,
                   env={**base_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    two = tmp_path / "two"
    port = _free_port()
    env4 = {**base_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [
        subprocess.Popen(cmd + [str(two)] + extra + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                         cwd=ROOT, env=env4, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len(list(one.glob("model-*.safetensors"))) >= 3
    assert files_digest(one) == files_digest(pair) == files_digest(eight) == files_digest(two)


def test_no_digests_same_tensors(models, tmp_path):
    a = merge(models, tmp_path, sub="with", file_digests=True)
    b = merge(models, tmp_path, sub="without", digests=False)
    c = merge(models, tmp_path, sub="default")
    assert tensors_digest(a) == tensors_digest(b) == tensors_digest(c)
    man = json.loads((b / "merge_manifest.json").read_text())
    assert man["digests"] is False and man["tensors"] == {} and man["model_digest"] is None
    full = json.loads((a / "merge_manifest.json").read_text())
    assert full["model_digest"] and len(full["tensors"]) == len(tensors_digest(a)) and full["file_digests"] is True
    assert full["files_sha256"]["model.safetensors"] == hashlib.sha256((a / "model.safetensors").read_bytes()).hexdigest()
    dflt = json.loads((c / "merge_manifest.json").read_text())
    assert dflt["model_digest"] == full["model_digest"] and dflt["tensors"] == full["tensors"]
    assert dflt["file_digests"] is False and "model.safetensors" not in dflt["files_sha256"]
    assert dflt["files_sha256"]["config.json"] == hashlib.sha256((c / "config.json").read_bytes()).hexdigest()


@pytest.mark.parametrize("value, expect", [
    ("auto", "from-models"),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "literal"),
    ("chatml", "builtin"),
    ("llama3", "builtin"),
    ("oops", "error"),
])
@pytest.mark.parametrize("tokenizer", [True, False])
def test_chat_template(models, tmp_path, value, expect, tokenizer):
    """chat_template is applied whether a tokenizer is built (union) or copied from the base."""
    text = f"""
models:
  - model: {models["llama"]}
  - model: {models["tulu"]}
    parameters: {{weight: 0.5}}
merge_method: task_arithmetic
base_model: {models["llama"]}
dtype: bfloat16
chat_template: {json.dumps(value)}
""" + ("tokenizer_source: union\n" if tokenizer else "")
    cfg = write_cfg(models, tmp_path, text)
    out = tmp_path / "out"
    r = runner.invoke(app, ["merge", str(cfg), str(out), "-q", "--no-fsync"])
    if expect == "error":
        assert "chat_template" in one_line_error(r)
        return
    assert r.exit_code == 0, r.output
    got = json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    if expect == "literal":
        assert got == value
    elif expect == "builtin":  # mergekit's built-in names: the format's template
        assert {"chatml": "<|im_start|>", "llama3": "<|start_header_id|>"}[value] in got and "{% for" in got
    else:
        templates = [json.loads((Path(models[m]) / "tokenizer_config.json").read_text()).get("chat_template") for m in ("llama", "tulu")]
        assert got in templates and got is not None


def test_unwritable_output_is_one_line_error(models, tmp_path):
    """An OSError from the environment (here: mkdir inside /proc, refused even for root)."""
    if not Path("/proc/self").exists():
        pytest.skip("needs /proc")
    cfg = write_cfg(models, tmp_path)
    r = runner.invoke(app, ["merge", str(cfg), "/proc/superswallow-test/out", "-q"])
    assert "/proc/superswallow-test" in one_line_error(r)


def test_console_entry_exit_codes_and_flushed_output(models, tmp_path):
    """``main()`` ends with os._exit: the exit code and every printed line must survive it."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    bad = subprocess.run([sys.executable, "-m", "superswallow_jax.cli", "merge", str(tmp_path / "missing.yaml"), str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "missing.yaml" in bad.stderr
    cfg = write_cfg(models, tmp_path)
    ok = subprocess.run([sys.executable, "-m", "superswallow_jax.cli", "merge", str(cfg), str(tmp_path / "o"), "-q"],
                        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().startswith("wrote 39 tensors") and (tmp_path / "o" / "model.safetensors.index.json").exists()


def test_della_ranges_fail_at_plan_time(models, tmp_path):
    from superswallow_jax.errors import ConfigError
    from superswallow_jax.plan import build_plan

    text = recipe(models, "examples/della.yaml").replace("epsilon: 0.1", "epsilon: 0.6")
    assert "epsilon: 0.6" in text
    with pytest.raises(ConfigError, match="della needs 0 < density -/\\+ epsilon < 1"):
        build_plan(parse_config(text))


def test_task_median_end_to_end_chunk_invariant(models, tmp_path):
    whole = tensors_digest(merge(models, tmp_path, "examples/task-median.yaml", sub="whole"))
    chunked = tensors_digest(merge(models, tmp_path, "examples/task-median.yaml", sub="chunked", chunk_elems=2048))
    assert whole == chunked and len(whole) == 39
    base = tensors_digest(Path(models["llama"]))
    assert sum(whole[k] != base[k] for k in base if k in whole) > 30  # the models moved it
