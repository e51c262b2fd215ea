"""MergeOptions: one frozen model of a merge's options; the CLI's merge flags are generated from it."""

from __future__ import annotations

from dataclasses import fields

import pytest
from typer.testing import CliRunner

from superswallow_jax import cli
from superswallow_jax.errors import ConfigError
from superswallow_jax.options import MergeOptions


def test_every_field_is_a_merge_flag_with_its_help():
    text = CliRunner().invoke(cli.app, ["merge", "--help"], terminal_width=400).output
    flags = MergeOptions.cli_flags()
    assert [f.field for f in flags] == [f.name for f in fields(MergeOptions)]
    for f in flags:
        assert f.flag in text, f.flag
        assert " ".join(f.help.split())[:40] in " ".join(text.split()), f.field
        if f.type is bool:
            assert f"--no-{f.flag[2:]}" in text


def test_command_line_values_become_options(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cfg, out, opts, **kw):
        seen["opts"] = opts
        raise SystemExit(0)

    monkeypatch.setattr("superswallow_jax.merge.run_merge", fake_run)
    cfg = tmp_path / "c.yaml"
    (tmp_path / "m").mkdir()
    cfg.write_text(f"models:\n  - model: {tmp_path / 'm'}\n    parameters: {{weight: 1}}\nmerge_method: linear\n")
    args = ["merge", str(cfg), str(tmp_path / "out"), "--seed", "7", "--shard-size", "2M", "--out-dtype", "float32",
            "--pass-cache-mb", "3", "--no-fsync", "--file-digests", "--no-input-digests", "--io-threads", "2",
            "--chunk-elems", "4096", "--force"]
    CliRunner().invoke(cli.app, args)
    assert seen["opts"] == MergeOptions(seed=7, shard_size=2_000_000, out_dtype="F32", pass_cache_bytes=3 << 20,
                                        fsync=False, file_digests=True, hash_inputs=False, io_threads=2,
                                        chunk_elems=4096, force=True)
    assert seen["opts"].recorded() == {"seed": 7, "shard_size": 2_000_000, "out_dtype": "F32"}


@pytest.mark.parametrize("args, needle", [
    (["--out-dtype", "int4"], "--out-dtype: unsupported dtype 'int4'"),
    (["--shard-size", "lots"], "shard"),
    (["--io-threads", "0"], "io threads: must be an integer in [1, 256]"),
    (["--chunk-elems", "-5"], "chunk elements: must be a positive integer"),
])
def test_bad_values_are_one_line_errors(tmp_path, args, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models:\n  - model: a\nmerge_method: linear\n")
    r = CliRunner().invoke(cli.app, ["merge", str(cfg), str(tmp_path / "out"), *args])
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output
    assert r.output.strip().count("\n") == 0


def test_defaults_equal_the_dataclass_defaults():
    parsed = MergeOptions.from_cli({f.field: f.default for f in MergeOptions.cli_flags()})
    assert parsed == MergeOptions()
    with pytest.raises(ConfigError):
        MergeOptions.from_cli({"out_dtype": "complex64"})
