"""KTO's reference point: a detached KL estimate from mismatched (prompt, response) pairs.

KTO (Ethayarajh et al., arXiv 2402.01306) compares each row's log-ratio
``d = log pi/pi_ref`` with ``z_ref = max(0, E[log pi(y'|x) / pi_ref(y'|x)])``, estimated on
responses ``y'`` that do not belong to the prompt ``x`` (``batches.mismatched`` builds
them). The expectation runs over the whole global batch, so it is all-reduced over the
data-parallel group once per step; it carries no gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def kto_reference_point(
    policy_logps: list[torch.Tensor],
    ref_logps: list[torch.Tensor],
    *,
    dp_group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """``max(0, mean log pi/pi_ref)`` over the mismatched rows of every DP rank.

    Args:
        policy_logps: this rank's ``[b]`` per-row log-probs of mismatched rows, per
            micro-batch (under the policy).
        ref_logps: the same under the reference.
        dp_group: the data-parallel group (its ranks hold the rest of the global batch).

    Returns:
        A detached float32 scalar.
    """
    ratio = torch.cat([p - r for p, r in zip(policy_logps, ref_logps, strict=True)]).double()
    stats = torch.stack([ratio.sum(), ratio.new_tensor(float(ratio.numel()))])
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(stats, group=dp_group)
    return (stats[0] / stats[1]).clamp_min(0.0).float().detach()
