"""examples/compare_schedules.py end to end on a tiny budget, with ScheduleFree+ and WSD AdamW."""

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import compare_schedules  # noqa: E402
from lm_optim import warmup_stable_decay  # noqa: E402


def test_warmup_stable_decay():
    """Linear warmup, flat, then linear to 0 over the last 20% of the budget."""
    got = [warmup_stable_decay(s, 2, 10) for s in range(11)]
    assert got == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 1.0, 0.5, 0.0])


def test_compare_runs_every_method(tmp_path):
    """Every method trains (validation at 25..100% of the budget, finite, below the uniform
    model's ln 256 at the end) and the report names ScheduleFree+ and WSD with their tuned lr;
    with --tune-seeds the grid runs on seed 0 alone and seed 1 at the picked lr."""
    results = compare_schedules.main([
        "--steps", "12", "--seeds", "0", "1", "--tune-seeds", "0", "--lrs", "4e-3", "--plus-lrs", "1.0",
        "--methods", "sf_plus", "adamw_wsd",
        "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--batch-size", "8",
        "--block-size", "16", "--eval-points", "2", "--eval-seqs", "16", "--jobs", "1", "--out", str(tmp_path)])
    assert set(results["methods"]) == {"sf_plus", "adamw_wsd"}
    assert results["best_lr"]["sf_plus"] == 1.0
    for m, r in results["methods"].items():
        at = [r["at"][str(s)]["mean"] for s in (3, 6, 9, 12)]
        assert all(math.isfinite(v) for v in at), (m, at)
        assert at[-1] < math.log(256), (m, at)
        assert r["at"]["12"]["n"] == 2 and r["grid_final"][str(r["lr"])]["n"] == 1
    table = (tmp_path / "results.md").read_text()
    assert "ScheduleFree+" in table and "warmup-stable-decay" in table
    assert json.loads((tmp_path / "results.json").read_text())["methods"]["adamw_wsd"]["lr"] == 4e-3
