"""Per-row log-probs of a whole row set under any TP/PP/DP layout, gathered on rank 0.

Used by ``precompute-ref`` (the reference's log-probs of every row) and ``eval`` (the
reference's and each policy's log-probs of the held-out rows). The rows are split into
equal contiguous blocks, one per data-parallel replica; a replica runs its block sorted by
length (longest first, so little padding) in groups of ``GROUP`` micro-batches per
pipeline schedule call; the last pipeline stage's log-probs go to the first stage, then
every replica's to data-parallel rank 0, back in row order. Tensor-parallel ranks hold
the same values, so global rank 0 ends with all ``n`` of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

GROUP = 64  # micro-batches per schedule call


def rows_logps(
    rows: Sequence,
    chunks: list[torch.nn.Module],
    layout,
    *,
    pad_id: int,
    micro_batch_size: int,
    reduction: str,
    seq_length: int,
    token_multiple: int = 16,
) -> torch.Tensor | None:
    """``[len(rows)]`` float32 log-probs (``reduction`` over each row's response tokens)
    on global rank 0, in row order; None on every other rank.

    Args:
        rows: the same ``TokenizedRow`` list on every rank.
        chunks: this rank's model chunks (eval mode, weights loaded).
        layout: this rank's ``engine.setup.Layout``.
        token_multiple: micro-batch widths are multiples of this
            (:func:`megatron_pwdpo.platform.decisions.config_token_multiple`).
    """
    parts = np.array_split(np.arange(len(rows)), layout.dp_size)
    mine = [rows[i] for i in parts[layout.dp_rank]]
    local = _local_logps(
        mine,
        chunks,
        fb=layout.forward_backward_func(),
        pad_id=pad_id,
        micro_batch_size=micro_batch_size,
        reduction=reduction,
        seq_length=seq_length,
        token_multiple=token_multiple,
    )
    everything = _gather(local, layout, sizes=[len(p) for p in parts])
    return everything if dist.get_rank() == 0 else None


def _local_logps(
    rows,
    chunks,
    *,
    fb,
    pad_id: int,
    micro_batch_size: int,
    reduction: str,
    seq_length: int,
    token_multiple: int,
) -> torch.Tensor:
    """``[len(rows)]`` log-probs of this replica's rows (meaningful on the last stage)."""
    from megatron_pwdpo.engine.batches import rank_micro_batches
    from megatron_pwdpo.engine.step import run_logps
    from megatron_pwdpo.platform.distributed import device

    order = sorted(range(len(rows)), key=lambda i: -rows[i].input_ids.size)
    out = torch.zeros(len(rows), dtype=torch.float32, device=device())
    step = micro_batch_size * GROUP
    for start in range(0, len(order), step):
        part = order[start : start + step]
        batches = rank_micro_batches(
            [rows[i] for i in part],
            dp_rank=0,
            dp_size=1,
            micro_batch_size=micro_batch_size,
            pad_id=pad_id,
            token_multiple=token_multiple,
        )
        logps = run_logps(fb, chunks, batches, reduction=reduction, seq_length=seq_length)
        if logps:
            out[torch.tensor(part, device=out.device)] = torch.cat(logps).float()
    return out


def _gather(local: torch.Tensor, layout, *, sizes: list[int]) -> torch.Tensor:
    """This rank's log-probs from the last pipeline stage to the first, then every data-
    parallel rank's to data-parallel rank 0 (padded to one length), in row order."""
    if dist.get_world_size(layout.pp_group) > 1:
        dist.broadcast(local, src=layout.pp_last_rank, group=layout.pp_group)
    if layout.dp_size == 1:
        return local
    longest = max(sizes)
    padded = torch.zeros(longest, dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    first = layout.dp_rank == 0
    bucket = [torch.zeros_like(padded) for _ in sizes] if first else None
    dist.gather(padded, bucket, dst=dist.get_global_rank(layout.dp_group, 0), group=layout.dp_group)
    if not first:
        return local
    return torch.cat([b[:n] for b, n in zip(bucket, sizes, strict=True)])
