"""QA-feedback (allenai/FineGrainedRLHF ``tasks/qa_feedback/data``, from ASQA) as rows.

A file is one JSON array (``train_feedback.json``, ``dev_feedback.json``) whose items hold
``question``, ``passages`` (lists ``[title, sentence, sentence, ...]``), ``gold``,
``prediction 1`` .. ``prediction 4``, ``feedback`` (with ``corrected-prediction``) and
``preference``: six judgements in the order 1v2, 1v3, 1v4, 2v3, 2v4, 3v4, where 1 = the
first answer is preferred, 2 = the second, 0 = no preference.

Our point-wise reading (the ULMA code has no loader for it, so this mapping is ours):

* each prediction ``k`` becomes a ``feedback`` row whose label is its **win rate** over
  its three comparisons, ties counting half: ``(wins + ties / 2) / 3``, one of
  0, 1/6, 1/3, 1/2, 2/3, 5/6, 1;
* ``gold`` and ``feedback["corrected-prediction"]`` (when present and not empty) become
  ``demo`` rows with label 1.

The prompt is one user message (so a chat template can render it); passages come first,
each on one line with its whitespace collapsed, and the question last, so that left
truncation of a long prompt drops passages, never the question::

    Passages:
    [1] {title}: {sentence} {sentence} ...
    [2] ...

    Question: {question}

Ids are ``qa-{index:05d}-gold``, ``-corrected``, ``-p1`` .. ``-p4``, in that order, with
the item's 0-based index. `qa_feedback_pairs` gives the non-tied comparisons as pairs for
the pairwise baselines, and `qa_feedback_pair_rows` (``data.qa_mode=pairs``) the same as
``-c``/``-r`` rows that training pairs up again.
"""

from __future__ import annotations

import os
from typing import Any

from megatron_pwdpo.data.records import iter_records
from megatron_pwdpo.data.schema import (
    DataError,
    PairwiseRow,
    PointwiseRow,
    Prompt,
    pair_rows,
    require_object,
    string_field,
)

PREFERENCE_ORDER: tuple[tuple[int, int], ...] = ((1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4))
NUM_PREDICTIONS = 4


def win_rates(preference: list[int]) -> list[float]:
    """Each prediction's share of won comparisons (ties count half), ``[4]`` in [0, 1]."""
    wins = [0.0] * NUM_PREDICTIONS
    for (a, b), judgement in zip(PREFERENCE_ORDER, preference, strict=True):
        if judgement == 1:
            wins[a - 1] += 1.0
        elif judgement == 2:
            wins[b - 1] += 1.0
        else:
            wins[a - 1] += 0.5
            wins[b - 1] += 0.5
    return [w / (NUM_PREDICTIONS - 1) for w in wins]


def render_qa_prompt(question: str, passages: list[list[str]]) -> Prompt:
    """The prompt of an item: passages first, the question last (module docstring)."""
    lines = [
        f"[{k}] {' '.join(p[0].split())}: {' '.join(' '.join(p[1:]).split())}"
        for k, p in enumerate(passages, start=1)
    ]
    content = "Passages:\n" + "\n".join(lines) + f"\n\nQuestion: {question.strip()}"
    return [{"role": "user", "content": content}]


def _check_item(obj: Any, *, path: str, line: int) -> tuple[Prompt, list[str], list[int]]:
    """(prompt, [prediction 1..4], preference) of one item, or a `DataError`."""
    require_object(obj, path=path, line=line)
    question = string_field(obj, "question", path=path, line=line)
    passages = obj.get("passages")
    if not isinstance(passages, list) or not all(
        isinstance(p, list) and p and all(isinstance(s, str) for s in p) for p in passages
    ):
        msg = "field 'passages': expected a list of [title, sentence, ...] string lists"
        raise DataError(msg, path=path, line=line)
    predictions = [
        string_field(obj, f"prediction {k}", path=path, line=line)
        for k in range(1, NUM_PREDICTIONS + 1)
    ]
    preference = obj.get("preference")
    if (
        not isinstance(preference, list)
        or len(preference) != len(PREFERENCE_ORDER)
        or any(isinstance(p, bool) or p not in (0, 1, 2) for p in preference)
    ):
        msg = f"field 'preference': expected six judgements in {{0, 1, 2}}, got {preference!r}"
        raise DataError(msg, path=path, line=line)
    for k, text in enumerate(predictions, start=1):
        if not text.strip():
            raise DataError(f"field 'prediction {k}': is empty", path=path, line=line)
    return render_qa_prompt(question, passages), predictions, [int(p) for p in preference]


