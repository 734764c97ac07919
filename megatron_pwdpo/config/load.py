"""Loading a run configuration: YAML, ``section.field=value`` overrides, relative paths.

Everything is validated on loading (:mod:`megatron_pwdpo.config.validation`), before any
process group starts: a wrong value stops the run with one line (:class:`ConfigError`)
that names the key, never a traceback from deep inside Megatron. Relative paths in a
config file are resolved against the file's own folder, so ``examples/tiny_cpu.yaml``
runs from any working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_pwdpo.config.schema import ConfigError, RunConfig
from megatron_pwdpo.config.validation import validate

# the run config of `megatron-pwdpo train` without --config (a source checkout's example)
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml"
HUB_PREFIX = "hf:"  # data.path naming a Hugging Face Hub dataset, not a file


def _as_float(value: Any, key: str) -> float:
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return float(value)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(c) for c in typing.get_args(tp))
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if tp is float:
        return _as_float(value, key)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name}: expected a section, got {value!r}")
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, leaf = dotted.split(".")
    node = tree
    for section in sections:
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise ConfigError(f"'{dotted}': '{section}' is not a section")
        node = child
    node[leaf] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["train.steps=5", "loss.name=sft"]`` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{arg}' is not of the form section.field=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


_PATH_KEYS = (("data", "path"), ("data", "tokenizer"))


def resolve_file_paths(tree: dict[str, Any], folder: Path) -> None:
    """Make the relative ``data.path`` / ``data.tokenizer`` of a config file's ``tree``
    relative to the file's ``folder`` (in place). A Hub dataset (``hf:OWNER/NAME``) is a
    name, not a path, and is left alone."""
    for section, key in _PATH_KEYS:
        value = tree.get(section, {}).get(key) if isinstance(tree.get(section), dict) else None
        relative = isinstance(value, str) and not Path(value).is_absolute()
        if relative and not value.startswith(HUB_PREFIX):
            tree[section][key] = str((folder / value).resolve())


def load_config(path: str | Path | None, overrides: list[str] = (), *, on=None) -> RunConfig:
    """Load a YAML file (or the defaults), apply overrides, validate (for the platform
    ``on``, a :class:`megatron_pwdpo.platform.decisions.Platform`; this machine's when None).

    Relative data paths in the file resolve against the file's folder; relative
    paths given as overrides resolve against the working directory.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except OSError as err:
            raise ConfigError(f"{path}: cannot read config ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML ({err})".replace("\n", " ")) from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of sections")
        resolve_file_paths(tree, path.parent)
        if isinstance(tree.get("run_dir"), str) and not Path(tree["run_dir"]).is_absolute():
            tree["run_dir"] = str(Path.cwd() / tree["run_dir"])
    tree = _merge(tree, parse_overrides(list(overrides)))
    config = _build(RunConfig, tree, "")
    validate(config, on=on)
    return config


def to_dict(config: RunConfig) -> dict[str, Any]:
    """The config as plain data (what ``config.yaml`` in the run directory holds)."""
    return dataclasses.asdict(config)


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
