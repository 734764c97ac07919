"""docs/config.md: generated from the config dataclasses, current, complete, and exact."""

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from megatron_pwdpo.cli import main as cli_main
from megatron_pwdpo.config import RunConfig
from megatron_pwdpo.config.docs import (
    DOC_PATH,
    REGENERATE,
    ConfigReferenceError,
    config_reference_markdown,
    main,
    parse_attributes,
    render_sections,
    type_name,
)


def _rows(markdown: str) -> dict[str, list[str]]:
    """``{key: [type, default, meaning]}`` of every table row, cells unescaped."""
    rows = {}
    for line in markdown.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        assert len(cells) == 4, line
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def _all_options(root: type = RunConfig, prefix: str = "") -> dict[str, object]:
    """``{dotted key: default}`` of every option under ``root``, from the dataclasses."""
    hints = typing.get_type_hints(root)
    out = {}
    instance = root()
    for f in dataclasses.fields(root):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_all_options(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = getattr(instance, f.name)
    return out


def test_docs_config_md_is_current():
    assert DOC_PATH.read_text() == config_reference_markdown(), (
        f"docs/config.md is out of date with the config dataclasses; regenerate it: {REGENERATE}"
    )


def test_every_option_has_a_row_with_a_meaning():
    rows = _rows(config_reference_markdown())
    options = _all_options()
    assert sorted(rows) == sorted(options)
    for key, (type_cell, _, meaning) in rows.items():
        assert type_cell.strip("`"), key
        assert len(meaning) > 3, f"{key}: empty meaning"
        assert "\n" not in meaning and "``" not in meaning, key
    text = config_reference_markdown()
    assert "## Top-level keys" in text
    sections = {key.split(".")[0] for key in options if "." in key}
    assert {"model", "parallel", "data", "loss", "train", "precision"} <= sections
    for section in sections:
        assert f"## `{section}`" in text


def test_defaults_parse_back_as_yaml():
    rows = _rows(config_reference_markdown())
    for key, default in _all_options().items():
        cell = rows[key][1]
        assert cell.startswith("`") and cell.endswith("`"), (key, cell)
        assert yaml.safe_load(cell.strip("`")) == default, (key, cell, default)


def test_some_rows_read_as_expected():
    rows = _rows(config_reference_markdown())
    assert rows["train.lr"][:2] == ["`float`", "`0.0003`"]
    assert rows["model.norm_epsilon"][1] == "`1.0e-05`"  # YAML 1.1 reads 1e-05 as a string
    assert rows["data.red_team_score_range"][:2] == ["`list[float] | null`", "`null`"]
    assert rows["resume"][:2] == ["`auto | never`", "`auto`"]
    assert rows["precision.fp8"][0] == "`delayed | tensorwise | mxfp8 | null`"
    assert rows["train.progress"][1] == "`true`"
    # ``code`` became `code`, Python's None became YAML's null, lines were joined
    assert "`null` = no budget" in rows["train.time_budget_s"][2]
    assert rows["model.vocab_size"][2].endswith("see `padded_vocab_size`).")


def test_type_names():
    assert type_name(int) == "int"
    assert type_name(Literal["a", "b", "c"]) == "a | b | c"
    assert type_name(float | None) == "float | null"
    assert type_name(typing.Optional[list[float]]) == "list[float] | null"  # noqa: UP045
    assert type_name(tuple[int, ...]) == "tuple[int, ...]"


@dataclass(frozen=True)
class _Inner:
    """A section.

    Attributes:
        documented: a meaning that goes
            on over two lines, with a | pipe and ``code``.
        choice (str): one of two.
    """

    documented: int = 1
    choice: Literal["x", "y"] = "x"


@dataclass(frozen=True)
class _Root:
    """A root.

    Attributes:
        top: a top-level key.

    Some text after the Attributes section, which is not an entry.
    """

    top: str | None = None
    inner: _Inner = field(default_factory=_Inner)


def test_docstring_parsing_and_rendering_of_any_root():
    assert parse_attributes(_Inner) == {
        "documented": "a meaning that goes on over two lines, with a | pipe and `code`.",
        "choice": "one of two.",
    }
    assert parse_attributes(_Root) == {"top": "a top-level key."}
    text = render_sections(_Root)
    assert "| `top` | `str \\| null` | `null` | a top-level key. |" in text
    assert "| `inner.documented` | `int` | `1` | a meaning that goes on over two lines, " in text
    assert "with a \\| pipe and `code`. |" in text
    assert "| `inner.choice` | `x \\| y` | `x` | one of two. |" in text


@dataclass(frozen=True)
class _Undocumented:
    """A section with a new option nobody documented.

    Attributes:
        known: documented.
    """

    known: int = 0
    brand_new: float = 0.5


@dataclass(frozen=True)
class _RootWithUndocumented:
    """Root.

    Attributes:
        top: documented.
    """

    top: int = 0
    section: _Undocumented = field(default_factory=_Undocumented)


def test_an_undocumented_field_names_the_class_and_field():
    with pytest.raises(ConfigReferenceError, match=r"_Undocumented\.brand_new is not documented"):
        render_sections(_RootWithUndocumented)


def test_a_stale_entry_and_a_missing_section_are_errors():
    @dataclass(frozen=True)
    class Stale:
        """Stale.

        Attributes:
            kept: documented.
            removed: no longer a field.
        """

        kept: int = 0

    @dataclass(frozen=True)
    class NoAttributes:
        """No Attributes section at all."""

        value: int = 0

    with pytest.raises(ConfigReferenceError, match=r"Stale has no field 'removed'"):
        render_sections(Stale)
    with pytest.raises(ConfigReferenceError, match=r"NoAttributes .* no 'Attributes:' section"):
        render_sections(NoAttributes)


def test_check_flag_and_cli_subcommand(tmp_path, capsys):
    good, stale = tmp_path / "good.md", tmp_path / "stale.md"
    good.write_text(config_reference_markdown())
    stale.write_text(config_reference_markdown() + "edited by hand\n")
    assert main(["--check", str(good)]) == 0
    assert main(["--check", str(stale)]) == 1
    assert REGENERATE in capsys.readouterr().err
    assert cli_main(["config-reference", "--check", str(stale)]) == 1
    assert cli_main(["config-reference"]) == 0
    assert capsys.readouterr().out == config_reference_markdown()
