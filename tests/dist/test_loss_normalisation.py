"""Every loss: a global batch split over 2 micro-batches x 2 data-parallel ranks gives the
same per-step loss and gradient norm as the whole batch in one micro-batch in one process
(the global normalisation of engine/step.py, including per-class normalisation and KTO's
data-parallel KL estimate)."""

import numpy as np
import pytest
from conftest import TINY, read_metrics, run_cli, train_curve

pytestmark = pytest.mark.dist

CASES = {
    "pointwise_dpo": ["loss.name=pointwise_dpo"],
    "pointwise_dpo_per_class": ["loss.name=pointwise_dpo", "loss.normalization=per_class"],
    "pointwise_dpo_mse": ["loss.name=pointwise_dpo", "loss.mode=mse"],
    "ulma": ["loss.name=ulma"],
    "ulma_per_class": ["loss.name=ulma", "loss.normalization=per_class"],
    "dpo": ["loss.name=dpo", "loss.label_smoothing=0.1"],
    "ipo": ["loss.name=ipo", "loss.logp_reduction=mean"],
    "kto": ["loss.name=kto", "loss.desirable_weight=1.5"],
    "sft": ["loss.name=sft"],
}

# 1 SFT step first, so that the policy differs from the reference from the first
# preference step on (otherwise every reward is 0 at step 1).
BASE = ["train", *TINY, "train.sft_steps=1", "train.steps=2", "train.global_batch_size=8"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_split_batch_equals_whole_batch(case, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    args = [*BASE, *CASES[case]]
    run_cli([*args, f"run_dir={whole}", "train.micro_batch_size=8"])
    run_cli([*args, f"run_dir={split}", "train.micro_batch_size=2"], nproc=2)
    stage = CASES[case][0].split("=")[1]
    for key in ("loss", "grad_norm"):
        want, got = train_curve(whole, stage, key), train_curve(split, stage, key)
        assert len(want) == 2 and all(np.isfinite(want))
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{case} {key}")
    final = [
        [m for m in read_metrics(d) if m.get("split") == "eval" and m["stage"] == stage][-1]
        for d in (whole, split)
    ]
    for name, value in final[0].items():
        if isinstance(value, float):
            # rewards and log-ratios are differences of summed log-probs (~500 nats):
            # float32 rounding of those sums is ~1e-5 absolute
            np.testing.assert_allclose(final[1][name], value, rtol=1e-5, atol=1e-4, err_msg=name)
