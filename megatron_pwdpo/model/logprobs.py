"""Token and sequence log-probabilities without gathering the vocabulary.

The output layer of a tensor-parallel GPTModel holds ``V / tp`` vocabulary rows per
rank. Called with ``labels=target_ids`` the model returns Megatron's vocab-parallel
cross-entropy ``[b, s]`` (three all-reduces of ``[s, b]`` scalars inside
``tensor_parallel.vocab_parallel_cross_entropy``), so the log-probability of each next
token is simply its negative: the full ``[b, s, V]`` logits never exist on one rank.

Packed rows reach the model in one of two layouts (``data.packing``): a block-diagonal
``attention_mask`` (CPU), or Megatron's ``PackedSeqParams(qkv_format="thd")`` for
Transformer Engine: the micro-batch is one ``[1, T]`` sequence whose rows are delimited
by ``cu_seqlens`` (:func:`packed_seq_params`).

Per-sample reductions then run over the response mask (``loss_mask``, 1 on response
targets, 0 on prompt and padding) and, for packed sequences, over segment ids, each in
one vectorised op.
"""

from __future__ import annotations

from typing import Literal

import torch

Reduction = Literal["sum", "mean"]


def model_token_logps(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    position_ids: torch.Tensor,
    target_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    packed_seq_params=None,
) -> torch.Tensor:
    """Per-token log-probs of ``target_ids`` under ``model`` (last pipeline stage).

    Args:
        model: a (wrapped) GPTModel stage; on stages other than the last, the return
            value is the stage's hidden states, passed on by the pipeline schedule.
        tokens: input ids ``[b, s]``.
        position_ids: ``[b, s]``.
        target_ids: next-token ids ``[b, s]`` (any valid id where masked).
        attention_mask: ``None`` for causal attention, or a boolean ``[b, 1, s, s]`` mask
            with True where attention is *not* allowed (packed rows).
        packed_seq_params: ``PackedSeqParams`` of a THD-packed batch
            (:func:`packed_seq_params`; then ``attention_mask`` is None): the batch runs
            as one ``[1, b * s]`` sequence (``b`` is 1 for ``data.packing.pack_rows``).

    Returns:
        ``[b, s]`` float32 log pi(target_t | tokens_<=t) on the last stage.
    """
    if packed_seq_params is None:
        out = model(tokens, position_ids, attention_mask, labels=target_ids)
    else:
        flat = (tokens.reshape(1, -1), position_ids.reshape(1, -1), None)
        out = model(*flat, labels=target_ids.reshape(1, -1), packed_seq_params=packed_seq_params)
    if not _is_output_stage(model):
        return out  # hidden states for the next pipeline stage: pass them on untouched
    return -out.float().view(tokens.shape)


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int):
    """Megatron's THD ``PackedSeqParams`` for self-attention over packed rows.

    Args:
        cu_seqlens: ``[k+1]`` int32 boundaries of the rows (and the padding run) of the
            flattened batch, on the model's device.
        max_seqlen: the longest run (a Python int: no device sync).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )


def _is_output_stage(model: torch.nn.Module) -> bool:
    """Whether this (possibly DDP-wrapped) chunk holds the output layer."""
    while not hasattr(model, "post_process") and hasattr(model, "module"):
        model = model.module
    return getattr(model, "post_process", True)


def sequence_logps(
    token_logps: torch.Tensor, loss_mask: torch.Tensor, *, reduction: Reduction
) -> torch.Tensor:
    """Reduce token log-probs over each row's response.

    Args:
        token_logps: ``[b, s]``.
        loss_mask: ``[b, s]``, 1.0 on response targets.
        reduction: ``sum`` = log pi(y|x); ``mean`` = the same divided by the response
            length (the ULMA reference code's choice).

    Returns:
        ``[b]`` per-row log-probs.
    """
    mask = loss_mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(dim=-1)
    if reduction == "sum":
        return total
    return total / mask.sum(dim=-1).clamp_min(1.0)


def segment_logps(
    token_logps: torch.Tensor,
    loss_mask: torch.Tensor,
    segment_ids: torch.Tensor,
    *,
    num_segments: int,
    reduction: Reduction,
) -> torch.Tensor:
    """Reduce token log-probs of packed sequences per segment (row) in one scatter.

    Args:
        token_logps: ``[b, s]``.
        loss_mask: ``[b, s]``, 1.0 on response targets.
        segment_ids: ``[b, s]`` int64 index of the packed row each token belongs to, in
            ``[0, num_segments)`` (padding may use any id: its mask is 0).
        num_segments: number of packed rows.
        reduction: ``sum`` or ``mean`` over each row's response tokens.

    Returns:
        ``[num_segments]`` per-row log-probs.
    """
    mask = loss_mask.to(token_logps.dtype).reshape(-1)
    ids = segment_ids.reshape(-1)
    zeros = token_logps.new_zeros(num_segments)
    total = zeros.index_add(0, ids, token_logps.reshape(-1) * mask)
    if reduction == "sum":
        return total
    count = zeros.index_add(0, ids, mask)
    return total / count.clamp_min(1.0)
