"""The command line explains itself (config keys in --help, ``config --show``) and keeps
known third-party warnings out of a run's output without hiding the user's own filters."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from megatron_pwdpo.cli import CONFIG_COMMANDS, build_parser, main
from megatron_pwdpo.config.help import MOST_USED, SHOW, sections, show
from megatron_pwdpo.platform.known_warnings import KNOWN_WARNINGS, quiet_known_warnings


def test_most_used_keys_are_real_options():
    options = {s.prefix: {o.key.rsplit(".", 1)[-1] for o in s.options} for s in sections()}
    assert set(MOST_USED) == set(options)
    for prefix, keys in MOST_USED.items():
        assert set(keys) <= options[prefix], prefix


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_help_lists_sections_keys_and_defaults(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    assert SHOW in text
    by_key = {o.key: o.default.strip("`") for s in sections() for o in s.options}
    assert by_key["loss.beta"] == "0.1" and by_key["reference.mode"] == "resident"
    for prefix, keys in MOST_USED.items():
        assert f"\n  {prefix or 'top'} " in text
        for key in keys:
            full = f"{prefix}.{key}" if prefix else key
            assert f"{key}={by_key[full]}" in " ".join(text.split()), full


def test_config_show_prints_every_option(capsys):
    assert main(["config", "--show", "data"]) == 0
    text = capsys.readouterr().out
    data = next(s for s in sections() if s.prefix == "data")
    for option in data.options:
        assert f"  {option.key} (" in text
    assert "loss.beta" not in text
    assert main(["config"]) == 0
    everything = capsys.readouterr().out
    assert all(f"  {o.key} (" in everything for s in sections() for o in s.options)
    assert everything == show()
    assert main(["config", "--show", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megatron-pwdpo: error: no config section 'nope'") and "\n" not in err


IMPORTS = (
    "import megatron.core.optimizer, megatron.core.models.gpt, megatron.core.inference.contexts;"
    "from megatron.core.transformer import TransformerConfig;"
    "TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)"
)


def _stderr(code: str, *flags: str) -> str:
    cmd = [sys.executable, *flags, "-c", code]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=240).stderr


def test_filters_name_category_and_module_never_the_message_alone():
    message = "Apex is not installed. Falling back to Torch Norm"
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        assert quiet_known_warnings() is True
        warnings.warn_explicit(message, UserWarning, "x.py", 1, module="megatron.core.models")
        warnings.warn_explicit(message, UserWarning, "x.py", 1, module="my_project.train")
        warnings.warn_explicit(message, RuntimeWarning, "x.py", 2, module="megatron.core.models")
    assert [(w.category, w.lineno) for w in seen] == [(UserWarning, 1), (RuntimeWarning, 2)]


def test_megatron_import_warnings_show_when_the_user_sets_filters():
    """Megatron's imports do emit the known warnings, and ``-W`` (in ``sys.warnoptions``)
    keeps them: the filters step aside. (That a default run prints none of them is
    checked on a real run's output in tests/dist/test_user_workflow.py.)"""
    quiet = "from megatron_pwdpo.platform.known_warnings import quiet_known_warnings as q; q();"
    loud = _stderr(quiet + IMPORTS, "-W", "always")
    for category, _, message in KNOWN_WARNINGS:
        if category is UserWarning:
            assert f"{category.__name__}: {message.replace(chr(92), '')}" in loud, message
