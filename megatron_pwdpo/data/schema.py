"""Canonical point-wise rows, their validation, and the jsonl(.gz) reader/writer.

A canonical row is one response with its own label (DESIGN.md §3)::

    {"id": "hh-000123-c", "prompt": "...", "response": "...", "label": 1.0, "kind": "demo"}

``prompt`` is a string or a list of ``{"role", "content"}`` messages, ``label`` is in
[0, 1] and ``kind`` is ``"demo"`` (a demonstration) or ``"feedback"``. Every problem in an
input file raises `DataError` with ``path:line:`` in front, so a bad row stops the run
before training starts and says where to look. Line numbers are 1-based.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import math
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

Kind = Literal["demo", "feedback"]
KINDS: tuple[str, ...] = ("demo", "feedback")
ROLES: tuple[str, ...] = ("system", "user", "assistant")
Prompt = str | list[dict[str, str]]


class DataError(ValueError):
    """Bad input data; the message always starts with ``path:line:`` (or ``path:``)."""

    def __init__(self, message: str, *, path: str | os.PathLike[str], line: int | None = None):
        self.path = str(path)
        self.line = line
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class PointwiseRow:
    """One response with its own point-wise label.

    Attributes:
        id: unique id within its file.
        prompt: the prompt text, or a list of ``{"role", "content"}`` messages.
        response: the response text (what the loss is computed on).
        label: preference label in [0, 1]; 1 = desirable, 0 = undesirable.
        kind: ``"demo"`` (a demonstration, trained with SFT by ULMA) or ``"feedback"``.
    """

    id: str
    prompt: Prompt
    response: str
    label: float
    kind: Kind


@dataclass(frozen=True)
class PairwiseRow:
    """A chosen/rejected pair for the pairwise baselines (DPO, IPO)."""

    id: str
    prompt: Prompt
    chosen: str
    rejected: str


def _field_error(name: str, message: str, *, path: str | os.PathLike[str], line: int) -> DataError:
    return DataError(f"field '{name}': {message}", path=path, line=line)


def require_object(obj: Any, *, path: str | os.PathLike[str], line: int) -> dict[str, Any]:
    """``obj`` if it is a JSON object (a dict), else a `DataError` at ``path:line``."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=line)
    return obj


def string_field(obj: dict[str, Any], name: str, *, path: str | os.PathLike[str], line: int) -> str:
    """``obj[name]`` if present and a string, else a `DataError` that names the field at
    ``path:line``."""
    if name not in obj:
        raise _field_error(name, "missing", path=path, line=line)
    if not isinstance(obj[name], str):
        msg = f"expected a string, got {type(obj[name]).__name__}"
        raise _field_error(name, msg, path=path, line=line)
    return obj[name]


