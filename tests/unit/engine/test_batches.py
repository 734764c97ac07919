"""Global batch -> micro-batches: loss weights, pairs, KTO's mismatched rows, the KL point."""

import numpy as np
import pytest
import torch

from megatron_pwdpo.data.packing import pack_ffd
from megatron_pwdpo.data.tokenize import TokenizedRow
from megatron_pwdpo.engine.batches import global_weights, mismatched, pair_up, rank_micro_batches
from megatron_pwdpo.engine.step import kto_reference_point


def _row(i, prompt, response, label, rid=None):
    ids = np.array([2, *prompt, *response, 3], dtype=np.int64)
    return TokenizedRow(i, ids, 1 + len(prompt), label, label == 1.0, rid or f"r{i}")


def test_global_mean_and_per_class_weights():
    rows = [_row(i, [5], [6], lab) for i, lab in enumerate([1.0, 0.0, 0.0, 0.7, 0.2])]
    np.testing.assert_allclose(global_weights(rows, normalization="global_mean"), [0.2] * 5)
    per_class = global_weights(rows, normalization="per_class")
    # desirable: labels 1.0 and 0.7 (2 rows); undesirable: 3 rows
    np.testing.assert_allclose(per_class, [1 / 2, 1 / 3, 1 / 3, 1 / 2, 1 / 3])
    only_desirable = global_weights(rows[:1], normalization="per_class")
    np.testing.assert_allclose(only_desirable, [1.0])


def test_pair_up_matches_ids_and_skips_orphans():
    rows = [
        _row(0, [5], [6], 1.0, "hh-000001-c"),
        _row(1, [5], [7], 0.0, "hh-000001-r"),
        _row(2, [5], [8], 1.0, "hh-000002-c"),  # its rejected row was dropped
        _row(3, [9], [9], 0.0, "hh-000003-r"),
    ]
    pairs = pair_up(rows)
    assert [(c.id, r.id) for c, r in pairs] == [("hh-000001-c", "hh-000001-r")]


def test_pairwise_micro_batch_stacks_chosen_then_rejected():
    pairs = [
        (_row(2 * i, [5], [10 + i], 1.0), _row(2 * i + 1, [5], [20 + i], 0.0)) for i in range(4)
    ]
    batches = rank_micro_batches(
        pairs, dp_rank=1, dp_size=2, micro_batch_size=2, pad_id=0, weights=np.full(4, 0.25)
    )
    assert len(batches) == 1
    (batch,) = batches
    # rank 1 holds pairs 2 and 3: chosen 12, 13 then rejected 22, 23 (response token at t=1)
    assert batch["target_ids"][:, 1].tolist() == [12, 13, 22, 23]
    assert batch["weight"].tolist() == [0.25, 0.25]


def test_mismatched_rows_rotate_responses_and_fit():
    rows = [_row(0, [5, 5, 5], [6], 1.0), _row(1, [7], [8, 8, 8, 8], 0.0)]
    shifted = mismatched(rows, seq_length=5)
    # row 0: its prompt (bos + 3) with row 1's response (4 + eos) is 9 tokens > 6, so the
    # prompt is left-truncated down to bos alone
    assert shifted[0].input_ids.tolist() == [2, 8, 8, 8, 8, 3]
    assert shifted[0].prompt_len == 1
    assert shifted[0].input_ids[shifted[0].prompt_len :].tolist() == [8, 8, 8, 8, 3]
    assert shifted[1].input_ids.tolist() == [2, 7, 6, 3]
    assert shifted[1].prompt_len == 2


def test_kto_reference_point_is_mean_ratio_clamped_and_detached():
    pol = [torch.tensor([-1.0, -2.0], requires_grad=True), torch.tensor([-3.0])]
    ref = [torch.tensor([-1.5, -2.5]), torch.tensor([-3.5])]
    kl = kto_reference_point(pol, ref, dp_group=None)
    assert kl.item() == pytest.approx(0.5) and not kl.requires_grad
    assert kto_reference_point(ref, pol, dp_group=None).item() == 0.0


