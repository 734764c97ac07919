"""Per-row log-prob reductions and the loss normalisation of engine/step.py (no process group)."""

import math

import pytest
import torch

from megatron_pwdpo.config import LossConfig
from megatron_pwdpo.engine.step import loss_func, make_objective, megatron_grad_scale, sum_reports
from megatron_pwdpo.model.logprobs import segment_logps, sequence_logps


def test_sequence_logps_sum_and_mean_match_a_loop():
    g = torch.Generator().manual_seed(0)
    token_logps = -torch.rand(3, 7, generator=g, dtype=torch.float64)
    mask = (torch.rand(3, 7, generator=g) > 0.4).double()
    mask[2] = 0.0  # a row with no response token
    sums = sequence_logps(token_logps, mask, reduction="sum")
    means = sequence_logps(token_logps, mask, reduction="mean")
    for i in range(3):
        picked = [token_logps[i, t].item() for t in range(7) if mask[i, t] > 0]
        assert sums[i].item() == pytest.approx(sum(picked))
        assert means[i].item() == pytest.approx(sum(picked) / max(len(picked), 1))


def test_segment_logps_of_packed_rows_equal_per_row_reduction():
    g = torch.Generator().manual_seed(1)
    token_logps = -torch.rand(2, 10, generator=g, dtype=torch.float64)
    mask = (torch.rand(2, 10, generator=g) > 0.3).double()
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2], [3, 3, 3, 3, 3, 4, 4, 4, 4, 4]])
    for reduction in ("sum", "mean"):
        got = segment_logps(token_logps, mask, segments, num_segments=5, reduction=reduction)
        for seg in range(5):
            sel = segments == seg
            want = sequence_logps(token_logps[sel][None], mask[sel][None], reduction=reduction)[0]
            assert got[seg].item() == pytest.approx(want.item())


def _batch(b, s, g):
    return {
        "loss_mask": (torch.rand(b, s, generator=g) > 0.3).float(),
        "label": torch.tensor([1.0, 0.0, 1.0, 0.0])[:b],
        "ref_logps": -torch.rand(b, generator=g),
        "weight": torch.full((b,), 1.0 / 16),  # a global batch of 16 rows
    }


def test_micro_batch_losses_sum_to_the_global_mean_after_megatron_scaling():
    """Two micro-batches x two DP ranks: what the gradient sees is the global mean."""
    g = torch.Generator().manual_seed(2)
    objective = make_objective(LossConfig(name="pointwise_dpo", beta=0.5))
    token_logps = [-torch.rand(4, 6, generator=g) for _ in range(2)]
    batches = [_batch(4, 6, g) for _ in range(2)]
    scale = megatron_grad_scale(num_microbatches=2, data_parallel_size=2)
    losses, reports = [], []
    for t, b in zip(token_logps, batches, strict=True):
        loss, report = loss_func(
            t, batch=b, objective=objective, reduction="mean", grad_scale=scale
        )
        losses.append(loss / 2)  # what the schedule does: divide by num_microbatches
        reports.append(report)
    # this rank holds 8 of the 16 rows; DDP averages gradients over the 2 ranks, so this
    # rank's share of the global gradient is sum(losses) / 2, which must be its rows' sum / 16
    contribution = sum(losses) / 2
    per_row = []
    for t, b in zip(token_logps, batches, strict=True):
        logps = sequence_logps(t, b["loss_mask"], reduction="mean")
        r = 0.5 * (logps - b["ref_logps"])
        z = b["label"]
        per_row += -(z * torch.log(torch.sigmoid(r)) + (1 - z) * torch.log(torch.sigmoid(-r)))
    assert contribution.item() == pytest.approx(float(sum(per_row)) / 16, rel=1e-6)
    summed = sum_reports(reports)
    assert summed["loss"][1].item() == 8
    assert summed["loss"][0].item() == pytest.approx(float(sum(per_row)), rel=1e-6)


def test_step_zero_loss_is_log2():
    objective = make_objective(LossConfig(name="pointwise_dpo", beta=0.1))
    b = {"label": torch.tensor([1.0, 0.0, 0.3]), "ref_logps": torch.tensor([-1.0, -2.0, -3.0])}
    loss, _ = objective(b["ref_logps"].clone(), b)
    assert torch.allclose(loss, torch.full((3,), math.log(2.0)))
