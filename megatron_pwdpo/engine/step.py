"""Megatron's user contract: ``forward_step(data_iterator, model) -> (output, loss_func)``.

The same functions drive our loop and a user's own Megatron-LM ``pretrain()``; the
stock schedules (no pipelining, 1F1B, interleaved) run them unchanged.

Normalisation. The loss of one optimizer step is the **global** weighted sum

    L = sum_i w_i * loss_i        (i over every row of the global batch)

with ``w_i = 1 / N_global`` for the plain mean (``batch["weight"]``, set by the
loader, which knows the whole global batch). Megatron then rescales what
``loss_func`` returns: the schedule divides it by the number of micro-batches and
DistributedDataParallel averages gradients over the data-parallel ranks. Both are
undone in exactly one place, :func:`megatron_grad_scale`, so that the gradient of
the parameters is the gradient of ``L`` however the batch is split.

Metrics travel as ``[2]`` tensors ``(sum, count)`` (see ``losses/pointwise.py``): summed over
micro-batches, all-reduced once per step over data-parallel ranks, then divided.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.distributed as dist

from megatron_pwdpo.config import LossConfig
from megatron_pwdpo.losses import kto
from megatron_pwdpo.losses import pointwise as losses
from megatron_pwdpo.model.logprobs import (
    model_token_logps,
    packed_seq_params,
    segment_logps,
    sequence_logps,
)

Batch = dict[str, torch.Tensor]
Objective = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A pairwise micro-batch stacks ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]``."""
    half = x.shape[0] // 2
    return x[:half], x[half:]


def make_objective(cfg: LossConfig) -> Objective:
    """Dispatch once on ``loss.name``: ``(logps [b], batch) -> (loss [n], metrics)``.

    ``n`` is ``b`` for point-wise losses and ``b / 2`` (pairs) for ``dpo`` and ``ipo``.
    """
    name, beta = cfg.name, cfg.beta
    if name == "pointwise_dpo":
        return lambda logps, b: losses.pointwise_dpo_loss(
            logps, b["ref_logps"], b["label"], beta=beta, mode=cfg.mode, log_z=cfg.log_z
        )
    if name == "ulma":
        return lambda logps, b: losses.ulma_loss(
            logps,
            b.get("ref_logps"),
            b["label"],
            beta=beta,
            sft_weight=cfg.sft_weight,
            log_z=cfg.log_z,
            mode=cfg.mode,
        )
    if name in ("dpo", "ipo"):

        def pairwise(logps: torch.Tensor, b: Batch):
            (cw, cl), (rw, rl) = _split_pairs(logps), _split_pairs(b["ref_logps"])
            if name == "ipo":
                return losses.ipo_loss(cw, rw, cl, rl, beta=beta)
            return losses.dpo_loss(cw, rw, cl, rl, beta=beta, label_smoothing=cfg.label_smoothing)

        return pairwise
    if name == "kto":
        return lambda logps, b: losses.kto_loss(
            logps,
            b["ref_logps"],
            b["label"] > 0.5,
            b["kl"],
            beta=beta,
            desirable_weight=cfg.desirable_weight,
            undesirable_weight=cfg.undesirable_weight,
        )
    if name == "sft":
        return lambda logps, b: losses.sft_loss(logps)
    if name == "unlikelihood":

        def unlikelihood(logps: torch.Tensor, b: Batch):
            return losses.unlikelihood_loss(
                logps, b["unlikely_logps"], b["label"], ref_logps=b.get("ref_logps"), beta=beta
            )

        unlikelihood.needs_unlikely_logps = True  # loss_func adds b["unlikely_logps"]
        return unlikelihood
    raise ValueError(f"unknown loss '{name}'")


def row_logps(token_logps: torch.Tensor, batch: Batch, *, reduction: str) -> torch.Tensor:
    """``[n]`` per-row log-probs of a micro-batch: one row per sequence, or packed rows
    (``segment_ids``, -1 on padding, whose loss mask is 0) in one scatter."""
    if "segment_ids" in batch:
        return segment_logps(
            token_logps,
            batch["loss_mask"],
            batch["segment_ids"].clamp_min(0),
            num_segments=batch["label"].numel(),
            reduction=reduction,
        )
    return sequence_logps(token_logps, batch["loss_mask"], reduction=reduction)


def megatron_grad_scale(*, num_microbatches: int, data_parallel_size: int) -> float:
    """Factor that undoes Megatron's own loss scaling (see the module docstring).

    The pipeline schedule divides each micro-batch loss by ``num_microbatches``; DDP
    multiplies gradients by ``1 / data_parallel_size`` before the all-reduce.
    """
    return float(num_microbatches * data_parallel_size)


