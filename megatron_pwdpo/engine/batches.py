"""From a global batch of examples to this rank's micro-batches, with loss weights.

An *example* is one row (point-wise losses) or one ``(chosen, rejected)`` pair
(``dpo``, ``ipo``); ``train.global_batch_size`` counts examples. Every rank knows the
whole global batch (the sampler is deterministic), so the weights of the global
normalisation are computed locally, without communication:

* ``global_mean``: ``w_i = 1 / G`` (G examples in the global batch);
* ``per_class``: ``w_i = 1 / N_D`` for desirable rows (label > 0.5) and ``1 / N_U`` for
  the others, i.e. mean over desirable + mean over undesirable (a class absent from
  the batch contributes 0).

A pairwise micro-batch stacks the chosen rows, then the rejected rows
(``step._split_pairs`` undoes it). KTO's KL reference point uses *mismatched* rows:
the prompt of global example ``k`` with the response of example ``(k + 1) mod G``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megatron_pwdpo.data.packing import PackedLayout, pack_ffd, pack_rows
from megatron_pwdpo.data.prepare import make_micro_batch
from megatron_pwdpo.data.sampler import split_micro_batches
from megatron_pwdpo.data.tokenize import TokenizedRow

Pair = tuple[TokenizedRow, TokenizedRow]
Example = TokenizedRow | Pair

# a packed THD micro-batch is one [1, T] sequence on Transformer Engine; T is rounded up
# to a multiple of 64 (FP8 and MXFP8 GEMMs and sequence-parallel splits want aligned
# token counts): at most 63 padding positions per micro-batch
THD_TOKEN_MULTIPLE = 64


def pair_up(rows: list[TokenizedRow]) -> list[Pair]:
    """Chosen/rejected pairs from paired point-wise rows (ids ``<pair>-c`` / ``<pair>-r``).

    A pair one of whose rows was dropped in tokenisation is left out.
    """
    by_id = {r.id: r for r in rows}
    pairs = []
    for row in rows:
        if row.id.endswith("-c"):
            rejected = by_id.get(row.id[:-2] + "-r")
            if rejected is not None:
                pairs.append((row, rejected))
    return pairs


def global_weights(examples: list[Example], *, normalization: str) -> np.ndarray:
    """``[G]`` loss weight of every example of a global batch (see the module docstring)."""
    count = len(examples)
    if normalization == "global_mean" or isinstance(examples[0], tuple):
        return np.full(count, 1.0 / count)
    desirable = np.array([r.label > 0.5 for r in examples])
    n_des, n_und = desirable.sum(), (~desirable).sum()
    return np.where(desirable, 1.0 / max(n_des, 1), 1.0 / max(n_und, 1))


def mismatched(examples: list[TokenizedRow], *, seq_length: int) -> list[TokenizedRow]:
    """Row ``k``'s prompt with row ``(k + 1) mod G``'s response (prompt left-truncated)."""
    out = []
    for k, row in enumerate(examples):
        other = examples[(k + 1) % len(examples)]
        response = other.input_ids[other.prompt_len :]
        room = seq_length + 1 - response.size
        prompt = row.input_ids[: row.prompt_len]
        if prompt.size > room:  # keep bos, drop the oldest prompt tokens
            prompt = np.concatenate([prompt[:1], prompt[prompt.size - room + 1 :]])
        ids = np.concatenate([prompt, response])
        out.append(TokenizedRow(row.row_index, ids, prompt.size, row.label, row.is_demo, row.id))
    return out


def _rows_of(examples: list[Example]) -> list[TokenizedRow]:
    """Rows of a list of examples: pairs become chosen rows, then rejected rows."""
    if examples and isinstance(examples[0], tuple):
        return [c for c, _ in examples] + [r for _, r in examples]
    return list(examples)


def packing_options(config) -> dict:
    """``rank_micro_batches``' packing and width arguments from a ``RunConfig``
    (``data.packing``; the token multiple of the parallel layout and precision)."""
    from megatron_pwdpo.platform.decisions import config_token_multiple

    multiple = config_token_multiple(config)
    data = config.data
    if data.packing == "none":
        return {"pack_length": None, "token_multiple": multiple}
    return {
        "pack_length": data.seq_length,
        "packed_layout": "thd" if data.packing == "thd" else "mask",
        "token_multiple": multiple,
    }


def rank_micro_batches(
    examples: list[Example],
    *,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
    pad_id: int,
    weights: np.ndarray | None = None,
    pack_length: int | None = None,
    packed_layout: PackedLayout = "mask",
    fixed_width: int | None = None,
    token_multiple: int = 16,
) -> list[dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches of a global batch of examples.

    Args:
        examples: the whole global batch, in order.
        micro_batch_size: examples per micro-batch; with packing, sequences of
            ``pack_length`` per micro-batch.
        weights: ``[G]`` loss weights (zeros when None: evaluation).
        pack_length: pack rows first-fit-decreasing into sequences of at most this many
            positions (pairs stay within one micro-batch); None = one row per sequence.
            With ``mask``, each micro-batch's sequences are as narrow as its rows allow
            without needing more of them (``pack_rows(shrink_width=True)``) unless
            ``fixed_width`` is set; with ``thd`` the micro-batch's rows are one sequence
            (a multiple of `THD_TOKEN_MULTIPLE` positions).
        packed_layout: how packed rows are kept apart (``data.packing.pack_rows``):
            a block-diagonal ``mask`` (CPU) or ``thd`` boundaries (Transformer Engine).
        token_multiple: unpacked micro-batches are padded to a multiple of this width,
            ``thd`` sequences to a multiple of it and of `THD_TOKEN_MULTIPLE`
            (:func:`megatron_pwdpo.platform.decisions.token_multiple`: the GEMMs' alignment,
            sequence-parallel splits, FP8's tokens per rank); ``mask`` packing is for the
            local layer spec, which has neither sequence parallelism nor FP8, so its
            balanced widths are kept exact.
        fixed_width: pad every unpacked micro-batch to this width, and keep packed
            sequences ``pack_length`` wide, which must then equal it (the interleaved
            pipeline schedule exchanges activations of one fixed shape); None = each
            micro-batch to its longest row, or packed into its balanced width.

    Returns:
        One batch dict per micro-batch (see `make_micro_batch` / `pack_rows`), with
        ``weight`` ``[n]`` float32 (one per example) and ``num_tokens`` (0-d).

    Raises:
        ValueError: ``fixed_width`` and ``pack_length`` both set and different.
    """
    if pack_length is not None and fixed_width is not None and fixed_width != pack_length:
        raise ValueError(
            f"fixed_width ({fixed_width}) must equal pack_length ({pack_length}): packed "
            "sequences are pack_length wide"
        )
    weights = np.zeros(len(examples)) if weights is None else weights
    # equal blocks for training (validated divisible); the last ranks get one fewer
    # example when an evaluation set does not divide
    positions = np.array_split(np.arange(len(examples)), dp_size)[dp_rank]
    if pack_length is None:
        parts = split_micro_batches(positions, micro_batch_size)
    else:
        parts = _packed_parts(examples, positions, micro_batch_size, pack_length)
    batches = []
    for part in parts:
        rows = _rows_of([examples[i] for i in part])
        if pack_length is None:
            batch = make_micro_batch(
                rows, pad_id=pad_id, width=fixed_width, pad_multiple=token_multiple
            )
        else:
            batch = pack_rows(
                rows,
                seq_length=pack_length,
                pad_id=pad_id,
                layout=packed_layout,
                shrink_width=fixed_width is None,
                width_multiple=(
                    math.lcm(THD_TOKEN_MULTIPLE, token_multiple) if packed_layout == "thd" else 1
                ),
            )
            batch["num_tokens"] = torch.tensor(sum(r.input_ids.size - 1 for r in rows))
        batch["weight"] = torch.tensor(weights[part], dtype=torch.float32)
        batches.append(batch)
    return batches


