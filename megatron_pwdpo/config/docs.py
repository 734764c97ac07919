"""The configuration reference (``docs/config.md``), generated from the config dataclasses.

Every option is a field of a frozen dataclass reachable from
:class:`megatron_pwdpo.config.schema.RunConfig`, documented in its class docstring's
``Attributes:`` section. This module walks those dataclasses and renders one markdown
table per section (key, type, default as YAML writes it, meaning), so the user docs can
never miss an option: a field without an ``Attributes:`` entry (or an entry without a
field) raises :class:`ConfigReferenceError`, and the unit tests check that
``docs/config.md`` is the current output.

    python -m megatron_pwdpo.config.docs > docs/config.md
    python -m megatron_pwdpo.config.docs --check docs/config.md
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "config.md"
REGENERATE = "python -m megatron_pwdpo.config.docs > docs/config.md"

_INTRO = f"""\
# Configuration reference

<!-- Generated from the config dataclasses' docstrings by `{REGENERATE}`; do not edit. -->

Every option of a run, with its type, default and meaning. Options are set in a YAML
file given as `megatron-pwdpo train --config FILE`, one mapping per section (see
[examples/tiny_cpu.yaml](../examples/tiny_cpu.yaml), which `train` runs when no
`--config` is given), or on the command line as `section.field=value` overrides, which
win over the file: `megatron-pwdpo train --config FILE train.steps=5 loss.name=sft`.
Override values are parsed as YAML (`true`/`false`, numbers, `null`, `[0, 1]`); the
top-level keys take no section (`run_dir=runs/x`). Relative `data.path` and
`data.tokenizer` in a file resolve against the file's folder. Every value is checked
when the config loads: a wrong one stops the run with one line that names the key.

The defaults below are those of the dataclasses, i.e. of keys a config file leaves out.
This page is generated from the `Attributes:` sections of the dataclasses' docstrings:
after adding or changing an option, run `{REGENERATE}`
(the unit tests check that it is current).
"""


class ConfigReferenceError(ValueError):
    """A config dataclass whose docstring does not document its fields."""


# --------------------------------------------------------------------------- docstrings

_ENTRY = re.compile(r"^(?P<name>[A-Za-z_]\w*)\s*(?:\([^)]*\))?\s*:(?:\s+(?P<text>.*))?$")
_ROLE = re.compile(r":[\w:]+:`([^`]+)`")  # :func:`x` -> `x`
_DOUBLE_TICKS = re.compile(r"``(.+?)``")  # ``x`` -> `x`


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _attributes_block(cls: type) -> list[str]:
    """The lines under ``Attributes:`` (more indented than it), or raise."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Attributes:":
            base = _indent(line)
            block = []
            for inner in lines[i + 1 :]:
                if inner.strip() and _indent(inner) <= base:
                    break
                block.append(inner)
            return block
    raise ConfigReferenceError(
        f"{cls.__qualname__} ({cls.__module__}) has no 'Attributes:' section in its "
        "docstring; every config field must be documented there"
    )


def parse_attributes(cls: type) -> dict[str, str]:
    """``{field: meaning}`` from ``cls``'s Google-style ``Attributes:`` section.

    An entry is a line at the block's first indentation, ``name: text`` (or
    ``name (type): text``); more indented lines continue it. The text of an entry is
    joined into one line.
    """
    block = _attributes_block(cls)
    entry_indent = min((_indent(line) for line in block if line.strip()), default=0)
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in block:
        if not line.strip():
            continue
        if _indent(line) == entry_indent:
            match = _ENTRY.match(line.strip())
            if match is None:
                raise ConfigReferenceError(
                    f"{cls.__qualname__}: cannot read the Attributes entry {line.strip()!r} "
                    "(expected 'name: meaning')"
                )
            current = entries.setdefault(match["name"], [])
            current.append(match["text"] or "")
        elif current is not None:
            current.append(line.strip())
    return {name: _to_markdown(" ".join(parts)) for name, parts in entries.items()}


_YAML_WORDS = {"`None`": "`null`", "`True`": "`true`", "`False`": "`false`"}


def _to_markdown(text: str) -> str:
    """One line of markdown: ``code`` and :role:`x` become `code`, and Python's
    ``None``/``True``/``False`` the YAML a config file writes."""
    text = " ".join(text.split())
    text = _DOUBLE_TICKS.sub(r"`\1`", _ROLE.sub(r"`\1`", text))
    for python, yaml_word in _YAML_WORDS.items():
        text = text.replace(python, yaml_word)
    return text


# --------------------------------------------------------------------------- values