def _sized(i: int, positions: int, label: float = 1.0, rid=None) -> TokenizedRow:
    """A row of ``positions`` positions (``positions + 1`` tokens, prompt of 1)."""
    ids = np.arange(10, 11 + positions, dtype=np.int64)
    return TokenizedRow(i, ids, 1, label, False, rid or f"r{i}")


def test_packed_micro_batches_shrink_unless_the_width_is_fixed():
    # 7, 6, 5, 2 positions: FFD into 16 needs 2 sequences, which also fit into 11
    rows = [_sized(i, n) for i, n in enumerate([7, 6, 5, 2])]
    kw = dict(dp_rank=0, dp_size=1, micro_batch_size=2, pad_id=0, pack_length=16)
    (shrunk,) = rank_micro_batches(rows, **kw)
    (fixed,) = rank_micro_batches(rows, fixed_width=16, **kw)  # interleaved pipelining
    assert shrunk["tokens"].shape == (2, 11) and fixed["tokens"].shape == (2, 16)
    assert shrunk["attention_mask"].shape == (2, 1, 11, 11)
    assert int(shrunk["num_tokens"]) == int(fixed["num_tokens"]) == 20
    for j in range(4):  # each row's positions hold the same tokens and loss mask
        a, b = fixed["segment_ids"] == j, shrunk["segment_ids"] == j
        assert shrunk["tokens"][b].tolist() == fixed["tokens"][a].tolist()
        assert shrunk["loss_mask"][b].tolist() == fixed["loss_mask"][a].tolist()
    (thd,) = rank_micro_batches(rows, packed_layout="thd", **kw)
    assert thd["tokens"].shape == (1, 64)  # one sequence: 20 positions, a multiple of 64
    assert thd["cu_seqlens"].tolist() == [0, 7, 13, 18, 20, 64]  # rows, then the padding
    with pytest.raises(ValueError, match="must equal pack_length"):
        rank_micro_batches(rows, fixed_width=32, **kw)


def test_packed_pairs_never_need_more_sequences_than_the_micro_batch_size():
    # pairs (chosen, rejected) of (9, 6), (6, 4), (1, 4), (6, 4), (4, 1) positions in
    # sequences of 15: FFD over pair sizes gives 3 bins, 15 | 10 + 5 | 10 + 5, but FFD
    # over their rows needs 4 sequences: [9, 6], [6, 6, 1, 1], [4, 4, 4], [4]
    sizes = [(9, 6), (6, 4), (1, 4), (6, 4), (4, 1)]
    pairs = [
        (_sized(2 * k, c, 1.0, f"p{k}-c"), _sized(2 * k + 1, r, 0.0, f"p{k}-r"))
        for k, (c, r) in enumerate(sizes)
    ]
    batches = rank_micro_batches(
        pairs, dp_rank=0, dp_size=1, micro_batch_size=3, pad_id=0, pack_length=15
    )
    assert len(pack_ffd([9, 6, 1, 6, 4, 6, 4, 4, 4, 1], seq_length=15)) == 4
    # pairs 0-2 pack into 2 sequences, adding pairs 3 and 4 would need 4: two micro-batches
    assert [b["tokens"].shape[0] for b in batches] == [2, 1]
    assert [len(b["weight"]) for b in batches] == [3, 2]
    seen = sorted(int(i) for b in batches for i in b["row_index"])
    assert seen == list(range(10))  # every row once, each pair within one micro-batch
    for b in batches:
        n = len(b["weight"])
        chosen, rejected = b["row_index"][:n], b["row_index"][n:]
        assert (rejected == chosen + 1).all()
    # point-wise rows: groups of exactly micro_batch_size FFD bins, as before
    rows = [_sized(i, n) for i, n in enumerate([9, 9, 8, 7, 6, 6, 5, 4, 3, 2, 2, 1])]
    batches = rank_micro_batches(
        rows, dp_rank=0, dp_size=1, micro_batch_size=2, pad_id=0, pack_length=10
    )
    assert [b["tokens"].shape[0] for b in batches] == [2, 2, 2, 1]
