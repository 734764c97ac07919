"""Sequence packing: several tokenised rows per sequence of a batch.

A row of ``L`` tokens (``input_ids``) occupies ``L - 1`` positions (the model reads
``input_ids[:-1]`` and predicts ``input_ids[1:]``, as in `collate`). `pack_ffd` places
rows into sequences of ``seq_length`` positions first-fit-decreasing; `pack_rows` builds
the batch::

    sequence 0   | row 3 ........ | row 0 ..... | row 5 .. | pad  |
    segment_ids    0 0 0 0 0 0 0    1 1 1 1 1 1   2 2 2 2   -1 -1    (row's slot in the batch)
    position_ids   0 1 2 3 4 5 6    0 1 2 3 4 5   0 1 2 3    0  0    (reset per row)

Attention never crosses rows, in one of two layouts:

* ``mask`` (CPU, megatron-core's local layer spec): ``attention_mask`` is ``[b, 1, s, s]``
  bool with **True = masked** (Megatron's convention): position ``i`` sees position
  ``j`` iff both belong to the same row and ``j <= i``; a padding position sees only
  itself (so no softmax row is empty).
* ``thd`` (GPU, Transformer Engine): the rows are concatenated into **one** sequence
  ``[1, T]`` with no padding between them (``T`` = their positions, rounded up to a
  multiple of ``width_multiple`` by one padding run at the end), ``cu_seqlens`` ``[k+1]``
  int32 the boundaries of every row and of that run, and ``max_seqlen``; the model runs
  it with Megatron's ``PackedSeqParams(qkv_format="thd")`` (see
  ``logprobs.packed_seq_params``): attention is computed per row, never over padding,
  and RoPE restarts at every boundary, as ``position_ids`` do. A micro-batch holds as
  many rows as FFD fits into its ``micro_batch_size`` sequences of ``seq_length``, so
  ``T`` is at most that many positions (plus the rounding).

With ``shrink_width`` the sequences are narrower than ``seq_length`` when the rows allow
it (`balanced_width`): FFD needs ``k`` sequences of ``seq_length``; the batch is packed
into the narrowest width at which FFD still needs no more than ``k``, which removes the
padding tail the sequences would otherwise share (rows a, b, c, d of 7, 6, 5, 2
positions, ``seq_length=16``; ``.`` is padding)::

    width 16: 2 sequences, 32 positions, 12 padding    width 11: 2 sequences, 22, 2 padding
    a a a a a a a b b b b b b d d .                    a a a a a a a d d . .
    c c c c c . . . . . . . . . . .                    b b b b b b c c c c c

Per-row log-prob sums are ``scatter_add`` of token log-probs over ``segment_ids``
(padding, -1, excluded), one vectorised op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from megatron_pwdpo.data.tokenize import TokenizedRow


def pack_ffd(lengths: Sequence[int], *, seq_length: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of row lengths (in positions) into ``seq_length``.

    Args:
        lengths: positions each row needs (``input_ids.size - 1``).
        seq_length: positions per sequence.

    Returns:
        One list of row indices per sequence, each in decreasing length order (ties in
        index order); deterministic.

    Raises:
        ValueError: a row longer than ``seq_length`` or not positive.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.max() > seq_length or lengths.min() <= 0):
        raise ValueError(
            f"row lengths must be in [1, {seq_length}], got {lengths.min()}..{lengths.max()}"
        )
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        need = int(lengths[i])
        for b, room in enumerate(free):
            if need <= room:
                bins[b].append(int(i))
                free[b] -= need
                break
        else:
            bins.append([int(i)])
            free.append(seq_length - need)
    return bins


def balanced_width(lengths: Sequence[int], *, seq_length: int, multiple: int = 1) -> int:
    """The narrowest width at which `pack_ffd` packs ``lengths`` into as few sequences as
    at ``seq_length``.

    FFD at ``seq_length`` needs ``k`` sequences; a binary search over the widths ``W`` in
    ``[max(longest row, ceil(total / k)), seq_length]`` (multiples of ``multiple``, and
    ``seq_length`` itself) finds the smallest at which FFD needs at most ``k``. FFD's
    sequence count is not monotone in the width for every input, so in such a case the
    result is a width at which FFD needs at most ``k`` sequences whose next smaller
    candidate needs more; never wider than ``seq_length``, so a batch packed into it
    never has more positions (``k * W``) than one packed into ``seq_length``.

    Args:
        lengths: positions each row needs (``input_ids.size - 1``), at least one.
        seq_length: the widest sequence allowed.
        multiple: the width is a multiple of this (or ``seq_length`` itself).

    Returns:
        The width ``W <= seq_length``; deterministic (a function of ``lengths`` and the
        arguments only).

    Raises:
        ValueError: no lengths, ``multiple < 1``, or a row that `pack_ffd` refuses.
    """
    if len(lengths) == 0:
        raise ValueError("balanced_width needs at least one row length")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    k = len(pack_ffd(lengths, seq_length=seq_length))
    lower = max(max(lengths), -(-sum(lengths) // k))

    def width(j: int) -> int:  # candidate j; past the last multiple: seq_length itself
        return min(j * multiple, seq_length)

    lo, hi = -(-lower // multiple), seq_length // multiple + 1  # width(hi) == seq_length
    while lo < hi:  # invariant: FFD fits into k sequences of width(hi)
        mid = (lo + hi) // 2
        if len(pack_ffd(lengths, seq_length=width(mid))) <= k:
            hi = mid
        else:
            lo = mid + 1
    return width(hi)


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[b, 1, s, s]`` bool, True = masked: same row and not in the future (pad: itself)."""
    s = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [b, s, s]
    causal = torch.ones(s, s, dtype=torch.bool).tril()  # [s, s]
    visible = same & causal & (segment_ids[:, :, None] >= 0)
    visible |= torch.eye(s, dtype=torch.bool)  # padding sees itself
    return ~visible[:, None]


