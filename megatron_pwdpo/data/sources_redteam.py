"""Anthropic red-team attempts (``hh-rlhf/red-team-attempts``, MIT) as point-wise rows.

Each record holds a ``transcript`` (a Human/Assistant dialogue) and two scores of it;
one becomes a continuous label in [0, 1] where 1 is desirable (harmless):

* ``rating`` (the red-teamer's 0-4 success rating; higher = a more harmful outcome):
  ``label = 1 - rating / 4``. Fixed scale; ``normalisation`` does not apply.
* ``min_harmlessness_score_transcript`` (a preference-model score, real-valued; lower =
  more harmful), with a declared normalisation:

  - ``minmax`` (default): ``label = (s - lo) / (hi - lo)`` clipped to [0, 1], where
    ``(lo, hi)`` is the declared ``score_range`` when given (``data.red_team_score_range``,
    ``--red-team-score-range``: every file and split then shares one scale; scores
    outside it are clipped, with a warning), else the minimum and maximum over the
    file (a file whose scores are all equal gets 0.5 everywhere);
  - ``logistic``: ``label = 1 / (1 + exp(-(s - center) / scale))`` (defaults 0 and 1),
    which needs no pass over the file and maps the same score to the same label in
    every split.

The transcript is split at its last ``"\\n\\nAssistant:"`` as for HH-RLHF: the prompt is
everything up to that tag, the response its answer. A trailing ``"\\n\\nHuman:"`` turn that
the assistant never answered is not part of the response. All rows are ``feedback``; ids
are ``rt-{index:06d}`` with the record's 0-based index. The file may be jsonl or one JSON
array (the published file is named ``.jsonl.gz``), gzipped or not, or parquet / a dataset
folder (`iter_records`).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Literal

import numpy as np

from megatron_pwdpo.data.records import iter_records
from megatron_pwdpo.data.schema import DataError, PointwiseRow, require_object, string_field
from megatron_pwdpo.data.sources import ASSISTANT_TAG, split_transcript

logger = logging.getLogger(__name__)

RedTeamScore = Literal["min_harmlessness_score_transcript", "rating"]
Normalisation = Literal["minmax", "logistic"]
RED_TEAM_SCORES: tuple[str, ...] = ("min_harmlessness_score_transcript", "rating")
NORMALISATIONS: tuple[str, ...] = ("minmax", "logistic")
HUMAN_TAG = "\n\nHuman:"
MAX_RATING = 4.0


def rating_labels(ratings: np.ndarray) -> np.ndarray:
    """``1 - rating / 4``: rating 0 (attack failed) -> 1.0, rating 4 (succeeded) -> 0.0."""
    return 1.0 - np.asarray(ratings, dtype=np.float64) / MAX_RATING


def minmax_labels(
    scores: np.ndarray, *, score_range: tuple[float, float] | None = None
) -> np.ndarray:
    """``(s - lo) / (hi - lo)`` clipped to [0, 1]; ``(lo, hi)`` defaults to the scores' own."""
    scores = np.asarray(scores, dtype=np.float64)
    lo, hi = score_range if score_range is not None else (scores.min(), scores.max())
    if hi < lo:
        raise ValueError(f"score_range must be (low, high), got {score_range}")
    if hi == lo:
        return np.full_like(scores, 0.5)
    return np.clip((scores - lo) / (hi - lo), 0.0, 1.0)


