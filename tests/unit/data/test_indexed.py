"""Preprocessed (memory-mapped) rows, the raw path's equal; resumable, balanced sampling."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_pwdpo.config import DataConfig
from megatron_pwdpo.data.indexed import (
    fingerprint_for,
    load_preprocessed,
    read_indexed,
    write_indexed,
)
from megatron_pwdpo.data.loading import load_source_rows, prompt_groups
from megatron_pwdpo.data.prepare import make_micro_batch, prepare_data
from megatron_pwdpo.data.sampler import GlobalBatchSampler, rank_block, split_micro_batches
from megatron_pwdpo.data.schema import DataError
from megatron_pwdpo.data.tokenize import tokenize_rows
from megatron_pwdpo.data.tokenizer import SentencePieceTokenizer

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "data"
SLICE = EXAMPLES / "hh_rlhf_harmless_base_test.jsonl.gz"
TOKENIZER = EXAMPLES / "tokenizer.model"
SEQ = 128


@pytest.fixture(scope="module")
def tok() -> SentencePieceTokenizer:
    return SentencePieceTokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def raw(tok):
    rows = load_source_rows(SLICE, source="hh-rlhf")
    tokenized, stats = tokenize_rows(rows, tok, seq_length=SEQ)
    return rows, tokenized, stats


@pytest.fixture(scope="module")
def prefix(tmp_path_factory, raw, tok) -> Path:
    rows, tokenized, stats = raw
    out = tmp_path_factory.mktemp("pre") / "hh"
    fingerprint = fingerprint_for(tok, seq_length=SEQ)
    write_indexed(out, tokenized, stats, groups=prompt_groups(rows), fingerprint=fingerprint)
    return out


def _same_rows(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.row_index, x.prompt_len, x.label, x.is_demo, x.id) == (
            y.row_index,
            y.prompt_len,
            y.label,
            y.is_demo,
            y.id,
        )
        np.testing.assert_array_equal(x.input_ids, y.input_ids)


def test_round_trip_is_memory_mapped_and_equal(prefix, raw, tok):
    _, tokenized, stats = raw
    data = load_preprocessed(prefix, tok, seq_length=SEQ)
    _same_rows(data.rows, tokenized)
    assert isinstance(data.rows[0].input_ids, np.memmap)
    assert data.stats == stats and data.rows_in == stats.rows_in == len(data.groups)
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["hh.bin", "hh.idx.npz", "hh.json"]


def test_mismatched_or_partial_files_are_refused(prefix, tmp_path, tok, raw):
    with pytest.raises(DataError, match="another tokenizer, seq_length"):
        load_preprocessed(prefix, tok, seq_length=SEQ + 1)
    with pytest.raises(DataError, match="no preprocessed data"):
        read_indexed(tmp_path / "none")
    rows, tokenized, stats = raw
    # a second preprocess that died after replacing .bin: old .json, new .bin
    other = tmp_path / "other"
    for name in ("bin", "idx.npz", "json"):
        Path(f"{other}.{name}").write_bytes(Path(f"{prefix}.{name}").read_bytes())
    write_indexed(
        tmp_path / "new", tokenized[:10], stats, groups=prompt_groups(rows), fingerprint="f"
    )
    Path(f"{other}.bin").write_bytes(Path(f"{tmp_path}/new.bin").read_bytes())
    with pytest.raises(DataError, match="incomplete or mixed"):
        read_indexed(other)
    Path(f"{other}.bin").write_bytes(Path(f"{prefix}.bin").read_bytes())
    Path(f"{other}.idx.npz").write_bytes(Path(f"{tmp_path}/new.idx.npz").read_bytes())
    with pytest.raises(DataError, match="incomplete or mixed"):
        read_indexed(other)
    with pytest.raises(DataError, match="no row fits"):
        write_indexed(tmp_path / "empty", [], stats, groups=np.zeros(0), fingerprint="f")
    assert not list(tmp_path.glob("empty*"))


def _cfg(**kw) -> DataConfig:
    base = DataConfig(path=str(SLICE), tokenizer=str(TOKENIZER), seq_length=SEQ, eval_rows=64)
    return dataclasses.replace(base, **kw)


def test_preprocessed_path_gives_the_same_batches(prefix):
    raw = prepare_data(_cfg(), vocab_size=2048)
    pre = prepare_data(_cfg(source="preprocessed", path=str(prefix)), vocab_size=2048)
    _same_rows(raw.train, pre.train)
    _same_rows(raw.eval, pre.eval)
    assert raw.summary() == pre.summary()
    assert "train labels [0,0.2)" in raw.summary()
    samplers = [GlobalBatchSampler(len(d.train), global_batch_size=8, seed=5) for d in (raw, pre)]
    for step in range(5):
        for rank in range(2):
            batches = []
            for data_set, sampler in zip((raw, pre), samplers, strict=True):
                mine = rank_block(sampler.global_batch(8 * step), dp_rank=rank, dp_size=2)
                rows = [data_set.train[i] for i in mine]
                batches.append(make_micro_batch(rows, pad_id=0))
            assert batches[0].keys() == batches[1].keys()
            for key in batches[0]:
                assert torch.equal(batches[0][key], batches[1][key]), key


# --- resumable, data-parallel, balanced sampling -------------------------------------------


def _rows_seen(labels, *, start: int, steps: int, dp: int, balance: bool, gbs: int = 12):
    """Ids per DP rank and micro-batch, as a run from step ``start`` would see them."""
    sampler = GlobalBatchSampler(
        len(labels), global_batch_size=gbs, seed=7, labels=labels, balance=balance
    )
    seen = {r: [] for r in range(dp)}
    for step in range(start, start + steps):
        batch = sampler.global_batch(step * gbs)
        for r in range(dp):
            for micro in split_micro_batches(rank_block(batch, dp_rank=r, dp_size=dp), 2):
                seen[r].append(micro.tolist())
    return seen


@pytest.mark.parametrize("balance", [False, True])
@pytest.mark.parametrize("dp", [1, 2, 3])
def test_interrupted_and_resumed_run_sees_the_same_rows(prefix, dp, balance):
    labels = np.array([r.label for r in read_indexed(prefix).rows[:47]])
    total, k = 20, 7  # 20 steps of 12 rows: several epochs of 47 rows (or 2 x 24 balanced)
    uninterrupted = _rows_seen(labels, start=0, steps=total, dp=dp, balance=balance)
    first = _rows_seen(labels, start=0, steps=k, dp=dp, balance=balance)
    labels_again = np.array([r.label for r in read_indexed(prefix).rows[:47]])  # a new process
    resumed = _rows_seen(labels_again, start=k, steps=total - k, dp=dp, balance=balance)
    for r in range(dp):
        assert first[r] + resumed[r] == uninterrupted[r]


def test_balanced_stream_alternates_classes_and_covers_each_epoch():
    labels = np.array([1.0] * 3 + [0.0] * 10 + [0.7, 0.2])  # 4 desirable, 11 undesirable
    sampler = GlobalBatchSampler(15, global_batch_size=4, seed=0, labels=labels, balance=True)
    assert sampler.epoch_length == 22
    for epoch in range(3):
        order = sampler.stream(22 * epoch, 22)
        pairs = (labels[order] > 0.5).reshape(-1, 2)
        assert (pairs.sum(axis=1) == 1).all()  # one of each class in every pair
        undesirable = order[labels[order] <= 0.5]
        assert sorted(undesirable) == sorted(np.flatnonzero(labels <= 0.5))  # each once
        desirable = order[labels[order] > 0.5]
        assert set(np.bincount(desirable, minlength=15)[labels > 0.5]) <= {2, 3}
    assert not np.array_equal(sampler.stream(0, 22), sampler.stream(22, 22))
    unbalanced = GlobalBatchSampler(15, global_batch_size=4, seed=0)
    assert sorted(unbalanced.stream(0, 15)) == list(range(15))
    with pytest.raises(ValueError, match="desirable and undesirable"):
        GlobalBatchSampler(3, global_batch_size=2, seed=0, labels=[1, 1, 1], balance=True)