def cu_seqlens_of(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[k+1]`` int32 boundaries of the runs of equal segment ids in the flattened batch.

    Each row and each sequence's padding tail is one run (padding attends only to itself
    in `block_causal_mask`; THD kernels treat it as its own sequence).
    """
    b, s = segment_ids.shape
    starts = torch.ones(b, s, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    flat = torch.flatten(starts).nonzero().flatten()
    return torch.cat([flat, torch.tensor([b * s])]).to(torch.int32)


PackedLayout = Literal["mask", "thd"]


def pack_rows(
    rows: Sequence[TokenizedRow],
    *,
    seq_length: int,
    pad_id: int,
    layout: PackedLayout = "mask",
    shrink_width: bool = False,
    width_multiple: int = 1,
) -> dict[str, torch.Tensor]:
    """Packs rows (`pack_ffd`) into a batch of ``b`` sequences of ``s`` positions.

    Args:
        rows: the rows; their order is kept in the per-row outputs and ``segment_ids``.
        seq_length: the sequences' width ``s`` (the widest allowed with ``shrink_width``).
        pad_id: the token id of padding positions.
        layout: ``mask`` (block-diagonal ``attention_mask``) or ``thd`` (``cu_seqlens``;
            every row in one sequence, ``b = 1``, see the module docstring).
        shrink_width: ``mask``: pack into ``s = balanced_width(...) <= seq_length``
            instead: as many sequences as FFD needs at ``seq_length``, each row's content
            the same.
        width_multiple: ``s`` is a multiple of this: with ``shrink_width`` (or
            ``seq_length``), and always for ``thd``.

    Returns:
        ``tokens``, ``target_ids`` [b, s] int64 (pad: ``pad_id``), ``loss_mask`` [b, s]
        float32 (1 on response targets, eos included), ``position_ids`` [b, s] int64
        (reset at each row), ``segment_ids`` [b, s] int64 (the row's index in ``rows``,
        -1 on padding); for ``layout="mask"`` ``attention_mask`` [b, 1, s, s] bool (True
        = masked), for ``layout="thd"`` ``cu_seqlens`` [k+1] int32 and ``max_seqlen`` (a
        0-d int64); and per row (in ``rows`` order): ``label`` [n] float32, ``is_demo``
        [n] bool, ``row_index`` [n] int64.

    Raises:
        ValueError: no rows, or a row longer than ``seq_length + 1`` tokens.
    """
    if not rows:
        raise ValueError("pack_rows needs at least one row")
    lengths = [r.input_ids.size - 1 for r in rows]
    if layout == "thd":  # one sequence, rows back to back (each still within seq_length)
        pack_ffd([max(lengths)], seq_length=seq_length)  # the same check of row lengths
        bins = [list(range(len(rows)))]
        s = -(-sum(lengths) // width_multiple) * width_multiple
    else:
        s = seq_length
        if shrink_width:
            s = balanced_width(lengths, seq_length=seq_length, multiple=width_multiple)
        bins = pack_ffd(lengths, seq_length=s)
    b = len(bins)
    tokens = np.full((b, s), pad_id, dtype=np.int64)
    targets = np.full((b, s), pad_id, dtype=np.int64)
    loss_mask = np.zeros((b, s), dtype=np.float32)
    positions = np.zeros((b, s), dtype=np.int64)
    segments = np.full((b, s), -1, dtype=np.int64)
    for k, members in enumerate(bins):
        at = 0
        for j in members:
            ids = np.asarray(rows[j].input_ids, dtype=np.int64)
            n = ids.size - 1
            tokens[k, at : at + n] = ids[:-1]
            targets[k, at : at + n] = ids[1:]
            loss_mask[k, at + rows[j].prompt_len - 1 : at + n] = 1.0
            positions[k, at : at + n] = np.arange(n)
            segments[k, at : at + n] = j
            at += n
    segment_ids = torch.from_numpy(segments)
    if layout == "mask":
        attention = {"attention_mask": block_causal_mask(segment_ids)}
    elif layout == "thd":
        cu_seqlens = cu_seqlens_of(segment_ids)
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        attention = {"cu_seqlens": cu_seqlens, "max_seqlen": torch.tensor(longest)}
    else:
        raise ValueError(f"unknown packed layout {layout!r} (mask or thd)")
    return {
        "tokens": torch.from_numpy(tokens),
        "target_ids": torch.from_numpy(targets),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(positions),
        "segment_ids": segment_ids,
        **attention,
        "label": torch.tensor([r.label for r in rows], dtype=torch.float32),
        "is_demo": torch.tensor([r.is_demo for r in rows], dtype=torch.bool),
        "row_index": torch.tensor([r.row_index for r in rows], dtype=torch.int64),
    }