def logistic_labels(scores: np.ndarray, *, center: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """``sigmoid((s - center) / scale)``, computed without overflow."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    z = (np.asarray(scores, dtype=np.float64) - center) / scale
    return np.exp(-np.logaddexp(0.0, -z))


def split_red_team_transcript(text: str) -> tuple[str, str]:
    """(prompt, response) at the last Assistant turn, dropping an unanswered last Human turn."""
    prompt, response = split_transcript(text)
    return prompt, response.split(HUMAN_TAG, 1)[0].rstrip()


def _number(obj: dict[str, Any], name: str, *, path: str, line: int) -> float:
    if name not in obj or obj[name] is None:
        raise DataError(f"field '{name}': missing", path=path, line=line)
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"field '{name}': expected a number, got {type(value).__name__} {value!r}"
        raise DataError(msg, path=path, line=line)
    if not math.isfinite(value):
        raise DataError(f"field '{name}': {value!r} is not finite", path=path, line=line)
    return float(value)


def _transcript(obj: Any, *, path: str, line: int) -> tuple[str, str]:
    obj = require_object(obj, path=path, line=line)
    text = string_field(obj, "transcript", path=path, line=line)
    try:
        return split_red_team_transcript(text)
    except ValueError as e:
        raise DataError(f"field 'transcript': {e}", path=path, line=line) from e


def _warn_outside(
    scores: np.ndarray, score_range: tuple[float, float] | None, *, path: str
) -> None:
    """Log how many scores fall outside a declared range (they are clipped to it)."""
    if score_range is None:
        return
    lo, hi = score_range
    outside = int(np.sum((scores < lo) | (scores > hi)))
    if outside:
        logger.warning(
            "%s: %d scores outside the declared range [%g, %g] clipped to it",
            path,
            outside,
            lo,
            hi,
        )


def red_team_rows(
    path: str | os.PathLike[str],
    *,
    score: RedTeamScore = "min_harmlessness_score_transcript",
    normalisation: Normalisation = "minmax",
    score_range: tuple[float, float] | None = None,
    center: float = 0.0,
    scale: float = 1.0,
    skip_empty_responses: bool = False,
    split: str | None = None,
) -> list[PointwiseRow]:
    """Converts red-team attempts to point-wise rows with continuous labels.

    Args:
        path: ``red_team_attempts.jsonl(.gz)`` (jsonl or a JSON array), parquet, or a
            dataset folder.
        score: which field becomes the label (module docstring for the mappings).
        normalisation: ``minmax`` or ``logistic``, for the harmlessness score.
        score_range: ``(lo, hi)`` of ``minmax``; None = the file's own range.
        center: ``logistic`` centre.
        scale: ``logistic`` scale.
        skip_empty_responses: drop (and log) transcripts whose last Assistant turn is
            empty instead of raising.
        split: the split of a ``DatasetDict`` folder or hub dataset.

    Returns:
        Rows in file order, ids ``rt-{index:06d}``, all ``kind="feedback"``.

    Raises:
        DataError: a missing or non-string ``transcript`` or one without an Assistant
            turn, a missing/non-numeric/non-finite score, a rating outside [0, 4], an
            empty response, or an empty file; the message names the file and line.
    """
    if score not in RED_TEAM_SCORES:
        raise ValueError(f"score must be one of {RED_TEAM_SCORES}, got {score!r}")
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    path = str(path)
    kept: list[tuple[int, str, str]] = []  # (index, prompt, response)
    values: list[float] = []
    skipped: list[int] = []
    for index, (line, obj) in enumerate(iter_records(path, split=split)):
        prompt, response = _transcript(obj, path=path, line=line)
        value = _number(obj, score, path=path, line=line)
        if score == "rating" and not 0.0 <= value <= MAX_RATING:
            raise DataError(f"field 'rating': {value:g} is outside [0, 4]", path=path, line=line)
        if not response.strip():
            if skip_empty_responses:
                skipped.append(line)
                continue
            msg = f"field 'transcript': empty response after the last {ASSISTANT_TAG!r}"
            raise DataError(msg, path=path, line=line)
        kept.append((index, prompt, response))
        values.append(value)
    if skipped:
        logger.warning("%s: skipped %d transcripts with an empty response", path, len(skipped))
    if not kept:
        raise DataError("no usable transcripts (all had an empty response)", path=path)
    scores = np.array(values)
    if score == "rating":
        labels = rating_labels(scores)
    elif normalisation == "minmax":
        _warn_outside(scores, score_range, path=path)
        labels = minmax_labels(scores, score_range=score_range)
    else:
        labels = logistic_labels(scores, center=center, scale=scale)
    return [
        PointwiseRow(f"rt-{index:06d}", prompt, response, float(label), "feedback")
        for (index, prompt, response), label in zip(kept, labels, strict=True)
    ]
