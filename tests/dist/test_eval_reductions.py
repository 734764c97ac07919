"""``megatron-pwdpo eval`` scores with the reduction the run trained with: on the same
checkpoint a summed and a token-mean evaluation give different rewards, and each gives
the held-out loss that the training loop logged for a run trained with that reduction."""

import json

import pytest
from conftest import TINY, run_cli

from megatron_pwdpo.cli import DEFAULT_CONFIG

pytestmark = pytest.mark.dist

EVAL_DATA = ["data.hh_mode=paired", "data.eval_rows=24", "loss.name=pointwise_dpo"]


def _logged_eval_loss(run_dir) -> float:
    """The eval loss the training loop logged after its last step."""
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in entries if e.get("split") == "eval" and e.get("stage") == "pointwise_dpo"]
    return evals[-1]["loss"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs from the same initial weights (= their reference), one per reduction."""
    root = tmp_path_factory.mktemp("reductions")
    out = {}
    for reduction in ("sum", "mean"):
        run_dir = root / reduction
        args = ["train", *TINY, *EVAL_DATA, "train.sft_steps=0", "train.steps=2"]
        args += ["train.lr=3e-3", f"loss.logp_reduction={reduction}", f"run_dir={run_dir}"]
        run_cli(args)
        out[reduction] = run_dir
    return out


def _eval(runs, reduction, out):
    ref = runs["sum"] / "checkpoints" / "reference"
    args = ["eval", "--config", str(DEFAULT_CONFIG), "--reference", str(ref)]
    for name, run_dir in runs.items():
        args += ["--policy", f"{name}={run_dir / 'checkpoints'}"]
    proc = run_cli(
        [*args, "--out", str(out), *TINY, *EVAL_DATA, f"loss.logp_reduction={reduction}"]
    )
    return json.loads(out.read_text()), proc.stdout


def test_each_reduction_matches_its_training_loss(runs, tmp_path):
    by_sum, printed = _eval(runs, "sum", tmp_path / "sum.json")
    by_mean, _ = _eval(runs, "mean", tmp_path / "mean.json")
    assert by_sum["sum"]["reduction"] == "sum" and by_mean["mean"]["reduction"] == "mean"
    # each evaluation reproduces the loss its run's training loop logged on these rows
    assert by_sum["sum"]["loss"] == pytest.approx(_logged_eval_loss(runs["sum"]), rel=1e-4)
    assert by_mean["mean"]["loss"] == pytest.approx(_logged_eval_loss(runs["mean"]), rel=1e-4)
    # the same checkpoint scored the other way gives other numbers
    for policy in ("sum", "mean"):
        a, b = by_sum[policy], by_mean[policy]
        assert a["loss"] != pytest.approx(b["loss"], rel=1e-3)
        assert a["pair_margin"] != pytest.approx(b["pair_margin"], rel=1e-2)
        assert a["reward_desirable"] != pytest.approx(b["reward_desirable"], rel=1e-2)
        # both evaluations report the accuracy under both reductions, identically
        assert a["pair_accuracy_sum"] == b["pair_accuracy_sum"] == a["pair_accuracy"]
        assert a["pair_accuracy_mean"] == b["pair_accuracy_mean"] == b["pair_accuracy"]
    # intervals and the length-only rules are written, and printed
    lb = by_sum["length_baselines"]
    assert lb["pairs"] == by_sum["sum"]["pairs"] > 0
    assert lb["shorter_wins"] + lb["longer_wins"] == pytest.approx(1.0)
    assert (
        lb["chosen_shorter_pairs"] + lb["chosen_longer_pairs"] + lb["equal_length_pairs"]
        == (lb["pairs"])
    )
    for name in ("sum", "mean"):
        lo, hi = by_sum[name]["pair_accuracy_ci95"]
        assert lo <= by_sum[name]["pair_accuracy"] <= hi and hi - lo > 0
    rules = {f"{p} - {r}" for p in ("sum", "mean") for r in ("shorter_wins", "longer_wins")}
    assert set(by_sum["paired_differences"]) == {"sum - mean", *rules}
    assert by_sum["bootstrap"]["resamples"] >= 1000
    assert "shorter wins" in printed and "pair accuracy (sum)" in printed
