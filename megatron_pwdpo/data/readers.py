"""Canonical point-wise rows, and generic pairs, from jsonl(.gz), parquet or a dataset.

The same `validate_row` (`validate_pair` for pairs) checks every record whatever the
container, and errors name the file and the 1-based line (jsonl, JSON array) or row
(parquet, dataset folder); see `megatron_pwdpo.data.records`. Ids must be unique within
what is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from megatron_pwdpo.data.records import iter_records
from megatron_pwdpo.data.schema import (
    DataError,
    PairwiseRow,
    PointwiseRow,
    validate_pair,
    validate_row,
)


def read_pointwise(
    path: str | os.PathLike[str], *, split: str | None = None, demo_chosen: bool = True
) -> list[PointwiseRow]:
    """Reads and validates canonical rows from any container `iter_records` knows.

    ``id`` and ``kind`` are optional: a row without an id is ``row-{index:06d}`` (its
    0-based position); one without a kind is ``demo`` when ``demo_chosen`` and its label
    is 1, else ``feedback``.

    Args:
        path: a .jsonl/.json(.gz) or .parquet file, a ``save_to_disk`` folder, or
            ``hf:OWNER/NAME``.
        split: the split of a ``DatasetDict``.
        demo_chosen: the rule for rows without a ``kind`` (above).

    Raises:
        DataError: a bad record (`validate_row`), a duplicate id (naming both positions),
            undecodable text, an empty file; always ``path:position: message``.
    """
    return _read_unique(
        path,
        split,
        lambda obj, line, i: validate_row(
            obj, path=path, line=line, index=i, demo_chosen=demo_chosen
        ),
    )


def read_pairwise(path: str | os.PathLike[str], *, split: str | None = None) -> list[PairwiseRow]:
    """Reads and validates generic pairs ``{prompt, chosen, rejected[, id]}`` (for the
    pairwise baselines; `megatron_pwdpo.data.schema.pair_rows` makes them rows).

    Raises:
        DataError: a bad record (`validate_pair`), a duplicate id (naming both positions),
            undecodable text, an empty file; always ``path:position: message``.
    """
    return _read_unique(
        path, split, lambda obj, line, i: validate_pair(obj, path=path, line=line, index=i)
    )


def _read_unique(path, split: str | None, validate: Callable[[Any, int, int], Any]) -> list:
    """``validate(record, position, index)`` of every record, refusing a repeated ``id``."""
    items = []
    first: dict[str, int] = {}
    for index, (position, obj) in enumerate(iter_records(path, split=split)):
        item = validate(obj, position, index)
        if item.id in first:
            msg = f"field 'id': duplicate id {item.id!r} (first at line {first[item.id]})"
            raise DataError(msg, path=path, line=position)
        first[item.id] = position
        items.append(item)
    return items


def check_unique_ids(rows: Sequence[PointwiseRow], *, path: str | os.PathLike[str]) -> None:
    """Raises `DataError` on the first repeated id (positions are 1-based row numbers).

    Converters make ids from record positions, so a repeat means a bug or a merged input;
    this is the last check before tokenisation, for every source.
    """
    first: dict[str, int] = {}
    for number, row in enumerate(rows, start=1):
        if row.id in first:
            msg = (
                f"duplicate id {row.id!r} (rows {first[row.id]} and {number} of the converted data)"
            )
            raise DataError(msg, path=path)
        first[row.id] = number