def yaml_value(value: Any) -> str:
    """``value`` as YAML writes it, on one line (``null``, ``true``, ``1.0e-05``, ``[0, 1]``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9)
    return text.removesuffix("\n...\n").removesuffix("\n")


def type_name(tp: Any) -> str:
    """A readable type: ``int``, ``a | b | c`` (Literal), ``float | null``, ``list[float]``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return " | ".join(yaml_value(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " | ".join(names + (["null"] if type(None) in args else []))
    if tp is type(None):
        return "null"
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


# --------------------------------------------------------------------------- rendering


@dataclasses.dataclass(frozen=True)
class Option:
    """One row of the reference."""

    key: str
    type: str
    default: str
    meaning: str


@dataclasses.dataclass(frozen=True)
class Section:
    """One ``## heading`` of the reference: the options of one dataclass."""

    prefix: str
    cls: type
    options: tuple[Option, ...]


def collect(root: type, prefix: str = "") -> list[Section]:
    """The sections under the dataclass ``root``, its own (non-dataclass) fields first.

    Raises :class:`ConfigReferenceError` for a field without an ``Attributes:`` entry, or
    an entry that names no field.
    """
    hints = typing.get_type_hints(root)
    fields = dataclasses.fields(root)
    subsections = [f for f in fields if dataclasses.is_dataclass(hints[f.name])]
    scalars = [f for f in fields if f not in subsections]
    sections: list[Section] = []
    if scalars:
        meanings = parse_attributes(root)
        _check_documented(root, [f.name for f in scalars], meanings)
        options = tuple(_option(f, hints[f.name], meanings[f.name], prefix) for f in scalars)
        sections.append(Section(prefix.rstrip("."), root, options))
    for f in subsections:
        sections.extend(collect(hints[f.name], f"{prefix}{f.name}."))
    return sections


def _check_documented(cls: type, names: list[str], meanings: dict[str, str]) -> None:
    where = f"the 'Attributes:' section of {cls.__qualname__}'s docstring ({cls.__module__})"
    for name in names:
        if not meanings.get(name):
            raise ConfigReferenceError(
                f"{cls.__qualname__}.{name} is not documented: add '{name}: <meaning>' to "
                f"{where}, then run `{REGENERATE}`"
            )
    stale = sorted(set(meanings) - set(names))
    if stale:
        raise ConfigReferenceError(
            f"{cls.__qualname__} has no field {stale[0]!r}, but {where} documents it"
        )


def _option(f: dataclasses.Field, tp: Any, meaning: str, prefix: str) -> Option:
    default = _default(f)
    shown = "(required)" if default is dataclasses.MISSING else f"`{yaml_value(default)}`"
    return Option(f"{prefix}{f.name}", type_name(tp), shown, meaning)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _summary(cls: type) -> str:
    doc = inspect.cleandoc(cls.__doc__ or "")
    return _to_markdown(doc.split("\n\n")[0])


def render_sections(root: type) -> str:
    """The markdown of every section under ``root`` (no intro)."""
    out: list[str] = []
    for section in collect(root):
        title = f"`{section.prefix}`" if section.prefix else "Top-level keys"
        source = f"`{section.cls.__qualname__}` in `{section.cls.__module__.replace('.', '/')}.py`"
        out += [f"## {title}", "", f"{_summary(section.cls)} ({source})", ""]
        out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for o in section.options:
            cells = [f"`{o.key}`", f"`{o.type}`", o.default, o.meaning]
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def config_reference_markdown() -> str:
    """The whole of ``docs/config.md``."""
    from megatron_pwdpo.config.schema import RunConfig

    return _INTRO + "\n" + render_sections(RunConfig)


# --------------------------------------------------------------------------- command line


def check(path: Path) -> str | None:
    """``None`` when ``path`` holds the current reference, else why not (one line)."""
    try:
        current = path.read_text()
    except OSError as err:
        return f"{path}: cannot read ({err.strerror})"
    if current != config_reference_markdown():
        return f"{path} is out of date with the config dataclasses; regenerate: {REGENERATE}"
    return None


def _run(check_path: Path | None) -> int:
    if check_path is None:
        sys.stdout.write(config_reference_markdown())
        return 0
    problem = check(check_path)
    if problem is not None:
        print(f"megatron-pwdpo: error: {problem}", file=sys.stderr)
        return 1
    print(f"{check_path} is up to date")
    return 0


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check",
        type=Path,
        default=None,
        metavar="PATH",
        help="exit 1 if PATH (e.g. docs/config.md) differs from the generated reference",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``megatron-pwdpo config-reference`` to the CLI."""
    cmd = subparsers.add_parser(
        "config-reference",
        help="print the markdown reference of every config option (docs/config.md)",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    _add_arguments(cmd)
    cmd.set_defaults(func=lambda args: _run(args.check))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_pwdpo.config.docs",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    _add_arguments(parser)
    return _run(parser.parse_args(argv).check)


if __name__ == "__main__":
    sys.exit(main())