def check_prompt(prompt: Any, *, path: str | os.PathLike[str], line: int) -> Prompt:
    """A string, or a list of ``{"role", "content"}`` messages (a fresh copy), or a
    `DataError` naming the field at ``path:line``."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list):
        msg = f"expected a string or a list of messages, got {type(prompt).__name__}"
        raise _field_error("prompt", msg, path=path, line=line)
    for i, message in enumerate(prompt):
        name = f"prompt[{i}]"
        if not isinstance(message, dict):
            msg = f"expected a {{'role', 'content'}} object, got {type(message).__name__}"
            raise _field_error(name, msg, path=path, line=line)
        if message.get("role") not in ROLES:
            msg = f"role {message.get('role')!r} is not one of {list(ROLES)}"
            raise _field_error(name, msg, path=path, line=line)
        if not isinstance(message.get("content"), str):
            raise _field_error(name, "'content' must be a string", path=path, line=line)
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _check_label(label: Any, *, path: str | os.PathLike[str], line: int) -> float:
    if isinstance(label, bool) or not isinstance(label, int | float):
        msg = f"expected a number, got {type(label).__name__} {label!r}"
        raise _field_error("label", msg, path=path, line=line)
    value = float(label)
    if not math.isfinite(value):
        raise _field_error("label", f"{label!r} is not finite", path=path, line=line)
    if not 0.0 <= value <= 1.0:
        raise _field_error("label", f"{label!r} is outside [0, 1]", path=path, line=line)
    return value


def validate_row(
    obj: Any,
    *,
    path: str | os.PathLike[str],
    line: int,
    index: int | None = None,
    demo_chosen: bool | None = None,
) -> PointwiseRow:
    """Checks one decoded JSON object and returns it as a `PointwiseRow`.

    Args:
        obj: the decoded JSON value of one line. Unknown extra fields are ignored.
        path: the file it came from (for the error message).
        line: its 1-based line number (for the error message).
        index: the record's 0-based position; given, ``id`` is optional and defaults to
            ``row-{index:06d}``.
        demo_chosen: given, ``kind`` is optional: a row without one is ``demo`` when
            ``demo_chosen`` and its label is 1, else ``feedback``.

    Raises:
        DataError: a field is missing or has the wrong type, the label is NaN, infinite
            or outside [0, 1], the response is empty, or kind is not demo/feedback.
    """
    require_object(obj, path=path, line=line)
    obj = dict(obj)
    if index is not None and obj.get("id") is None:
        obj["id"] = f"row-{index:06d}"
    for name in ("id", "prompt", "response", "label"):
        if name not in obj:
            raise _field_error(name, "missing", path=path, line=line)
    for name in ("id", "response"):
        string_field(obj, name, path=path, line=line)
    if not obj["id"]:
        raise _field_error("id", "is empty", path=path, line=line)
    if not obj["response"].strip():
        raise _field_error("response", "is empty", path=path, line=line)
    prompt = check_prompt(obj["prompt"], path=path, line=line)
    label = _check_label(obj["label"], path=path, line=line)
    if demo_chosen is not None and obj.get("kind") is None:
        obj["kind"] = "demo" if demo_chosen and label == 1.0 else "feedback"
    string_field(obj, "kind", path=path, line=line)
    if obj["kind"] not in KINDS:
        msg = f"{obj['kind']!r} is not one of {list(KINDS)}"
        raise _field_error("kind", msg, path=path, line=line)
    return PointwiseRow(obj["id"], prompt, obj["response"], label, obj["kind"])


def validate_pair(obj: Any, *, path: str | os.PathLike[str], line: int, index: int) -> PairwiseRow:
    """Checks one decoded record of a generic pairwise file and returns a `PairwiseRow`.

    A record is ``{"prompt", "chosen", "rejected"}`` plus an optional ``id``; ``prompt`` is
    a string or a list of ``{"role", "content"}`` messages, as in canonical rows. Without
    an ``id`` the pair is ``pair-{index:06d}`` (``index``: the record's 0-based index).

    Raises:
        DataError: a field is missing or has the wrong type, or a response or the id is
            empty; the message names the file and line.
    """
    require_object(obj, path=path, line=line)
    if "prompt" not in obj and "chosen" in obj:
        msg = (
            "missing (a pairwise record is {prompt, chosen, rejected}; HH-RLHF transcripts "
            "are data.source=hh-rlhf)"
        )
        raise _field_error("prompt", msg, path=path, line=line)
    for name in ("prompt", "chosen", "rejected"):
        if name not in obj:
            raise _field_error(name, "missing", path=path, line=line)
    for name in ("chosen", "rejected"):
        if not string_field(obj, name, path=path, line=line).strip():
            raise _field_error(name, "is empty", path=path, line=line)
    pair_id = f"pair-{index:06d}"
    if obj.get("id") is not None:
        pair_id = string_field(obj, "id", path=path, line=line)
        if not pair_id:
            raise _field_error("id", "is empty", path=path, line=line)
    prompt = check_prompt(obj["prompt"], path=path, line=line)
    return PairwiseRow(pair_id, prompt, obj["chosen"], obj["rejected"])


def pair_rows(pairs: Iterable[PairwiseRow], *, demo_chosen: bool = False) -> list[PointwiseRow]:
    """Each pair as two point-wise rows: ``{id}-c`` (chosen, label 1, ``demo`` with
    ``demo_chosen``) then ``{id}-r`` (rejected, label 0); the pairwise losses pair them
    up again by these ids (`megatron_pwdpo.engine.batches.pair_up`)."""
    chosen_kind = "demo" if demo_chosen else "feedback"
    rows: list[PointwiseRow] = []
    for pair in pairs:
        rows.append(PointwiseRow(f"{pair.id}-c", pair.prompt, pair.chosen, 1.0, chosen_kind))
        rows.append(PointwiseRow(f"{pair.id}-r", pair.prompt, pair.rejected, 0.0, "feedback"))
    return rows


def _open_binary(path: str | os.PathLike[str]):
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")  # noqa: SIM115


def _read_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes]]:
    """Yields (1-based line number, raw bytes); a broken gzip stream raises `DataError`."""
    line = 0
    with _open_binary(path) as f:
        try:
            for line, raw in enumerate(f, start=1):  # noqa: B007
                yield line, raw
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"cannot read file ({e})", path=path, line=line + 1) from e


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, Any]]:
    """Yields (1-based line number, decoded JSON value) of a .jsonl or .jsonl.gz file.

    Blank lines are skipped (their numbers still count).

    Raises:
        DataError: undecodable UTF-8, invalid JSON, or a file with no rows at all.
    """
    seen = False
    for line, raw in _read_lines(path):
        try:
            text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"text is not valid UTF-8 ({e.reason})", path=path, line=line) from e
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"invalid JSON ({e.msg}, column {e.colno})", path=path, line=line
            ) from e
        seen = True
        yield line, obj
    if not seen:
        raise DataError("file is empty (no rows)", path=path)


def read_pointwise_jsonl(path: str | os.PathLike[str]) -> list[PointwiseRow]:
    """Reads and validates a canonical point-wise .jsonl(.gz) file.

    Raises:
        DataError: any bad row (see `validate_row` and `iter_jsonl`), or a duplicate id
            (the message names both lines).
    """
    rows: list[PointwiseRow] = []
    first_line: dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        row = validate_row(obj, path=path, line=line)
        if row.id in first_line:
            msg = f"duplicate id {row.id!r} (first at line {first_line[row.id]})"
            raise _field_error("id", msg, path=path, line=line)
        first_line[row.id] = line
        rows.append(row)
    return rows


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Opens ``path`` for binary writing so that it appears whole or not at all.

    Writes go to a temporary file in the same folder, renamed over ``path`` with
    `os.replace` when the block exits without error (and deleted when it raises).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(
    rows: Iterable[PointwiseRow | PairwiseRow | dict[str, Any]], path: str | os.PathLike[str]
) -> Path:
    """Writes rows as jsonl (gzip when the name ends with .gz), atomically (`atomic_open`).

    Returns:
        The path written.
    """
    path = Path(path)
    with atomic_open(path) as raw:
        out = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if path.suffix == ".gz" else raw
        for row in rows:
            obj = row if isinstance(row, dict) else dataclasses.asdict(row)
            out.write(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")
        if out is not raw:
            out.close()
    return path
