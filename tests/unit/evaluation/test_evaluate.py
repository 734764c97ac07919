"""The statistics of ``megatron-pwdpo eval`` on hand-made numbers: bootstrap intervals,
length-only rules and strata, paired differences, both reductions, the held-out loss."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from megatron_pwdpo.config import LossConfig
from megatron_pwdpo.evaluation.evaluate import (
    BOOTSTRAP_RESAMPLES,
    ci95,
    length_baselines,
    paired_differences,
    reward_metrics,
    score_policies,
    summary_lines,
)

IDS = [f"p-{i:06d}-{side}" for i in range(4) for side in "cr"]
LABELS = np.array([1.0, 0.0] * 4)
# response tokens: chosen shorter in pairs 0 and 1, longer in pair 2, equal in pair 3
TOKENS = np.array([3, 5, 2, 9, 7, 4, 6, 6], dtype=np.float64)


def test_ci95_is_a_fixed_seed_percentile_bootstrap():
    rng = np.random.default_rng(5)
    values = (rng.random(400) < 0.6).astype(np.float64)
    lo, hi = ci95(values)
    assert ci95(values) == [lo, hi]  # the same resamples every call
    assert lo < values.mean() < hi
    half = 1.96 * values.std() / math.sqrt(values.size)  # the normal approximation
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    assert ci95(np.full(10, 0.5)) == [0.5, 0.5]
    assert ci95(np.zeros(0)) is None
    assert BOOTSTRAP_RESAMPLES >= 1000


def test_length_rules_and_strata():
    lb = length_baselines(IDS, TOKENS)
    assert lb["pairs"] == 4
    assert (lb["chosen_shorter_pairs"], lb["chosen_longer_pairs"], lb["equal_length_pairs"]) == (
        2,
        1,
        1,
    )
    assert lb["shorter_wins"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert lb["longer_wins"] == pytest.approx(1 - lb["shorter_wins"])
    # rewards right on pairs 0, 2 and 3, wrong on pair 1
    rewards = np.array([1.0, 0.0, -1.0, 0.0, 0.5, 0.1, 0.2, -0.2])
    m = reward_metrics(IDS, LABELS, rewards, tokens=TOKENS, other_rewards={"x": -rewards})
    assert m["pair_accuracy"] == pytest.approx(0.75)
    assert m["pair_accuracy_chosen_shorter"] == pytest.approx(0.5)  # pairs 0 (right), 1
    assert m["pair_accuracy_chosen_longer"] == pytest.approx(1.0)  # pair 2
    assert m["pair_accuracy_x"] == pytest.approx(0.25)
    lo, hi = m["pair_accuracy_ci95"]
    assert 0.0 <= lo <= 0.75 <= hi <= 1.0
    assert m["pair_margin"] == pytest.approx((1.0 - 1.0 + 0.4 + 0.4) / 4)


def test_paired_differences():
    right = np.array([1.0, 0.0] * 4)
    wrong = -right
    d = paired_differences(IDS, {"a": right, "b": wrong, "c": right.copy()}, TOKENS)
    assert d["a - b"]["pair_accuracy"] == 1.0 and d["a - b"]["pair_accuracy_ci95"] == [1.0, 1.0]
    assert d["a - b"]["p_le_0"] == 0.0
    assert d["a - c"]["pair_accuracy"] == 0.0 and d["a - c"]["pair_accuracy_ci95"] == [0.0, 0.0]
    assert d["a - shorter_wins"]["pair_accuracy"] == pytest.approx(1 - 2.5 / 4)
    assert set(d) == {
        "a - b",
        "a - c",
        "b - c",
        *(f"{p} - {r}" for p in "abc" for r in ("shorter_wins", "longer_wins")),
    }


def _rows():
    """Rows as prepare_data makes them: response tokens = input_ids.size - prompt_len."""
    return [
        SimpleNamespace(id=i, label=z, input_ids=np.zeros(10 + int(t)), prompt_len=10)
        for i, z, t in zip(IDS, LABELS, TOKENS, strict=True)
    ]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_score_policies_uses_the_runs_reduction(reduction):
    rng = np.random.default_rng(3)
    ref = -rng.random(8) * TOKENS
    policy = ref + rng.normal(0, 1.0, 8)
    loss = LossConfig(name="pointwise_dpo", beta=0.5, logp_reduction=reduction)
    out = score_policies(loss, _rows(), ref, {"p": policy})
    m = out["p"]
    scale = 1.0 if reduction == "sum" else 1.0 / TOKENS
    rewards = 0.5 * (policy - ref) * scale
    assert m["reduction"] == reduction
    assert m["reward_desirable"] == pytest.approx(rewards[LABELS > 0.5].mean())
    naive = np.mean(
        [
            -(z * math.log(1 / (1 + math.exp(-r))) + (1 - z) * math.log(1 / (1 + math.exp(r))))
            for z, r in zip(LABELS, rewards, strict=True)
        ]
    )
    assert m["loss"] == pytest.approx(naive)
    other = "mean" if reduction == "sum" else "sum"
    assert m[f"pair_accuracy_{reduction}"] == m["pair_accuracy"]
    assert f"pair_accuracy_{other}" in m
    assert out["length_baselines"]["pairs"] == 4
    assert set(out["paired_differences"]) == {"p - shorter_wins", "p - longer_wins"}
    assert out["bootstrap"]["resamples"] == BOOTSTRAP_RESAMPLES
    text = "\n".join(summary_lines(out))
    assert f"p: pair accuracy ({reduction})" in text and "shorter wins" in text
