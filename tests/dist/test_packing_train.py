"""Packed sequences (block-diagonal causal mask, first-fit-decreasing) train exactly like
one row per padded sequence: same per-row log-probs, so the same losses and gradients."""

import numpy as np
import pytest
from conftest import TINY, read_metrics, run_cli, train_curve

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("loss", ["pointwise_dpo", "dpo"])
def test_packed_run_matches_padded_run(tmp_path, loss):
    args = ["train", *TINY, "train.sft_steps=2", "train.steps=2", f"loss.name={loss}"]
    run_cli([*args, f"run_dir={tmp_path / 'padded'}"])
    # micro_batch_size now counts packed sequences of seq_length=128 positions
    run_cli(
        [*args, "data.packing=masked", "train.micro_batch_size=1", f"run_dir={tmp_path / 'packed'}"]
    )
    for stage in ("sft", loss):
        for key in ("loss", "grad_norm"):
            want = train_curve(tmp_path / "padded", stage, key)
            got = train_curve(tmp_path / "packed", stage, key)
            np.testing.assert_allclose(got, want, rtol=2e-5, err_msg=f"{stage} {key}")
    evals = [
        [m["loss"] for m in read_metrics(tmp_path / d) if m.get("split") == "eval"]
        for d in ("padded", "packed")
    ]
    np.testing.assert_allclose(evals[1], evals[0], rtol=2e-5)


def test_chunked_log_probs_run_matches_whole_sequence_run(tmp_path):
    """parallel.logprob_chunk_size: the output layer and cross-entropy over 40-position
    chunks (checkpointed; sequences of up to 128) train like the whole sequence at once."""
    args = ["train", *TINY, "train.sft_steps=2", "train.steps=2"]
    run_cli([*args, f"run_dir={tmp_path / 'whole'}"])
    run_cli([*args, "parallel.logprob_chunk_size=40", f"run_dir={tmp_path / 'chunked'}"])
    for stage in ("sft", "pointwise_dpo"):
        for key in ("loss", "grad_norm"):
            want = train_curve(tmp_path / "whole", stage, key)
            got = train_curve(tmp_path / "chunked", stage, key)
            np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{stage} {key}")
