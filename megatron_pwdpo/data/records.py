"""Records (decoded JSON-like objects) from every supported container, with positions.

`iter_records` reads any of:

* ``.jsonl`` / ``.jsonl.gz`` / ``.json`` / ``.json.gz``: one JSON value a line, or one JSON
  array (told apart by the file's first non-blank character, ``[``). Positions are 1-based
  line numbers; for an array, the line where each element starts.
* ``.parquet`` (pyarrow): positions are 1-based row numbers.
* a folder written by ``datasets.Dataset.save_to_disk`` (a ``Dataset``, or a
  ``DatasetDict`` with ``split`` naming the split): 1-based row numbers.
* ``hf:OWNER/NAME``: ``datasets.load_dataset(OWNER/NAME, split=split or "train")``, for
  machines with hub access (the same records as the saved folder would give).

Every problem raises `DataError` with ``path:position:`` (or ``path:``) in front and a
single-line message, so the command line can print it as one line.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_pwdpo.config.load import HUB_PREFIX
from megatron_pwdpo.data.schema import DataError, _open_binary, iter_jsonl

_BLANK = re.compile(r"\s*")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _first_char(path: str | os.PathLike[str]) -> bytes:
    """The first non-blank byte of a (possibly gzipped) file, b"" when there is none."""
    try:
        with _open_binary(path) as f:
            while chunk := f.read(4096):
                stripped = chunk.lstrip(b"\xef\xbb\xbf \t\r\n")
                if stripped:
                    return stripped[:1]
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read file ({_one_line(e)})", path=path) from e
    return b""


def _iter_json_array(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """Elements of a file holding one JSON array, with the line each element starts on."""
    try:
        with _open_binary(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read file ({_one_line(e)})", path=path) from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"text is not valid UTF-8 ({e.reason})", path=path, line=line) from e
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted = 1, 0
    seen = False
    while True:
        pos = _BLANK.match(text, pos).end()
        line, counted = line + text.count("\n", counted, pos), pos
        if pos >= len(text):
            raise DataError("invalid JSON (the array is not closed)", path=path, line=line)
        if text[pos] == "]":
            break
        if seen:
            if text[pos] != ",":
                raise DataError("invalid JSON (expected ',' or ']')", path=path, line=line)
            pos = _BLANK.match(text, pos + 1).end()
            line, counted = line + text.count("\n", counted, pos), pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            msg = f"invalid JSON ({e.msg}, column {e.colno})"
            raise DataError(msg, path=path, line=e.lineno) from e
        seen = True
        yield line, obj
    rest = _BLANK.match(text, pos + 1).end()
    if rest < len(text):
        where = line + text.count("\n", counted, rest)
        raise DataError("invalid JSON (extra data after the array)", path=path, line=where)
    if not seen:
        raise DataError("file is empty (no rows)", path=path)


def _decode_bytes(value: Any, *, path: str, row: int) -> Any:
    """Binary values (parquet ``binary`` columns) as text, or a `DataError`."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"text is not valid UTF-8 ({e.reason})", path=path, line=row) from e
    if isinstance(value, dict):
        return {k: _decode_bytes(v, path=path, row=row) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_bytes(v, path=path, row=row) for v in value]
    return value


def _iter_parquet(path: str) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        if table.metadata.num_rows == 0:
            raise DataError("file is empty (no rows)", path=path)
        row = 0
        for batch in table.iter_batches(batch_size=4096):
            for obj in batch.to_pylist():
                row += 1
                yield row, _decode_bytes(obj, path=path, row=row)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read parquet ({_one_line(e)})", path=path) from e


def _rows_of(dataset: Any, *, path: str) -> Iterator[tuple[int, Any]]:
    if len(dataset) == 0:
        raise DataError("dataset is empty (no rows)", path=path)
    for row, obj in enumerate(dataset, start=1):
        yield row, _decode_bytes(obj, path=path, row=row)


def _pick_split(dataset: Any, *, split: str | None, path: str) -> Any:
    import datasets

    if not isinstance(dataset, datasets.DatasetDict):
        return dataset
    splits = list(dataset)
    if split is None and len(splits) == 1:
        split = splits[0]
    if split not in dataset:
        msg = f"choose one of the splits {splits} (data.split / --split)"
        if split is not None:
            msg = f"no split {split!r}; {msg}"
        raise DataError(msg, path=path)
    return dataset[split]


def _iter_hf_folder(path: str, *, split: str | None) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        msg = f"not a folder written by datasets' save_to_disk ({_one_line(e)})"
        raise DataError(msg, path=path) from e
    yield from _rows_of(_pick_split(dataset, split=split, path=path), path=path)


def _iter_hub(name: str, *, split: str | None) -> Iterator[tuple[int, Any]]:
    import datasets

    repo = name.removeprefix(HUB_PREFIX)
    try:
        dataset = datasets.load_dataset(repo, split=split or "train")
    except Exception as e:  # the hub raises many kinds; all mean "cannot load"
        raise DataError(f"cannot load from the hub ({_one_line(e)})", path=name) from e
    yield from _rows_of(dataset, path=name)


def iter_records(
    path: str | os.PathLike[str], *, split: str | None = None
) -> Iterator[tuple[int, Any]]:
    """Yields ``(position, record)`` of a data file, folder or hub dataset (module docstring).

    Args:
        path: a .jsonl/.json(.gz) or .parquet file, a ``save_to_disk`` folder, or
            ``hf:OWNER/NAME``.
        split: the split of a ``DatasetDict`` folder or of a hub dataset.

    Raises:
        DataError: a missing file, undecodable text, invalid JSON, an unreadable parquet
            file or dataset folder, or no records at all.
    """
    name = str(path)
    if name.startswith(HUB_PREFIX):
        yield from _iter_hub(name, split=split)
        return
    p = Path(name)
    if not p.exists():
        raise DataError("no such file or folder", path=name)
    if p.is_dir():
        yield from _iter_hf_folder(name, split=split)
    elif name.endswith(".parquet"):
        yield from _iter_parquet(name)
    elif _first_char(name) == b"[":
        yield from _iter_json_array(name)
    else:
        yield from iter_jsonl(name)
