"""From a data config to tokenised train and held-out rows, checked before training.

Every rank runs this on its own (it is cheap next to the training and needs no
communication); rank 0 prints the summary. Any bad input raises ``DataError`` naming
the file and line before a model is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_pwdpo.data.hf_tokenizer import load_tokenizer
from megatron_pwdpo.data.indexed import load_preprocessed
from megatron_pwdpo.data.loading import (
    detect_source,
    heldout_cut,
    label_histogram,
    load_source_rows,
    prompt_groups,
)
from megatron_pwdpo.data.schema import DataError, PointwiseRow
from megatron_pwdpo.data.tokenize import TokenizedRow, TokenizeStats, collate, tokenize_rows
from megatron_pwdpo.data.tokenizer import Tokenizer


@dataclass
class PreparedData:
    """Tokenised rows of one run.

    Attributes:
        train: training rows.
        eval: held-out rows (the end of the file; rows sharing a prompt stay together).
        tokenizer: the tokenizer (its ``pad_id`` pads batches).
        stats: tokenisation counts of train + eval.
    """

    train: list[TokenizedRow]
    eval: list[TokenizedRow]
    tokenizer: Tokenizer
    stats: TokenizeStats

    def summary(self) -> str:
        """Rows per split and class, the train label histogram, lengths and drops."""
        labels = np.array([r.label for r in self.train])
        demos = sum(r.is_demo for r in self.train)
        return (
            f"data: {len(self.train)} train rows ({int((labels > 0.5).sum())} desirable, "
            f"{int((labels <= 0.5).sum())} undesirable, {demos} demonstrations), "
            f"{len(self.eval)} held-out rows\n"
            f"data: train labels {label_histogram(labels)}\n"
            f"data: {self.stats.summary()}"
        )


def load_rows_from_path(
    path: str, *, source: str, hh_mode: str = "paired", demo_chosen: bool = False, **options
) -> list[PointwiseRow]:
    """Canonical rows of any source (`load_source_rows`), with unique ids."""
    return load_source_rows(
        path, source=source, hh_mode=hh_mode, demo_chosen=demo_chosen, **options
    )


def load_rows(cfg, *, source: str | None = None) -> list[PointwiseRow]:
    """Canonical rows of a :class:`~megatron_pwdpo.config.DataConfig` (``source``: the
    already detected source of ``data.source=auto``)."""
    return load_rows_from_path(
        cfg.path,
        source=source or cfg.source,
        hh_mode=cfg.hh_mode,
        demo_chosen=cfg.demo_chosen,
        seed=cfg.unpaired_seed,
        red_team_score=cfg.red_team_score,
        red_team_normalisation=cfg.red_team_normalisation,
        red_team_score_range=cfg.red_team_score_range,
        qa_mode=cfg.qa_mode,
        split=cfg.split,
    )


def _tokenizer(cfg, vocab_size: int) -> Tokenizer:
    tokenizer = load_tokenizer(cfg.tokenizer, kind=cfg.tokenizer_type)
    if tokenizer.vocab_size > vocab_size:
        raise DataError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {vocab_size}",
            path=cfg.tokenizer,
        )
    return tokenizer


def prepare_data(cfg, *, vocab_size: int) -> PreparedData:
    """Load (or map preprocessed rows), split (the last ``eval_rows`` rows, whole prompt
    groups, are held out) and tokenise."""
    source = detect_source(cfg.path, split=cfg.split) if cfg.source == "auto" else cfg.source
    if source == "preprocessed":
        tokenizer = _tokenizer(cfg, vocab_size)
        pre = load_preprocessed(cfg.path, tokenizer, seq_length=cfg.seq_length)
        tokenized, stats, groups = pre.rows, pre.stats, pre.groups
    else:
        rows = load_rows(cfg, source=source)
        tokenizer = _tokenizer(cfg, vocab_size)
        tokenized, stats = tokenize_rows(rows, tokenizer, seq_length=cfg.seq_length)
        groups = prompt_groups(rows)
    if cfg.eval_rows >= len(groups):
        raise DataError(
            f"data.eval_rows={cfg.eval_rows} leaves no training rows ({len(groups)} rows)",
            path=cfg.path,
        )
    cut = heldout_cut(groups, cfg.eval_rows)
    train = [r for r in tokenized if r.row_index < cut]
    held_out = [r for r in tokenized if r.row_index >= cut]
    if not train:
        raise DataError("no training row fits data.seq_length", path=cfg.path)
    if cfg.balance_classes and len({r.label > 0.5 for r in train}) < 2:
        msg = "data.balance_classes needs desirable and undesirable training rows"
        raise DataError(msg, path=cfg.path)
    return PreparedData(train, held_out, tokenizer, stats)


def make_micro_batch(
    rows: list[TokenizedRow],
    *,
    pad_id: int,
    pad_multiple: int = 16,
    width: int | None = None,
) -> dict[str, torch.Tensor]:
    """Collate rows padded to ``width``, or to their longest (rounded up to
    ``pad_multiple``); the loss weights are the caller's (``batches.rank_micro_batches``)."""
    if width is None:
        longest = max(r.input_ids.size for r in rows) - 1
        width = -(-longest // pad_multiple) * pad_multiple
    batch = collate(rows, seq_length=width, pad_id=pad_id)
    batch["num_tokens"] = torch.tensor(sum(r.input_ids.size - 1 for r in rows))
    return batch
