"""Fused core attention for megatron-core's local layer spec: ``scaled_dot_product_attention``.

:class:`SDPAttention` replaces Megatron's ``DotProductAttention`` in the local spec's
``self_attention.submodules.core_attention`` (:func:`megatron_pwdpo.model.build.layer_spec` with
``model.attention=sdpa``). It computes the same function::

    out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, g(h), j] + mask[b, i, j]) v[b, g(h), j]

with ``scale = softmax_scale or 1 / sqrt(head_dim)`` (Megatron's
``apply_query_key_layer_scaling`` divides the scale by the layer number and multiplies the
fp32 scores by it again: the same product, so it is ignored here), ``g(h) = h // (np / ng)``
(grouped-query attention: ``np`` query heads and ``ng`` key/value groups of this tensor-
parallel rank, consecutive query heads sharing a group, as Megatron's ``repeat_interleave``)
and ``mask`` 0 where position ``j`` is visible from ``i``, ``-inf`` elsewhere. Megatron's
version materialises the ``[b, np, s, s]`` scores, casts them to fp32, fills the masked ones
with -10000 and runs a separate softmax, each with its backward: on an H200 that was ~55%
of a 1B model's step (``notes/GPU_HERE.md``). Here one
``torch.nn.functional.scaled_dot_product_attention`` call does it all, without the scores.

Which kernel runs (torch 2.11 on the lent GPU, 2.13 here):

* **causal, no mask** (unpacked batches, ``attention_mask is None``): ``is_causal=True``
  and ``enable_gqa=True`` (the key/value groups are not copied). On CUDA: FlashAttention-2
  (bf16/fp16) or the memory-efficient kernel (fp32; it refuses GQA, so then the groups are
  expanded first); on CPU: ATen's fused flash-style CPU kernel (checked by the unit test
  with ``sdpa_kernel(FLASH_ATTENTION)``).
* **a mask** (``data.packing=masked``: the block-diagonal ``[b, 1, s, s]`` mask of
  :func:`megatron_pwdpo.data.packing.block_causal_mask`, True = masked): SDPA with the
  boolean mask inverted (True = attend), broadcast over heads, key/value groups expanded.
  On CUDA this falls off FlashAttention (it takes no mask) onto the **memory-efficient
  (cutlass) kernel, which is fused**: it reads the mask as an additive bias tile by tile
  and never holds the scores; its cost is that it visits every ``s x s`` tile (no skipping
  of the tiles a document-causal mask hides, so ~2x the attention FLOPs of causal flash on
  the same width) plus the ``[b, 1, s, s]`` mask (8 MiB of bool at ``b=2, s=2048``, already
  built by the batch).
* **a mask, on CPU**: the fused CPU kernel takes the mask too, but it cannot skip the
  hidden tiles either, so a packed sequence cost the full ``s x s`` while a padded row
  costs the causal half (measured: packing's speed-up over padding fell from 1.66x with
  Megatron's attention to ~1.25x). So on CPU a block-diagonal causal mask is cut into its
  rows (:func:`block_causal_runs`: found from the mask's sub-diagonal, then checked
  against the whole mask, once per mask) and each row runs causal SDPA alone: the
  attention costs ``sum(row_len^2) / 2`` like unpacked rows. Any other mask, and
  dropout, take the mask path. (On CUDA the rows would need a device-to-host sync per
  micro-batch; there varlen attention is the follow-up, below.)

Why this and not the alternatives torch offers (investigated in torch 2.13's sources,
``torch/nn/attention/``):

* ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention over ``cu_seqlens``): CUDA
  only (nothing of it runs, so nothing of it can be tested, on a CPU), its signature
  changed between the GPU's torch 2.11 (``is_causal=``) and 2.13 (``window_size=``), and
  it needs the packed rows as one ``[T, h, d]`` sequence with host-side ``cu_seqlens`` and
  ``max_seqlen`` (a device->host sync per micro-batch, and Megatron's local spec applies
  RoPE in ``[s, b, h, d]`` layout, so the whole THD path of the model would change, not the
  core attention). It is the fastest option and the right follow-up once a GPU can test it.
* FlexAttention (``flex_attention`` + ``create_block_mask``) honours a document-causal
  block mask and skips the hidden tiles, but is fused only under ``torch.compile``: in eager
  mode it runs an unfused reference that materialises the scores, like Megatron's. Compiling
  it inside Megatron's model means a Triton/Inductor compile on the first step, a
  recompile (or dynamic shapes) for every micro-batch width that ``shrink_width`` packing
  produces, and a block mask built per micro-batch: a dependency on the compiler's
  behaviour that cannot be checked here (no GPU, and CPU compilation is minutes on this
  machine).
* SDPA with the boolean mask: one call, the same code on CPU and GPU, the same in torch
  2.11 and 2.13, fused on both; the price is the non-skipped tiles above.

Not supported (refused at construction with a one-line error): sliding-window attention,
``softmax_type`` other than ``vanilla``, context parallelism; in ``forward``: THD
``packed_seq_params`` (Transformer Engine's layout) and ``attention_bias``.

Shapes (Megatron's, this tensor-parallel rank): ``query [sq, b, np, hn]``, ``key`` and
``value [sk, b, ng, hn]``, ``attention_mask [b, 1, sq, sk]`` bool (True = masked) or None;
returns ``[sq, b, np * hn]``.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` computed by ``scaled_dot_product_attention``.

    Same constructor and forward signature as megatron-core 0.16.1's
    ``DotProductAttention`` (it subclasses it, so the state dict and sharded state dict,
    both empty for a vanilla softmax, are the same: a checkpoint does not depend on which
    of the two computed the attention).
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"model.attention=sdpa: softmax_type={config.softmax_type!r} is not supported "
                "(vanilla only); use model.attention=local"
            )
        window = config.window_size, config.window_attn_skip_freq
        if is_layer_window_attention(*window, layer_number):
            raise ValueError(
                "model.attention=sdpa: sliding-window attention is not supported; "
                "use model.attention=local"
            )
        super().__init__(
            config,
            layer_number,
            attn_mask_type,
            attention_type,
            attention_dropout=attention_dropout,
            softmax_scale=softmax_scale,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        # Megatron divides by the layer number here and multiplies the scores by it again.
        self.sdpa_scale = (
            softmax_scale
            if softmax_scale is not None
            else 1.0 / math.sqrt(self.hidden_size_per_attention_head)
        )
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]``, mask ``[b, 1, sq, sk]``
        (True = masked) or None -> ``[sq, b, np * hn]``."""
        if packed_seq_params is not None:
            raise ValueError(
                "model.attention=sdpa takes packed rows as a block-diagonal attention_mask "
                "(data.packing=masked), not THD packed_seq_params (that needs Transformer "
                "Engine's attention: model.attention=auto with TE)"
            )
        if attention_bias is not None:
            raise ValueError("model.attention=sdpa: attention_bias is not supported")
        attn_mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b = query.shape[:2]
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)  # [b, ng, sk, hn]
        v = value.permute(1, 2, 0, 3)
        dropout_p = self.dropout_p if self.training else 0.0
        runs = None
        if attention_mask is not None and not q.is_cuda and dropout_p == 0.0:
            runs = block_causal_runs(attention_mask)
        if runs is not None:
            context = self._per_run(q, k, v, runs)
        else:
            context = self._sdpa(q, k, v, attention_mask, attn_mask_type, dropout_p)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _sdpa(self, q, k, v, attention_mask, attn_mask_type, dropout_p: float) -> torch.Tensor:
        """One SDPA call over ``[b, np, s, hn]`` queries: causal, or the mask."""
        heads, groups = q.shape[1], k.shape[1]
        kwargs = {}
        if attention_mask is not None:
            # Megatron's convention is True = masked; SDPA's is True = attend. The fused
            # kernels that take a mask (CUDA: memory-efficient) refuse GQA: expand the groups.
            kwargs["attn_mask"] = ~attention_mask
            if groups != heads:
                k = k.repeat_interleave(heads // groups, dim=1)
                v = v.repeat_interleave(heads // groups, dim=1)
        else:
            kwargs["is_causal"] = attn_mask_type == AttnMaskType.causal and q.shape[2] > 1
            if groups != heads:
                if q.is_cuda and q.dtype == torch.float32:  # memory-efficient kernel: no GQA
                    k = k.repeat_interleave(heads // groups, dim=1)
                    v = v.repeat_interleave(heads // groups, dim=1)
                else:
                    kwargs["enable_gqa"] = True
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(
                    q, k, v, dropout_p=dropout_p, scale=self.sdpa_scale, **kwargs
                )
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, scale=self.sdpa_scale, **kwargs
        )

    def _per_run(self, q, k, v, runs) -> torch.Tensor:
        """Packed rows on CPU: causal SDPA over each row alone (``runs``, see
        :func:`block_causal_runs`), so no work is spent on the positions the mask hides;
        a run of positions that see only themselves returns their values."""
        heads, groups = q.shape[1], k.shape[1]
        gqa = groups != heads
        out = []
        for i, sequence in enumerate(runs):
            pieces = []
            for start, end, attends in sequence:
                qs, ks, vs = (t[i : i + 1, :, start:end] for t in (q, k, v))
                if attends:
                    pieces.append(
                        F.scaled_dot_product_attention(
                            qs, ks, vs, is_causal=True, scale=self.sdpa_scale, enable_gqa=gqa
                        )
                    )
                else:  # softmax over one position is 1
                    pieces.append(vs.repeat_interleave(heads // groups, dim=1) if gqa else vs)
            out.append(torch.cat(pieces, dim=2))
        return torch.cat(out, dim=0)


_RUNS_CACHE: dict = {}


def block_causal_runs(mask: torch.Tensor) -> list[list[tuple[int, int, bool]]] | None:
    """The rows of a block-diagonal causal mask, or None if ``mask`` is not one.

    Args:
        mask: ``[b, 1, s, s]`` bool, True = masked (Megatron's convention), as
            :func:`megatron_pwdpo.data.packing.block_causal_mask` builds it.

    Returns:
        per sequence, its positions cut into consecutive runs ``(start, end, attends)``
        that cover ``[0, s)``: ``attends`` True = a segment whose positions see exactly
        the earlier positions of the same segment (a packed row: causal attention
        within it); False = positions that each see only themselves (padding, or rows
        of one position). None when the mask has any other form (then the caller uses
        the mask itself). Segments start where position ``i`` cannot see ``i - 1``; the
        whole mask is compared with the one these segments imply (``O(b s^2)`` bool
        work, once per mask: the result is cached for the layers that share it).
    """
    cached = _RUNS_CACHE.get("mask")
    if cached is not None and cached() is mask and _RUNS_CACHE["version"] == mask._version:
        return _RUNS_CACHE["runs"]
    m = mask[:, 0]  # [b, s, s]
    b, s, _ = m.shape
    starts = torch.ones(b, s, dtype=torch.bool)
    starts[:, 1:] = m.diagonal(offset=-1, dim1=1, dim2=2)  # i cannot see i - 1
    segment = starts.cumsum(1)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    implied = ~((segment[:, :, None] == segment[:, None, :]) & causal)
    runs = None
    if torch.equal(implied, m):
        runs = []
        for row in starts.tolist():
            bounds = [i for i, first in enumerate(row) if first] + [s]
            sequence: list[tuple[int, int, bool]] = []
            for start, end in zip(bounds[:-1], bounds[1:], strict=True):
                attends = end - start > 1
                if sequence and not attends and not sequence[-1][2]:
                    sequence[-1] = (sequence[-1][0], end, False)  # merge self-only runs
                else:
                    sequence.append((start, end, attends))
            runs.append(sequence)
    _RUNS_CACHE.update(mask=weakref.ref(mask), version=mask._version, runs=runs)
    return runs
