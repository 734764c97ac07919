"""`megatron-pwdpo experiment` end to end on a tiny budget: every method runs, is
evaluated on the same held-out pairs, and lands in the table, the JSON and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, run_cli

from megatron_pwdpo.evaluation.evaluate import rankdata, reward_metrics, spearman
from megatron_pwdpo.evaluation.experiment import METHODS, OFFICIAL

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "reproduce" / "tiny.yaml"
# every kind of run and every eval group, but not every method (each is a few processes;
# test_example_configs validates every run of the full experiment)
TESTED = ["sft", "kto", "ulma", "unlikelihood", "sft_continued", "base", "official_dpo"]
TESTED += ["official_ulma"]


def test_spearman_and_reward_metrics():
    assert rankdata(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    x = np.array([0.1, 0.4, 0.2, 0.9])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    ids = ["p-000001-c", "p-000001-r", "p-000002-c", "p-000002-r"]
    labels = np.array([1.0, 0.0, 1.0, 0.0])
    m = reward_metrics(ids, labels, np.array([0.2, -0.1, -0.3, 0.0]))
    assert m["pairs"] == 2
    assert m["pair_accuracy"] == 0.5  # pair 1 right, pair 2 wrong
    assert m["pair_margin"] == pytest.approx((0.3 - 0.3) / 2)
    assert m["accuracy"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)  # a zero reward is a tie


@pytest.mark.dist
def test_experiment_tiny_budget(tmp_path):
    run_dir = tmp_path / "exp"
    overrides = [
        *TINY,
        f"experiment.run_dir={run_dir}",
        "experiment.seeds=[7]",
        "experiment.sft_steps=2",
        "experiment.steps=2",
        "experiment.eval_pairs=8",
        f"experiment.methods=[{','.join(TESTED)}]",
        "experiment.red_team.steps=2",
        "experiment.red_team.records=64",
        "experiment.red_team.eval_rows=16",
    ]
    run_cli(["experiment", "--config", str(CONFIG), *overrides], timeout=900)
    results = json.loads((run_dir / "results.json").read_text())
    summary = results["summary"]
    assert set(TESTED) | {"red_team", "shorter_wins", "longer_wins"} <= set(summary)
    evals = results["per_seed"]["7"]["eval"]
    assert set(evals) == {"hh", "official_mean", "official_sum", "red_team"}
    scored = {m: g[m] for name, g in evals.items() if name != "red_team" for m in g}
    policies = {m: v for m, v in scored.items() if m in METHODS}
    assert set(policies) == set(TESTED)
    # the same held-out pairs for every method and reference, pairs even for the unpaired
    assert len({(m["rows"], m["pairs"]) for m in policies.values()}) == 1
    assert policies["kto"]["pairs"] > 0
    lengths = evals["hh"]["length_baselines"]
    assert evals["official_mean"]["length_baselines"] == lengths
    assert lengths["pairs"] == policies["kto"]["pairs"]
    for method, m in policies.items():
        assert np.isfinite(m["nll"])
        official_mean = method == "base" or method in OFFICIAL and method != "official_dpo"
        want = "mean" if official_mean else "sum"
        assert m["reduction"] == want, method
        if method not in ("sft", "base"):
            lo, hi = m["pair_accuracy_ci95"]
            assert 0.0 <= lo <= m["pair_accuracy"] <= hi <= 1.0
            assert summary[method]["minus_shorter_wins"]["n"] == 1
    assert np.isfinite(results["per_seed"]["7"]["eval"]["red_team"]["pointwise_dpo"]["spearman"])
    table = (run_dir / "results.md").read_text()
    for method in [*TESTED, "shorter_wins", "longer_wins"]:
        assert f"| {method} |" in table
    assert "Spearman" in table
    png = (run_dir / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    # a repeated command skips the finished runs and rewrites the outputs
    proc = run_cli(["experiment", "--config", str(CONFIG), *overrides], timeout=300)
    assert proc.stdout.count("already done") == len(TESTED) + 1  # and the red-team run
    assert (run_dir / "results.md").read_text().startswith("Held-out")
