"""Converters from public preference data sets to canonical rows (DESIGN.md §3).

HH-RLHF (Anthropic/hh-rlhf, MIT) stores one pair a line,
``{"chosen": TRANSCRIPT, "rejected": TRANSCRIPT}``, where a transcript is
``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: ..."``. Each transcript
is split at its last ``"\\n\\nAssistant:"``: the prompt keeps everything up to and including
that tag, the response is the rest without the single separating space, so
``prompt + " " + response`` gives the transcript back. Golden HH
(``Unified-Language-Model-Alignment/Anthropic_HH_Golden``) has the same schema; its chosen
answers are GPT-4 rewrites, so `golden_hh_rows` marks them as demonstrations.

Ids are ``hh-{index:06d}`` (``golden-{index:06d}`` for Golden HH) with the 0-based index of
the pair in its file, plus ``-c`` or ``-r`` for the chosen or rejected response. Error
messages use 1-based line numbers (row numbers for parquet and dataset folders). Files can
be jsonl(.gz), a JSON array, parquet or a ``datasets`` folder (`iter_records`).

The other sources have their own modules: `megatron_pwdpo.data.sources_redteam` (red-team
attempts) and `megatron_pwdpo.data.sources_qa` (QA-feedback).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from megatron_pwdpo.data.records import iter_records
from megatron_pwdpo.data.schema import (
    DataError,
    PairwiseRow,
    PointwiseRow,
    require_object,
    string_field,
)

logger = logging.getLogger(__name__)

ASSISTANT_TAG = "\n\nAssistant:"


def split_transcript(text: str) -> tuple[str, str]:
    """Splits an HH transcript into (prompt, response) at the last ``"\\n\\nAssistant:"``.

    Args:
        text: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` with any number of turns.

    Returns:
        ``(prompt, response)``: the prompt ends with ``"\\n\\nAssistant:"``; the response
        is what follows, with one leading space removed. It may be empty; callers decide.

    Raises:
        ValueError: the transcript has no ``"\\n\\nAssistant:"``.
    """
    cut = text.rfind(ASSISTANT_TAG)
    if cut < 0:
        raise ValueError(f"no {ASSISTANT_TAG!r} turn in the transcript")
    cut += len(ASSISTANT_TAG)
    return text[:cut], text[cut:].removeprefix(" ")


@dataclass(frozen=True)
class _HHPair:
    index: int  # 0-based line index
    chosen: tuple[str, str]  # (prompt, response)
    rejected: tuple[str, str]


def _split_field(obj: dict[str, Any], name: str, *, path: str, line: int) -> tuple[str, str]:
    text = string_field(obj, name, path=path, line=line)
    try:
        return split_transcript(text)
    except ValueError as e:
        raise DataError(f"field '{name}': {e}", path=path, line=line) from e


def _iter_hh_pairs(
    path: str | os.PathLike[str], *, skip_empty_responses: bool, split: str | None = None
) -> Iterator[_HHPair]:
    """Yields the valid pairs of an HH-RLHF file; see `hh_rlhf_rows` for the errors."""
    path = str(path)
    skipped: list[int] = []
    for index, (line, obj) in enumerate(iter_records(path, split=split)):
        require_object(obj, path=path, line=line)
        chosen = _split_field(obj, "chosen", path=path, line=line)
        rejected = _split_field(obj, "rejected", path=path, line=line)
        sides = (("chosen", chosen), ("rejected", rejected))
        empty = [name for name, (_, response) in sides if not response.strip()]
        if empty and skip_empty_responses:
            skipped.append(line)
            continue
        if empty:
            msg = f"field '{empty[0]}': empty response after the last {ASSISTANT_TAG!r}"
            raise DataError(msg, path=path, line=line)
        yield _HHPair(index, chosen, rejected)
    if skipped:
        logger.warning(
            "%s: skipped %d pairs with an empty response (lines %s)",
            path,
            len(skipped),
            ", ".join(map(str, skipped)),
        )


def _read_hh_pairs(
    path: str | os.PathLike[str], *, skip_empty_responses: bool, split: str | None = None
) -> list[_HHPair]:
    pairs = list(_iter_hh_pairs(path, skip_empty_responses=skip_empty_responses, split=split))
    if not pairs:
        raise DataError("no usable pairs (all had an empty response)", path=path)
    return pairs


def hh_rlhf_rows(
    path: str | os.PathLike[str],
    *,
    mode: Literal["paired", "unpaired"] = "paired",
    demo_chosen: bool = False,
    seed: int = 0,
    skip_empty_responses: bool = False,
    split: str | None = None,
    id_prefix: str = "hh",
) -> list[PointwiseRow]:
    """Converts an HH-RLHF (or Golden HH) file to point-wise rows.

    Each response keeps its own prompt split, so pairs whose earlier turns differ are fine.

    Args:
        path: the pairs file.
        mode: ``"paired"`` gives two rows per pair (chosen label 1.0, rejected 0.0, in that
            order); ``"unpaired"`` keeps exactly one of the two per pair, the truly
            point-wise setting. The pick is a fair coin drawn from ``seed`` and the
            pair's line index, so it is reproducible and about 50/50 overall.
        demo_chosen: mark chosen rows ``kind="demo"`` (Golden HH, ULMA); else all rows
            are ``"feedback"``.
        seed: seed of the unpaired pick.
        skip_empty_responses: drop (and log) pairs where either response is empty instead
            of raising. The real HH-RLHF files have a few such pairs.
        split: the split of a ``DatasetDict`` folder or hub dataset.
        id_prefix: first part of the ids.

    Returns:
        Rows in file order, ids ``{id_prefix}-{index:06d}-c`` / ``-r``.

    Raises:
        DataError: invalid JSON or UTF-8, a missing or non-string ``chosen``/``rejected``,
            a transcript with no ``"\\n\\nAssistant:"``, an empty response, an empty file;
            the message names the file and line.
    """
    if mode not in ("paired", "unpaired"):
        raise ValueError(f"mode must be 'paired' or 'unpaired', got {mode!r}")
    pairs = _read_hh_pairs(path, skip_empty_responses=skip_empty_responses, split=split)
    chosen_kind = "demo" if demo_chosen else "feedback"
    if mode == "paired":
        keep_chosen = keep_rejected = np.ones(len(pairs), dtype=bool)
    else:
        coins = np.random.default_rng(seed).random(pairs[-1].index + 1)  # [num_lines]
        keep_chosen = coins[[p.index for p in pairs]] < 0.5
        keep_rejected = ~keep_chosen
    stem = id_prefix
    rows: list[PointwiseRow] = []
    for pair, take_c, take_r in zip(pairs, keep_chosen, keep_rejected, strict=True):
        if take_c:
            rows.append(PointwiseRow(f"{stem}-{pair.index:06d}-c", *pair.chosen, 1.0, chosen_kind))
        if take_r:
            rows.append(PointwiseRow(f"{stem}-{pair.index:06d}-r", *pair.rejected, 0.0, "feedback"))
    return rows


def golden_hh_rows(
    path: str | os.PathLike[str],
    *,
    mode: Literal["paired", "unpaired"] = "paired",
    seed: int = 0,
    skip_empty_responses: bool = False,
    split: str | None = None,
) -> list[PointwiseRow]:
    """Converts a Golden HH file: `hh_rlhf_rows` with chosen rows as demonstrations.

    Same schema as HH-RLHF; the chosen answers are the GPT-4 rewrites (``kind="demo"``,
    label 1), the rejected answers the original HH responses (``kind="feedback"``, label 0).
    Ids are ``golden-{index:06d}-c`` / ``-r``.
    """
    return hh_rlhf_rows(
        path,
        mode=mode,
        demo_chosen=True,
        seed=seed,
        skip_empty_responses=skip_empty_responses,
        split=split,
        id_prefix="golden",
    )


def hh_rlhf_pairs(
    path: str | os.PathLike[str],
    *,
    skip_empty_responses: bool = False,
    split: str | None = None,
    id_prefix: str = "hh",
) -> list[PairwiseRow]:
    """Reads an HH-RLHF (or Golden HH) file as chosen/rejected pairs for the baselines.

    The prompt is the chosen transcript's split. In the few pairs whose earlier turns
    differ, the rejected response is paired with the chosen prompt; nothing is recorded.

    Returns:
        Pairs in file order, ids ``{id_prefix}-{index:06d}``.

    Raises:
        DataError: as `hh_rlhf_rows`.
    """
    pairs = _read_hh_pairs(path, skip_empty_responses=skip_empty_responses, split=split)
    return [
        PairwiseRow(f"{id_prefix}-{p.index:06d}", p.chosen[0], p.chosen[1], p.rejected[1])
        for p in pairs
    ]


def golden_hh_pairs(
    path: str | os.PathLike[str], *, skip_empty_responses: bool = False, split: str | None = None
) -> list[PairwiseRow]:
    """Golden HH as pairs (rewritten chosen vs original rejected), ids ``golden-{index:06d}``."""
    return hh_rlhf_pairs(
        path, skip_empty_responses=skip_empty_responses, split=split, id_prefix="golden"
    )
