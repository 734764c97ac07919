"""The resumable data-parallel sampler."""

import numpy as np
import pytest

from megatron_pwdpo.data.sampler import GlobalBatchSampler, rank_block, split_micro_batches


def test_each_epoch_is_a_permutation_and_epochs_differ():
    sampler = GlobalBatchSampler(10, global_batch_size=5, seed=3)
    first, second = sampler.stream(0, 10), sampler.stream(10, 10)
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert not np.array_equal(first, second)


def test_resume_from_consumed_samples_neither_repeats_nor_skips():
    full = GlobalBatchSampler(7, global_batch_size=3, seed=0)
    uninterrupted = np.concatenate([full.global_batch(3 * k) for k in range(6)])
    resumed = GlobalBatchSampler(7, global_batch_size=3, seed=0)  # a fresh process
    after = np.concatenate([resumed.global_batch(3 * k) for k in range(3, 6)])
    np.testing.assert_array_equal(uninterrupted[9:], after)
    np.testing.assert_array_equal(uninterrupted, full.stream(0, 18))


def test_seed_changes_order():
    a = GlobalBatchSampler(50, global_batch_size=5, seed=0).stream(0, 50)
    b = GlobalBatchSampler(50, global_batch_size=5, seed=1).stream(0, 50)
    assert not np.array_equal(a, b)


def test_rank_blocks_partition_the_global_batch():
    rows = np.arange(12)
    blocks = [rank_block(rows, dp_rank=r, dp_size=3) for r in range(3)]
    np.testing.assert_array_equal(np.concatenate(blocks), rows)
    assert [len(m) for m in split_micro_batches(blocks[0], 2)] == [2, 2]


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="empty"):
        GlobalBatchSampler(0, global_batch_size=1, seed=0)