def _sequences_needed(examples, part: np.ndarray, pack_length: int) -> int:
    """How many sequences `pack_rows` packs the examples at ``part`` into (same rows,
    same order, so the same first-fit-decreasing)."""
    rows = _rows_of([examples[i] for i in part])
    return len(pack_ffd([r.input_ids.size - 1 for r in rows], seq_length=pack_length))


def _packed_parts(
    examples, positions: np.ndarray, sequences_per_batch: int, pack_length: int
) -> list[np.ndarray]:
    """Group a rank's examples (``positions`` into ``examples``) into micro-batches whose
    rows pack into at most ``sequences_per_batch`` sequences of ``pack_length``.

    First-fit-decreasing over examples (a pair counts as its two rows; one longer than a
    sequence takes a sequence of its own), then consecutive example-bins join a group
    while `pack_rows`' own FFD over the group's rows still needs at most
    ``sequences_per_batch`` sequences. For single rows that is exactly
    ``sequences_per_batch`` bins a group (FFD restricted to some of its bins rebuilds
    them), but the rows of pairs can re-pack into more sequences than the pairs' bins
    (sizes 15 | 10 + 5 | 10 + 5 of pairs (9, 6), (6, 4), (1, 4), (6, 4), (4, 1) in
    sequences of 15: their rows need 4); a group of one bin may still need more (a pair
    longer than a sequence: two).

    Returns:
        Sorted ``positions`` entries, one array per micro-batch; deterministic.
    """
    sizes = [
        min(pack_length, sum(r.input_ids.size - 1 for r in _rows_of([examples[i]])))
        for i in positions
    ]
    groups: list[np.ndarray] = []
    current: list[int] = []
    for members in pack_ffd(sizes, seq_length=pack_length):
        grown = np.sort(positions[current + members])
        if current and _sequences_needed(examples, grown, pack_length) > sequences_per_batch:
            groups.append(np.sort(positions[current]))
            current = list(members)
        else:
            current += members
    if current:
        groups.append(np.sort(positions[current]))
    return groups
