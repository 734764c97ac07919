"""Packing: first-fit-decreasing, per-row positions and segments, block-diagonal causal mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_pwdpo.data.packing import balanced_width, block_causal_mask, pack_ffd, pack_rows
from megatron_pwdpo.data.tokenize import TokenizedRow, collate


def _rows(lengths: list[int], *, seed: int = 0) -> list[TokenizedRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate(lengths):
        ids = rng.integers(4, 100, size=n)
        prompt_len = int(rng.integers(1, n))  # at least one response token (eos)
        rows.append(TokenizedRow(i, ids, prompt_len, float(i % 2), i % 3 == 0, f"r{i}"))
    return rows


def test_ffd_packs_every_row_once_within_seq_length():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 65, size=200).tolist()
    bins = pack_ffd(lengths, seq_length=64)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= int(np.ceil(sum(lengths) / 64 * 11 / 9)) + 1  # FFD's bound
    assert bins == pack_ffd(lengths, seq_length=64)
    assert pack_ffd([5, 4, 3, 3, 1], seq_length=8) == [[0, 2], [1, 3, 4]]
    with pytest.raises(ValueError, match="row lengths"):
        pack_ffd([9], seq_length=8)


def test_mask_is_block_diagonal_and_causal():
    rows = _rows([9, 4, 7, 3, 12, 5, 2])
    batch = pack_rows(rows, seq_length=16, pad_id=0)
    seg, mask = batch["segment_ids"], batch["attention_mask"]
    b, s = seg.shape
    assert mask.shape == (b, 1, s, s) and mask.dtype == torch.bool
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    for k in range(b):
        visible = ~mask[k, 0]
        same = seg[k][:, None] == seg[k][None, :]
        assert not (visible & ~same).any()  # never across rows
        assert not (visible & (j > i)).any()  # never the future
        real = (seg[k] >= 0)[:, None]
        assert torch.equal(visible & real, same & (j <= i) & real)  # all of its own past
        assert visible.any(dim=1).all()  # padding still sees itself
    assert "cu_seqlens" not in batch


def test_thd_layout_is_one_sequence_bounding_every_row_and_the_padding_run():
    rows = _rows([9, 4, 7, 3, 12, 5, 2])  # 8 + 3 + 6 + 2 + 11 + 4 + 1 = 35 positions
    thd = pack_rows(rows, seq_length=16, pad_id=0, layout="thd", width_multiple=8)
    masked = pack_rows(rows, seq_length=16, pad_id=0)
    assert "attention_mask" not in thd
    assert thd["tokens"].shape == (1, 40)  # 35 rounded up to a multiple of 8: 5 padding
    assert masked["tokens"].numel() - 35 > 5  # (the mask layout pads more)
    for j in range(len(rows)):  # each row's content as in the mask layout
        a, c = masked["segment_ids"] == j, thd["segment_ids"] == j
        for key in ("tokens", "target_ids", "loss_mask", "position_ids"):
            assert thd[key][c].tolist() == masked[key][a].tolist(), key
    cu = thd["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == thd["tokens"].numel()
    # every run [cu_k, cu_k+1) of the flattened batch is one row or one padding tail,
    # and RoPE positions restart at each run exactly as position_ids do
    flat_seg = thd["segment_ids"].flatten()
    flat_pos = thd["position_ids"].flatten()
    lengths = (cu[1:] - cu[:-1]).tolist()
    assert int(thd["max_seqlen"]) == max(lengths)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        run = flat_seg[start:end]
        assert (run == run[0]).all()
        if run[0] >= 0:
            assert flat_pos[start:end].tolist() == list(range(end - start))
            assert end - start == rows[int(run[0])].input_ids.size - 1
    real_runs = sum(int(flat_seg[a] >= 0) for a in cu[:-1].tolist())
    assert real_runs == len(rows) and len(lengths) == len(rows) + 1  # + the padding run
    with pytest.raises(ValueError, match="row lengths"):  # a row longer than seq_length
        pack_rows(rows, seq_length=10, pad_id=0, layout="thd")
    with pytest.raises(ValueError, match="packed layout"):
        pack_rows(rows, seq_length=16, pad_id=0, layout="bshd")


def test_packed_rows_match_their_unpacked_batch():
    rows = _rows([9, 4, 7, 3, 12, 5, 2], seed=3)
    packed = pack_rows(rows, seq_length=16, pad_id=0)
    plain = collate(rows, seq_length=16, pad_id=0)
    seg = packed["segment_ids"]
    assert sorted(seg[seg >= 0].unique().tolist()) == list(range(len(rows)))
    for j, row in enumerate(rows):
        where = seg == j
        n = row.input_ids.size - 1
        assert where.sum() == n
        assert packed["tokens"][where].tolist() == plain["tokens"][j, :n].tolist()
        assert packed["target_ids"][where].tolist() == plain["target_ids"][j, :n].tolist()
        assert packed["loss_mask"][where].tolist() == plain["loss_mask"][j, :n].tolist()
        assert packed["position_ids"][where].tolist() == list(range(n))  # reset per row
    # per-row sums over segment ids in one op (what log-prob sums do)
    values = packed["target_ids"].double() * packed["loss_mask"]
    flat = seg.flatten()
    sums = torch.zeros(len(rows), dtype=torch.float64)
    sums.scatter_add_(0, flat.clamp(min=0), torch.where(flat >= 0, values.flatten(), 0.0))
    expected = (plain["target_ids"].double() * plain["loss_mask"]).sum(dim=1)
    assert torch.equal(sums, expected)
    assert torch.equal(packed["label"], plain["label"])
    assert torch.equal(packed["is_demo"], plain["is_demo"])
    assert (packed["loss_mask"][seg < 0] == 0).all()


def test_block_causal_mask_small_example():
    seg = torch.tensor([[0, 0, 1, -1]])
    visible = ~block_causal_mask(seg)[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool
    )
    assert torch.equal(visible, expected)


def test_balanced_width_hand_worked():
    # FFD at 16: [7, 6, 2 | pad 1], [5 | pad 11] -> 2 sequences, 12 of 32 positions padding.
    # Lower bound max(7, ceil(20 / 2)) = 10; at 10, 7 and 6 take a sequence each (3 and 4
    # left) and the 5 opens a third; at 11: [7, 2 | pad 2], [6, 5] -> 2 sequences, 2 of
    # 22 positions padding.
    lengths = [7, 6, 5, 2]
    assert pack_ffd(lengths, seq_length=16) == [[0, 1, 3], [2]]
    assert len(pack_ffd(lengths, seq_length=10)) == 3
    assert balanced_width(lengths, seq_length=16) == 11
    assert pack_ffd(lengths, seq_length=11) == [[0, 3], [1, 2]]
    assert balanced_width(lengths, seq_length=16, multiple=4) == 12
    assert balanced_width(lengths, seq_length=16, multiple=16) == 16
    # a perfect fit: [7, 2, 1] and [6, 4] in 10 (the lower bound ceil(20 / 2))
    assert balanced_width([7, 6, 4, 2, 1], seq_length=16) == 10
    # no multiple of 8 in [18, 18]: seq_length itself
    assert balanced_width([9, 9], seq_length=18, multiple=8) == 18
    with pytest.raises(ValueError, match="at least one"):
        balanced_width([], seq_length=16)
    with pytest.raises(ValueError, match="multiple"):
        balanced_width([3], seq_length=16, multiple=0)


def test_balanced_width_keeps_the_sequence_count_and_never_adds_padding():
    rng = np.random.default_rng(7)
    for trial in range(300):
        seq_length = int(rng.integers(8, 300))
        lengths = rng.integers(1, seq_length + 1, size=int(rng.integers(1, 40))).tolist()
        multiple = [1, 1, 8, 16][trial % 4]
        k = len(pack_ffd(lengths, seq_length=seq_length))
        width = balanced_width(lengths, seq_length=seq_length, multiple=multiple)
        assert max(lengths) <= width <= seq_length
        assert width == seq_length or width % multiple == 0
        bins = pack_ffd(lengths, seq_length=width)
        assert len(bins) <= k
        assert len(bins) * width <= k * seq_length  # padding fraction never increases
        assert width == balanced_width(lengths, seq_length=seq_length, multiple=multiple)
        # the next narrower candidate needs more sequences (or is below the lower bound)
        narrower = width - multiple if width % multiple == 0 else width // multiple * multiple
        lower = max(max(lengths), -(-sum(lengths) // k))
        if narrower >= lower:
            assert len(pack_ffd(lengths, seq_length=narrower)) > k


def test_shrunk_pack_has_the_same_rows_in_the_same_sequence_count():
    layout = "mask"  # (thd packs every row into one sequence: nothing to shrink)
    rows = _rows([40, 33, 31, 25, 17, 12, 9, 6, 3], seed=5)  # 39, 32, ... 2: 167 positions
    full = pack_rows(rows, seq_length=64, pad_id=0, layout=layout)
    shrunk = pack_rows(rows, seq_length=64, pad_id=0, layout=layout, shrink_width=True)
    lengths = [r.input_ids.size - 1 for r in rows]
    width = balanced_width(lengths, seq_length=64)
    b = full["tokens"].shape[0]
    # FFD at 64: [39, 24], [32, 30, 2], [16, 11, 8, 5] (25 padding); at the lower bound
    # ceil(167 / 3) = 56: [39, 16], [32, 24], [30, 11, 8, 5, 2] (1 padding)
    assert b == 3 and width == 56
    assert shrunk["tokens"].shape == (b, width)
    for key in ("target_ids", "loss_mask", "position_ids", "segment_ids"):
        assert shrunk[key].shape == (b, width)
    real = sum(lengths)
    assert int((shrunk["segment_ids"] >= 0).sum()) == real
    assert 1 - real / shrunk["tokens"].numel() < 1 - real / full["tokens"].numel()
    for j, n in enumerate(lengths):  # per row: the same tokens, targets, mask, positions
        a, c = full["segment_ids"] == j, shrunk["segment_ids"] == j
        assert int(c.sum()) == n
        for key in ("tokens", "target_ids", "loss_mask", "position_ids"):
            assert shrunk[key][c].tolist() == full[key][a].tolist(), key
    for key in ("label", "is_demo", "row_index"):
        assert torch.equal(shrunk[key], full[key])
    assert shrunk["attention_mask"].shape == (b, 1, width, width)
    assert torch.equal(shrunk["attention_mask"], block_causal_mask(shrunk["segment_ids"]))
    multiple = pack_rows(rows, seq_length=64, pad_id=0, shrink_width=True, width_multiple=12)
    assert multiple["tokens"].shape == (3, 60)
