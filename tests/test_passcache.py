"""The between-pass cache: budget accounting (tier 1) and output bytes that never depend on it (tier 3)."""

import numpy as np
import pytest

from superswallow_jax import execute as ex
from superswallow_jax.passcache import PassCache

from .test_e2e import files_digest, merge, models  # noqa: F401  (session fixture)


def test_get_keeps_within_budget_and_take_removes():
    c = PassCache(budget=10_000)
    calls = []

    def make(n):
        calls.append(n)
        return np.zeros(n, np.uint8)

    a = c.get(("a",), lambda: make(6000))
    assert c.get(("a",), lambda: make(1)) is a and c.used == 6000 and c.hits == 1
    b = c.get(("b",), lambda: make(6000))  # does not fit next to "a": computed, not kept
    assert not c.has(("b",)) and c.used == 6000
    assert c.get(("b",), lambda: make(6000)) is not b
    assert c.take(("a",), lambda: make(2)) is a and c.used == 0 and not c.has(("a",))
    assert c.take(("a",), lambda: make(3)).size == 3 and not c.has(("a",))  # a miss is not kept
    assert calls == [6000, 6000, 6000, 3]


def test_share_caps_one_kind_and_leaves_room_for_others():
    c = PassCache(budget=10_000)
    for i in range(4):
        c.get(("inputs", i), lambda: np.zeros(2000, np.uint8), share=0.5)
    assert [c.has(("inputs", i)) for i in range(4)] == [True, True, False, False]  # 4000 <= 5000 < 6000
    for i in range(4):
        c.get(("mask", i), lambda: np.zeros(1500, np.uint8))
    assert [c.has(("mask", i)) for i in range(4)] == [True, True, True, True] and c.used == 10_000
    c.take(("inputs", 0), lambda: None)
    c.get(("inputs", 2), lambda: np.zeros(2000, np.uint8), share=0.5)  # room again for its kind
    assert c.has(("inputs", 2)) and c.used == 10_000


def test_discard_forgets_one_kind():
    c = PassCache(budget=10_000)
    for i in range(3):
        c.get(("keys", i), lambda: np.zeros(1000, np.uint8))
    c.get(("inputs", 0), lambda: np.zeros(2000, np.uint8))
    c.discard("keys")
    assert c.used == 2000 and not any(c.has(("keys", i)) for i in range(3)) and c.has(("inputs", 0))
    c.get(("keys", 0), lambda: np.zeros(8000, np.uint8))  # its room is back
    assert c.has(("keys", 0)) and c.used == 10_000


def test_lists_count_every_array_and_zero_budget_keeps_nothing():
    c = PassCache(budget=3000)
    c.get(("x",), lambda: [np.zeros(1000, np.uint8), None, np.zeros(500, np.float32)])
    assert c.used == 3000
    z = PassCache()
    z.get(("x",), lambda: np.zeros(1, np.uint8))
    assert z.used == 0 and not z.has(("x",))


MULTI_PASS = [
    "examples/dare-ties-d05.yaml", "examples/dare-linear-d05.yaml", "examples/ties.yaml", "examples/della.yaml",
    "examples/breadcrumbs-ties.yaml", "examples/breadcrumbs.yaml", "examples/sce.yaml", "examples/karcher.yaml", "examples/arcee-fusion.yaml",
]


@pytest.mark.parametrize("name", MULTI_PASS)
def test_cache_budget_never_changes_bytes(models, tmp_path, monkeypatch, name):  # noqa: F811
    hits = []

    class Counting(PassCache):
        def take(self, key, make):
            before = self.hits
            value = super().take(key, make)
            hits.append(self.hits - before)
            return value

    monkeypatch.setattr(ex, "PassCache", Counting)
    # chunks of 2048 elements: several per tensor; 40 KB keeps some steps whole, others in part
    outs = {}
    for budget in (0, 40_000, 1 << 40):
        hits.clear()
        outs[budget] = merge(models, tmp_path, name, sub=f"b{budget}", chunk_elems=2048, pass_cache_bytes=budget)
        if budget == 0:
            assert sum(hits) == 0
        else:
            assert sum(hits) > 0  # the merge pass did use kept values
    assert files_digest(outs[0]) == files_digest(outs[40_000]) == files_digest(outs[1 << 40])


def test_negative_budget_is_a_one_line_cli_error(models, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from superswallow_jax.cli import app

    from .test_e2e import recipe

    cfg = tmp_path / "c.yaml"
    cfg.write_text(recipe(models, "examples/dare-ties-d05.yaml"))
    res = CliRunner().invoke(app, ["merge", str(cfg), str(tmp_path / "out"), "--pass-cache-mb", "-1", "-q"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == ["error: pass cache budget must be >= 0 bytes, got -1048576 (--pass-cache-mb)"]
    assert not (tmp_path / "out").exists()