def loss_func(
    token_logps: torch.Tensor,
    *,
    batch: Batch,
    objective: Objective,
    reduction: str,
    grad_scale: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-row log-probs -> weighted loss of this micro-batch and its metrics.

    Args:
        token_logps: ``[b, s]`` from :func:`model_token_logps`.
        batch: the micro-batch (``loss_mask [b, s]``, ``weight [b]``, labels, ...).

    Returns:
        ``(loss, report)``: ``loss`` is a scalar whose gradient, after Megatron's
        scaling, is this micro-batch's share of the global loss; ``report`` maps metric
        names to detached ``[2]`` (sum, count) tensors, ``"loss"`` included.
    """
    logps = row_logps(token_logps, batch, reduction=reduction)
    if getattr(objective, "needs_unlikely_logps", False):  # per-row log(1 - p_t), reduced
        unlikely = row_logps(losses.log1m_exp(token_logps), batch, reduction=reduction)
        batch = {**batch, "unlikely_logps": unlikely}
    per_row, metrics = objective(logps, batch)
    weighted = (per_row * batch["weight"]).sum()
    count = per_row.new_tensor(float(per_row.numel()))
    report = {"loss": torch.stack([per_row.detach().sum().float(), count]), **metrics}
    return weighted * grad_scale, report


def to_model_device(batch: Batch, model: torch.nn.Module) -> Batch:
    """The micro-batch with its tensors on ``model``'s device (a new dict; the same one
    on CPU). Batches are built on the host; on GPU they move here, once per forward."""
    device = next(model.parameters()).device
    if device.type == "cpu":
        return batch
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def _next_through_model(data_iterator: Iterator[Batch], model: torch.nn.Module):
    """The next micro-batch on the model's device, and the chunk's output for it."""
    host = next(data_iterator)
    batch = to_model_device(host, model)
    thd = None
    if "cu_seqlens" in batch:  # THD-packed rows (Transformer Engine)
        thd = packed_seq_params(batch["cu_seqlens"], int(host["max_seqlen"]))
    output = model_token_logps(
        model,
        batch["tokens"],
        batch["position_ids"],
        batch["target_ids"],
        batch.get("attention_mask"),  # block-diagonal for mask-packed rows, else causal
        packed_seq_params=thd,
    )
    return batch, output


def forward_step(
    data_iterator: Iterator[Batch],
    model: torch.nn.Module,
    *,
    objective: Objective,
    reduction: str,
    grad_scale: float,
):
    """One micro-batch through one model chunk (Megatron's ``forward_step_func``)."""
    batch, output = _next_through_model(data_iterator, model)
    return output, partial(
        loss_func, batch=batch, objective=objective, reduction=reduction, grad_scale=grad_scale
    )


def _collect_logps(token_logps: torch.Tensor, *, batch: Batch, reduction: str):
    logps = row_logps(token_logps, batch, reduction=reduction)
    return token_logps.new_zeros(()), {"logps": logps.detach()}


def logps_forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module, *, reduction: str):
    """Forward-only ``forward_step_func`` whose report holds per-row log-probs ``[b]``."""
    batch, output = _next_through_model(data_iterator, model)
    return output, partial(_collect_logps, batch=batch, reduction=reduction)


@torch.no_grad()
def run_logps(
    forward_backward_func,
    chunks: list[torch.nn.Module],
    micro_batches: list[Batch],
    *,
    reduction: str,
    seq_length: int,
) -> list[torch.Tensor]:
    """Forward-only pass of ``chunks`` over ``micro_batches``: per-row log-probs ``[b]``
    for each micro-batch on the last pipeline stage, an empty list on the others."""
    if not micro_batches:
        return []
    reports = forward_backward_func(
        forward_step_func=partial(logps_forward_step, reduction=reduction),
        data_iterator=[iter(micro_batches) for _ in chunks]
        if len(chunks) > 1
        else iter(micro_batches),
        model=chunks,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batches[0]["tokens"].shape[0],
        forward_only=True,
    )
    return [report["logps"] for report in reports]


def sum_reports(reports: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Sum ``(sum, count)`` metric tensors over micro-batches."""
    total: dict[str, torch.Tensor] = {}
    for report in reports:
        for name, value in report.items():
            total[name] = total[name] + value if name in total else value.clone()
    return total


def reduce_metrics(
    summed: dict[str, torch.Tensor],
    names: list[str],
    *,
    dp_group: dist.ProcessGroup | None,
    pp_group: dist.ProcessGroup | None,
    pp_last_rank: int,
    is_last_stage: bool,
    device: torch.device,
) -> dict[str, float]:
    """All-reduce metrics once per step and divide: one collective per group.

    Only the last pipeline stage has metrics; it all-reduces them over its
    data-parallel group and broadcasts the result to the other stages, so every rank
    (rank 0 included, which logs) returns the same dict. ``names`` fixes the order.
    """
    vec = torch.zeros(2 * len(names), dtype=torch.float64, device=device)
    if is_last_stage:
        for i, name in enumerate(names):
            if name in summed:
                vec[2 * i : 2 * i + 2] = summed[name].double()
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(vec, group=dp_group)
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.broadcast(vec, src=pp_last_rank, group=pp_group)
    pairs = vec.view(-1, 2).tolist()
    return {
        name: (s / c if c > 0 else float("nan")) for name, (s, c) in zip(names, pairs, strict=True)
    }


def kto_reference_point(
    policy_logps: list[torch.Tensor],
    ref_logps: list[torch.Tensor],
    *,
    dp_group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """KTO's ``z_ref = max(0, mean log pi/pi_ref)`` over the mismatched rows of every
    data-parallel rank (:mod:`megatron_pwdpo.losses.kto`): one all-reduce of ``[2]``.

    Args:
        policy_logps: this rank's ``[b]`` per-row log-probs of mismatched rows, per
            micro-batch (under the policy).
        ref_logps: the same under the reference.
        dp_group: the data-parallel group (its ranks hold the rest of the global batch).

    Returns:
        A detached float32 scalar.
    """
    stats = kto.kl_ratio_stats(policy_logps, ref_logps)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(stats, group=dp_group)
    return kto.reference_point(stats)


def metric_names(objective: Objective) -> list[str]:
    """The ordered metric names an objective reports (from a dry run on 2 rows)."""
    dummy = {
        "ref_logps": torch.zeros(2),
        "label": torch.tensor([1.0, 0.0]),
        "kl": torch.zeros(()),
        "unlikely_logps": torch.full((2,), -1.0),
    }
    _, metrics = objective(torch.zeros(2), dummy)
    return ["loss", *metrics]
