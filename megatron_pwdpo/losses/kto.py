"""KTO's reference point: a detached KL estimate from mismatched (prompt, response) pairs.

KTO (Ethayarajh et al., arXiv 2402.01306) compares each row's log-ratio
``d = log pi/pi_ref`` with ``z_ref = max(0, E[log pi(y'|x) / pi_ref(y'|x)])``, estimated on
responses ``y'`` that do not belong to the prompt ``x`` (``engine.batches.mismatched``
builds them). The expectation runs over the whole global batch: each data-parallel rank
sums its rows (:func:`kl_ratio_stats`), the sums are all-reduced
(``engine.step.kto_reference_point``), and :func:`reference_point` turns them into
``z_ref``. Pure math: no process group here.
"""

from __future__ import annotations

import torch


def kl_ratio_stats(policy_logps: list[torch.Tensor], ref_logps: list[torch.Tensor]) -> torch.Tensor:
    """``[2]`` float64 ``(sum of log pi/pi_ref, number of rows)`` over this rank's
    mismatched rows, given per micro-batch as ``[b]`` log-probs under each model."""
    ratio = torch.cat([p - r for p, r in zip(policy_logps, ref_logps, strict=True)]).double()
    return torch.stack([ratio.sum(), ratio.new_tensor(float(ratio.numel()))])


def reference_point(stats: torch.Tensor) -> torch.Tensor:
    """``z_ref = max(0, sum / count)`` from :func:`kl_ratio_stats` (summed over ranks):
    a detached float32 scalar."""
    return (stats[0] / stats[1]).clamp_min(0.0).float().detach()
