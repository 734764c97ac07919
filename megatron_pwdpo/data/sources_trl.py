"""Hugging Face TRL's preference formats as canonical rows (``data.source=trl``).

What ``DPOTrainer``, ``KTOTrainer`` and ``BCOTrainer`` users already have, in TRL's
*standard* (text) or *conversational* (lists of ``{"role", "content"}`` messages) form:

================= ====================================================================
paired, explicit  ``{"prompt", "chosen", "rejected"}``
paired, implicit  ``{"chosen", "rejected"}``, each holding the prompt and its answer
unpaired          ``{"prompt", "completion", "label"}``, ``label`` a bool or a number
                  in [0, 1] (``response`` is accepted in place of ``completion``)
prompt-completion ``{"prompt", "completion"}`` (SFT data): demonstrations, label 1
================= ====================================================================

The form is fixed by the first record; every record must then have its fields, and a
problem stops the run with ``file:row: field 'name': ...`` on one line. Files are read by
`iter_records`: jsonl(.gz), a JSON array, parquet, or a folder written by ``datasets``'
``save_to_disk`` (``load_from_disk``).

* **Prompts.** A conversational prompt stays a message list: an HF tokenizer with a chat
  template renders it (``apply_chat_template(..., add_generation_prompt=True)``), any
  other tokenizer with the plain template of `render_prompt`
  (``"\\n\\nHuman: ...\\n\\nAssistant:"``). A conversational answer (``chosen``,
  ``rejected``, ``completion``) is one assistant message; its content is the response.
  A text answer loses one leading space, since both templates write the separator
  between prompt and response themselves.
* **Implicit prompts.** Conversational: the messages both lists share from the start,
  the rest must be one assistant message each (what TRL's ``extract_prompt`` does).
  Text: the longest common prefix, cut back to the last whitespace so that no word is
  split (``"The sky is blue."`` / ``"The sky is green."`` -> ``"The sky is"``).
* **Ids.** A record's own ``id`` (string or integer) when present, else
  ``trl-{index:06d}`` with the record's 0-based position in the file; pairs become
  ``{id}-c`` (label 1) and ``{id}-r`` (label 0), which ``dpo``/``ipo`` pair up again.
* **Kind.** Prompt-completion records (SFT data) are demonstrations with label 1, what
  ``loss.name=sft`` and the SFT stage train on. Otherwise a record's own ``kind``
  (``demo``/``feedback``) when present; else, with
  ``data.demo_chosen`` (the default), a label-1 row (a chosen answer, or ``label: true``)
  is a demonstration, which ULMA trains with its SFT term; ``data.demo_chosen=false``
  makes every row ``feedback``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from megatron_pwdpo.data.records import iter_records
from megatron_pwdpo.data.schema import (
    KINDS,
    ROLES,
    DataError,
    PointwiseRow,
    Prompt,
    check_prompt,
    require_object,
)

ID_PREFIX = "trl"
FORMATS: dict[str, tuple[str, ...]] = {
    "unpaired": ("prompt", "completion", "label"),
    "paired": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
    "prompt-completion": ("prompt", "completion"),
}


def trl_format(obj: dict[str, Any]) -> str | None:
    """``"unpaired"``, ``"paired"``, ``"implicit"``, ``"prompt-completion"`` or None:
    which TRL form a record's fields are in."""
    if "label" in obj and ("completion" in obj or "response" in obj):
        return "unpaired"
    if "chosen" in obj and "rejected" in obj:
        return "paired" if "prompt" in obj else "implicit"
    if "prompt" in obj and "completion" in obj:
        return "prompt-completion"
    return None


def _error(name: str, message: str, *, path: str, line: int) -> DataError:
    return DataError(f"field '{name}': {message}", path=path, line=line)


def _require(obj: dict[str, Any], name: str, form: str, *, path: str, line: int) -> Any:
    if name not in obj or obj[name] is None:
        fields = ", ".join(FORMATS[form])
        msg = f"missing (the first record is TRL {form}: {fields})"
        raise _error(name, msg, path=path, line=line)
    return obj[name]


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list)


def _messages(value: Any, name: str, *, path: str, line: int) -> list[dict[str, str]]:
    """A checked message list (the roles of `ROLES`, string contents)."""
    if not isinstance(value, list) or not value:
        msg = f"expected a non-empty list of messages, got {type(value).__name__}"
        raise _error(name, msg, path=path, line=line)
    for i, message in enumerate(value):
        ok = isinstance(message, dict) and message.get("role") in ROLES
        if not ok or not isinstance(message.get("content"), str):
            msg = f"message {i} is not a {{'role': {'/'.join(ROLES)}, 'content': str}} object"
            raise _error(name, msg, path=path, line=line)
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _answer(value: Any, name: str, *, path: str, line: int) -> str:
    """The response text of a TRL answer: a string (one leading space dropped) or one
    assistant message."""
    if isinstance(value, str):
        text = value.removeprefix(" ")
    else:
        messages = _messages(value, name, path=path, line=line)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            roles = [m["role"] for m in messages]
            msg = f"expected one assistant message, got roles {roles}"
            raise _error(name, msg, path=path, line=line)
        text = messages[0]["content"]
    if not text.strip():
        raise _error(name, "is empty", path=path, line=line)
    return text


def _prompt(obj: dict[str, Any], form: str, *, path: str, line: int) -> Prompt:
    value = _require(obj, "prompt", form, path=path, line=line)
    if _is_conversation(value):
        return _messages(value, "prompt", path=path, line=line)
    return check_prompt(value, path=path, line=line)


def _common_words(chosen: str, rejected: str) -> int:
    """Length of the longest common prefix, cut back to just after the last whitespace
    (or to the whitespace itself when a space separates prompt and answer)."""
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    if n == min(len(chosen), len(rejected)):
        return n
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    return n - 1 if n > 0 and chosen[n - 1] == " " else n


