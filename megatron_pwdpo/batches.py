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

import numpy as np
import torch

from megatron_pwdpo.data.packing import PackedLayout, pack_ffd, pack_rows
from megatron_pwdpo.data.prepare import make_micro_batch
from megatron_pwdpo.data.sampler import split_micro_batches
from megatron_pwdpo.data.tokenize import TokenizedRow

Pair = tuple[TokenizedRow, TokenizedRow]
Example = TokenizedRow | Pair


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


def packing_options(data) -> dict:
    """``rank_micro_batches``' packing arguments from a ``DataConfig`` (``data.packing``)."""
    if data.packing == "none":
        return {"pack_length": None}
    return {
        "pack_length": data.seq_length,
        "packed_layout": "thd" if data.packing == "thd" else "mask",
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
) -> list[dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches of a global batch of examples.

    Args:
        examples: the whole global batch, in order.
        micro_batch_size: examples per micro-batch; with packing, sequences of
            ``pack_length`` per micro-batch.
        weights: ``[G]`` loss weights (zeros when None: evaluation).
        pack_length: pack rows first-fit-decreasing into sequences of this many
            positions (pairs stay within one micro-batch); None = one row per sequence.
        packed_layout: how packed rows are kept apart (``data.packing.pack_rows``):
            a block-diagonal ``mask`` (CPU) or ``thd`` boundaries (Transformer Engine).
        fixed_width: pad every unpacked micro-batch to this width (the interleaved
            pipeline schedule exchanges activations of one fixed shape); None = each
            micro-batch to its longest row.
    """
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
            batch = make_micro_batch(rows, pad_id=pad_id, width=fixed_width)
        else:
            batch = pack_rows(rows, seq_length=pack_length, pad_id=pad_id, layout=packed_layout)
            batch["num_tokens"] = torch.tensor(sum(r.input_ids.size - 1 for r in rows))
        batch["weight"] = torch.tensor(weights[part], dtype=torch.float32)
        batches.append(batch)
    return batches


def _packed_parts(examples, positions, sequences_per_batch: int, pack_length: int):
    """Group a rank's examples so that each group packs into about ``sequences_per_batch``
    sequences: first-fit-decreasing over examples (a pair counts as its two rows; one
    longer than a sequence takes a sequence of its own and spills into a second)."""
    sizes = [
        min(pack_length, sum(r.input_ids.size - 1 for r in _rows_of([examples[i]])))
        for i in positions
    ]
    bins = pack_ffd(sizes, seq_length=pack_length)
    groups = []
    for j in range(0, len(bins), sequences_per_batch):
        members = [i for b in bins[j : j + sequences_per_batch] for i in b]
        groups.append(np.sort(positions[members]))
    return groups