def _corrected(obj: dict[str, Any], *, path: str, line: int) -> str | None:
    feedback = obj.get("feedback")
    if feedback is None:
        return None
    if not isinstance(feedback, dict):
        raise DataError("field 'feedback': expected an object", path=path, line=line)
    text = feedback.get("corrected-prediction")
    if text is None:
        return None
    if not isinstance(text, str):
        msg = "field 'feedback.corrected-prediction': expected a string"
        raise DataError(msg, path=path, line=line)
    return text if text.strip() else None


def qa_feedback_rows(
    path: str | os.PathLike[str],
    *,
    demonstrations: bool = True,
    split: str | None = None,
) -> list[PointwiseRow]:
    """Converts a QA-feedback file to point-wise rows (module docstring for the mapping).

    Args:
        path: ``train_feedback.json`` / ``dev_feedback.json`` (a JSON array), or jsonl,
            parquet, a dataset folder with the same fields.
        demonstrations: also emit ``gold`` and ``corrected-prediction`` as demos.
        split: the split of a ``DatasetDict`` folder or hub dataset.

    Returns:
        Per item: gold, corrected (demos, if wanted and present), then predictions 1-4.

    Raises:
        DataError: a missing or mistyped field, a bad ``preference``, an empty prediction
            or ``gold``, or an empty file; the message names the file and line.
    """
    path = str(path)
    rows: list[PointwiseRow] = []
    for index, (line, obj) in enumerate(iter_records(path, split=split)):
        prompt, predictions, preference = _check_item(obj, path=path, line=line)
        stem = f"qa-{index:05d}"
        if demonstrations:
            rows.extend(_demo_rows(obj, prompt, stem, path=path, line=line))
        for k, (text, rate) in enumerate(zip(predictions, win_rates(preference), strict=True)):
            rows.append(PointwiseRow(f"{stem}-p{k + 1}", prompt, text, rate, "feedback"))
    return rows


def _demo_rows(
    obj: dict[str, Any], prompt: Prompt, stem: str, *, path: str, line: int
) -> list[PointwiseRow]:
    """The item's ``gold`` and (when present) ``corrected-prediction`` as demonstrations."""
    gold = string_field(obj, "gold", path=path, line=line)
    if not gold.strip():
        raise DataError("field 'gold': is empty", path=path, line=line)
    rows = [PointwiseRow(f"{stem}-gold", prompt, gold, 1.0, "demo")]
    corrected = _corrected(obj, path=path, line=line)
    if corrected is not None:
        rows.append(PointwiseRow(f"{stem}-corrected", prompt, corrected, 1.0, "demo"))
    return rows


def _item_pairs(
    index: int, prompt: Prompt, predictions: list[str], preference: list[int]
) -> list[PairwiseRow]:
    pairs = []
    for (a, b), judgement in zip(PREFERENCE_ORDER, preference, strict=True):
        if judgement == 0:
            continue
        win, lose = (a, b) if judgement == 1 else (b, a)
        pair_id = f"qa-{index:05d}-{a}v{b}"
        pairs.append(PairwiseRow(pair_id, prompt, predictions[win - 1], predictions[lose - 1]))
    return pairs


def qa_feedback_pairs(
    path: str | os.PathLike[str], *, split: str | None = None
) -> list[PairwiseRow]:
    """The non-tied comparisons as (chosen, rejected) pairs, ids ``qa-{index:05d}-{a}v{b}``."""
    path = str(path)
    pairs: list[PairwiseRow] = []
    for index, (line, obj) in enumerate(iter_records(path, split=split)):
        prompt, predictions, preference = _check_item(obj, path=path, line=line)
        pairs.extend(_item_pairs(index, prompt, predictions, preference))
    return pairs


def qa_feedback_pair_rows(
    path: str | os.PathLike[str], *, demonstrations: bool = True, split: str | None = None
) -> list[PointwiseRow]:
    """QA-feedback for the pairwise losses (``data.qa_mode=pairs``): per item, ``gold`` and
    ``corrected-prediction`` as demonstrations (with ``demonstrations``; the SFT stage's
    rows), then each non-tied comparison as two rows, ``qa-{index:05d}-{a}v{b}-c``
    (preferred, label 1) and ``-r`` (label 0), which `batches.pair_up` pairs again.

    Raises:
        DataError: as `qa_feedback_rows`.
    """
    path = str(path)
    rows: list[PointwiseRow] = []
    for index, (line, obj) in enumerate(iter_records(path, split=split)):
        prompt, predictions, preference = _check_item(obj, path=path, line=line)
        if demonstrations:
            rows.extend(_demo_rows(obj, prompt, f"qa-{index:05d}", path=path, line=line))
        rows.extend(pair_rows(_item_pairs(index, prompt, predictions, preference)))
    return rows