def _split_implicit(obj: dict[str, Any], *, path: str, line: int) -> tuple[Prompt, str, str]:
    """(prompt, chosen response, rejected response) of an implicit-prompt pair."""
    chosen = _require(obj, "chosen", "implicit", path=path, line=line)
    rejected = _require(obj, "rejected", "implicit", path=path, line=line)
    if _is_conversation(chosen) != _is_conversation(rejected):
        msg = "chosen and rejected must both be text or both be message lists"
        raise _error("rejected", msg, path=path, line=line)
    if _is_conversation(chosen):
        chosen = _messages(chosen, "chosen", path=path, line=line)
        rejected = _messages(rejected, "rejected", path=path, line=line)
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            msg = (
                "shares no first message with rejected (the implicit prompt is their common start)"
            )
            raise _error("chosen", msg, path=path, line=line)
        answers = (
            _answer(chosen[n:], "chosen", path=path, line=line),
            _answer(rejected[n:], "rejected", path=path, line=line),
        )
        return chosen[:n], *answers
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            msg = f"expected a string or a list of messages, got {type(value).__name__}"
            raise _error(name, msg, path=path, line=line)
    n = _common_words(chosen, rejected)
    if n == 0:
        msg = "shares no prompt with rejected (the implicit prompt is their common start)"
        raise _error("chosen", msg, path=path, line=line)
    answers = (
        _answer(chosen[n:], "chosen", path=path, line=line),
        _answer(rejected[n:], "rejected", path=path, line=line),
    )
    return chosen[:n], *answers


def _label(value: Any, *, path: str, line: int) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and 0.0 <= float(value) <= 1.0:  # NaN fails too
        return float(value)
    msg = f"expected true/false or a number in [0, 1], got {value!r}"
    raise _error("label", msg, path=path, line=line)


def _record_id(obj: dict[str, Any], index: int, *, path: str, line: int) -> str:
    value = obj.get("id")
    if value is None:
        return f"{ID_PREFIX}-{index:06d}"
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise _error(
            "id", f"expected a non-empty string or an integer, got {value!r}", path=path, line=line
        )
    return str(value)


def _kind(obj: dict[str, Any], label: float, *, demo_chosen: bool, path: str, line: int) -> str:
    value = obj.get("kind")
    if value is None:
        return "demo" if demo_chosen and label == 1.0 else "feedback"
    if value not in KINDS:
        raise _error("kind", f"{value!r} is not one of {list(KINDS)}", path=path, line=line)
    return value


def _rows_of_record(
    obj: dict[str, Any], form: str, index: int, *, demo_chosen: bool, path: str, line: int
) -> Iterator[PointwiseRow]:
    row_id = _record_id(obj, index, path=path, line=line)
    if form == "prompt-completion":
        prompt = _prompt(obj, form, path=path, line=line)
        value = _require(obj, "completion", form, path=path, line=line)
        response = _answer(value, "completion", path=path, line=line)
        yield PointwiseRow(row_id, prompt, response, 1.0, "demo")
        return
    if form == "unpaired":
        prompt = _prompt(obj, form, path=path, line=line)
        name = "completion" if "completion" in obj or "response" not in obj else "response"
        value = _require(obj, name, form, path=path, line=line)
        response = _answer(value, name, path=path, line=line)
        label = _label(_require(obj, "label", form, path=path, line=line), path=path, line=line)
        kind = _kind(obj, label, demo_chosen=demo_chosen, path=path, line=line)
        yield PointwiseRow(row_id, prompt, response, label, kind)
        return
    if form == "paired":
        prompt = _prompt(obj, form, path=path, line=line)
        chosen = _answer(
            _require(obj, "chosen", form, path=path, line=line), "chosen", path=path, line=line
        )
        rejected = _answer(
            _require(obj, "rejected", form, path=path, line=line), "rejected", path=path, line=line
        )
    else:
        prompt, chosen, rejected = _split_implicit(obj, path=path, line=line)
    chosen_kind = "demo" if demo_chosen else "feedback"
    yield PointwiseRow(f"{row_id}-c", prompt, chosen, 1.0, chosen_kind)
    yield PointwiseRow(f"{row_id}-r", prompt, rejected, 0.0, "feedback")


def trl_rows(
    path: str | os.PathLike[str], *, demo_chosen: bool = True, split: str | None = None
) -> list[PointwiseRow]:
    """Rows of a file in one of TRL's preference formats (module docstring).

    Args:
        path: a .jsonl/.json(.gz) or .parquet file, or a ``save_to_disk`` folder.
        demo_chosen: label-1 rows without their own ``kind`` are demonstrations.
        split: the split of a ``DatasetDict`` folder.

    Returns:
        Rows in file order: one per unpaired record, two (``-c``, ``-r``) per pair.

    Raises:
        DataError: a record not in the first record's form, a missing or ill-typed field,
            an empty answer, a label that is neither a bool nor in [0, 1], no shared
            implicit prompt; the message names the file, the row and the field.
    """
    path = str(path)
    rows: list[PointwiseRow] = []
    form: str | None = None
    for index, (line, obj) in enumerate(iter_records(path, split=split)):
        require_object(obj, path=path, line=line)
        if form is None:
            form = trl_format(obj)
            if form is None:
                msg = (
                    f"not a TRL record (fields {sorted(obj)}; expected prompt, completion[, "
                    "label] or [prompt,] chosen, rejected)"
                )
                raise DataError(msg, path=path, line=line)
        rows.extend(
            _rows_of_record(obj, form, index, demo_chosen=demo_chosen, path=path, line=line)
        )
    return rows
