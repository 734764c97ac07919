"""One entry point from ``(source, path, options)`` to checked canonical rows; the split.

Sources (``data.source`` in the config, ``--source`` on the command line):

=============== ===================================================================
``auto``        detected from the first record (`detect_source`); the default
``pointwise``   canonical rows (DESIGN.md §3) in jsonl(.gz), parquet or a dataset folder;
                ``id`` and ``kind`` optional (`read_pointwise`)
``trl``         Hugging Face TRL's preference formats, standard or conversational:
                paired (explicit or implicit prompt) and unpaired (`trl_rows`)
``hh-rlhf``     Anthropic HH-RLHF pairs, split at the last Assistant turn (`hh_rlhf_rows`)
``golden-hh``   Golden HH: HH schema, chosen rows are demonstrations (`golden_hh_rows`)
``red-team``    red-team attempts with a continuous label (`red_team_rows`)
``qa-feedback`` FineGrainedRLHF QA-feedback: win-rate labels (`qa_feedback_rows`), or
                with ``qa_mode="pairs"`` its comparisons as pairs (`qa_feedback_pair_rows`)
``pairwise``    generic pairs ``{prompt, chosen, rejected[, id]}`` (`read_pairwise`)
=============== ===================================================================

Pairs (HH-style sources with ``hh_mode="paired"``, ``pairwise``, QA-feedback with
``qa_mode="pairs"``) become two rows, ``<pair>-c`` (label 1) and ``<pair>-r`` (label 0),
which the pairwise losses pair up again by id (`megatron_pwdpo.engine.batches.pair_up`).

Detection (``auto``) looks at the first record's fields, in this order: ``transcript``
-> ``red-team``; ``question`` and ``prediction 1`` -> ``qa-feedback``; ``response`` and
``label`` -> ``pointwise``; ``completion`` and ``label`` -> ``trl`` (unpaired); ``chosen``
and ``rejected`` without ``prompt``, as text holding ``"\n\nAssistant:"`` -> ``hh-rlhf``;
``chosen`` and ``rejected`` otherwise -> ``trl`` (paired); ``prompt`` and ``completion``
-> ``trl`` (SFT data, demonstrations). Golden HH has HH-RLHF's schema,
so it needs ``data.source=golden-hh``; a preprocessed prefix (``PREFIX.bin`` exists) is
``preprocessed``. An explicit source always wins.

The held-out split takes the last ``eval_rows`` rows, moved back to the start of a run
of rows that share one prompt, so no prompt (an HH pair, a QA item) is on both sides.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megatron_pwdpo.data.readers import check_unique_ids, read_pairwise, read_pointwise
from megatron_pwdpo.data.records import iter_records
from megatron_pwdpo.data.schema import DataError, PointwiseRow, pair_rows
from megatron_pwdpo.data.sources import ASSISTANT_TAG, golden_hh_rows, hh_rlhf_rows
from megatron_pwdpo.data.sources_qa import qa_feedback_pair_rows, qa_feedback_rows
from megatron_pwdpo.data.sources_redteam import red_team_rows
from megatron_pwdpo.data.sources_trl import trl_format, trl_rows

logger = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = (
    "auto",
    "pointwise",
    "trl",
    "hh-rlhf",
    "golden-hh",
    "red-team",
    "qa-feedback",
    "pairwise",
)
QA_MODES: tuple[str, ...] = ("win_rate", "pairs")


def detect_source(path: str | os.PathLike[str], *, split: str | None = None) -> str:
    """The source whose format the first record of ``path`` is in (module docstring).

    Raises:
        DataError: the file cannot be read, or its first record fits no known format.
    """
    if not str(path).startswith("hf:") and Path(f"{path}.bin").is_file():
        return "preprocessed"
    records = iter_records(path, split=split)
    line, obj = next(records)
    records.close()
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=line)
    chosen = obj.get("chosen")
    source = None
    if "transcript" in obj:
        source = "red-team"
    elif "question" in obj and "prediction 1" in obj:
        source = "qa-feedback"
    elif "response" in obj and "label" in obj:
        source = "pointwise"
    elif "prompt" not in obj and isinstance(chosen, str) and ASSISTANT_TAG in chosen:
        source = "hh-rlhf"
    elif trl_format(obj) is not None:
        source = "trl"
    if source is not None:
        logger.info("%s: data.source=auto detected %s (from the first record)", path, source)
        return source
    msg = (
        f"cannot tell the data format from the first record (fields {sorted(obj)}): set "
        f"data.source (--source) to one of {[s for s in SOURCES if s != 'auto']}"
    )
    raise DataError(msg, path=path, line=line)


def load_source_rows(
    path: str | os.PathLike[str],
    *,
    source: str,
    hh_mode: str = "paired",
    demo_chosen: bool = True,
    seed: int = 0,
    red_team_score: str = "min_harmlessness_score_transcript",
    red_team_normalisation: str = "minmax",
    red_team_score_range: Sequence[float] | None = None,
    qa_mode: str = "win_rate",
    split: str | None = None,
) -> list[PointwiseRow]:
    """Canonical rows of one source, with unique ids (the module docstring lists sources).

    HH-style sources and red-team skip (and log) records with an empty response, as the
    real files have a few; canonical rows and pairs with an empty response are an error.
    ``seed`` is the seed of ``hh_mode="unpaired"``'s pick; ``demo_chosen`` applies to
    ``hh-rlhf``, ``pairwise``, ``trl`` and rows of ``pointwise`` without a ``kind``;
    ``red_team_score_range`` is the declared ``(lo, hi)`` of
    red-team's ``minmax`` normalisation (None: the file's own minimum and maximum).

    Raises:
        DataError: anything wrong with the input, naming the file and line.
        ValueError: an unknown source.
    """
    if source == "auto":
        source = detect_source(path, split=split)
        if source == "preprocessed":
            raise DataError("a preprocessed prefix: set data.source=preprocessed", path=path)
    if source == "pointwise":
        return read_pointwise(path, split=split, demo_chosen=demo_chosen)
    if source == "trl":
        rows = trl_rows(path, demo_chosen=demo_chosen, split=split)
    elif source == "hh-rlhf":
        rows = hh_rlhf_rows(
            path,
            mode=hh_mode,
            demo_chosen=demo_chosen,
            seed=seed,
            skip_empty_responses=True,
            split=split,
        )
    elif source == "golden-hh":
        rows = golden_hh_rows(path, mode=hh_mode, seed=seed, skip_empty_responses=True, split=split)
    elif source == "red-team":
        rows = red_team_rows(
            path,
            score=red_team_score,
            normalisation=red_team_normalisation,
            score_range=None if red_team_score_range is None else tuple(red_team_score_range),
            skip_empty_responses=True,
            split=split,
        )
    elif source == "qa-feedback":
        if qa_mode not in QA_MODES:
            raise ValueError(f"qa_mode must be one of {list(QA_MODES)}, got {qa_mode!r}")
        read = qa_feedback_pair_rows if qa_mode == "pairs" else qa_feedback_rows
        rows = read(path, split=split)
    elif source == "pairwise":
        rows = pair_rows(read_pairwise(path, split=split), demo_chosen=demo_chosen)
    else:
        raise ValueError(f"unknown data source {source!r}; choose one of {list(SOURCES)}")
    check_unique_ids(rows, path=path)
    return rows


def prompt_groups(rows: Sequence[PointwiseRow]) -> np.ndarray:
    """``[n]`` int64: for each row, the index of the first row of its run of equal prompts."""
    groups = np.zeros(len(rows), dtype=np.int64)
    for i in range(1, len(rows)):
        same = rows[i].prompt == rows[i - 1].prompt
        groups[i] = groups[i - 1] if same else i
    return groups


def heldout_cut(groups: np.ndarray, eval_rows: int) -> int:
    """First held-out row: ``n - eval_rows`` moved back to the start of its prompt group."""
    n = len(groups)
    if eval_rows <= 0:
        return n
    if eval_rows >= n:
        return 0
    return int(groups[n - eval_rows])


def label_histogram(labels: Sequence[float], *, bins: int = 5) -> str:
    """``"[0,0.2) 10 | [0.2,0.4) 0 | ... | [0.8,1] 12"``: counts of labels in equal bins."""
    counts, edges = np.histogram(np.asarray(labels, dtype=np.float64), bins=bins, range=(0, 1))
    parts = [
        f"[{edges[i]:g},{edges[i + 1]:g}{']' if i == bins - 1 else ')'} {int(c)}"
        for i, c in enumerate(counts)
    ]
    return " | ".join(parts)
