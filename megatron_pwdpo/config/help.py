"""Config options on the terminal: the ``--help`` epilog and ``megatron-pwdpo config``.

``megatron-pwdpo train --help`` (and ``eval``, ``precompute-ref``, ``experiment``) ends
with the config sections and their most used keys with the defaults of the dataclasses
(`help_epilog`); ``megatron-pwdpo config --show [SECTION]`` prints every option of the
generated reference (`megatron_pwdpo.config.docs`, the source of ``docs/config.md``)
as plain text, for one section or all of them. Nothing here is written by hand but the
choice of the most used keys, which a unit test checks against the dataclasses.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from megatron_pwdpo.config.docs import Option, Section, _summary, collect

SHOW = "megatron-pwdpo config --show [SECTION]"
# The keys a first run changes, per section ("" = the top-level keys).
MOST_USED: dict[str, tuple[str, ...]] = {
    "": ("run_dir", "resume"),
    "model": ("num_layers", "hidden_size", "vocab_size"),
    "parallel": ("tensor_parallel", "pipeline_parallel"),
    "data": ("source", "path", "tokenizer", "tokenizer_type", "seq_length", "eval_rows"),
    "loss": ("name", "beta", "mode", "logp_reduction"),
    "train": ("steps", "sft_steps", "lr", "global_batch_size", "init_checkpoint"),
    "reference": ("mode", "checkpoint"),
    "logging": ("tensorboard", "wandb"),
    "precision": ("dtype", "fp8"),
}


def sections() -> list[Section]:
    """The sections of :class:`~megatron_pwdpo.config.RunConfig`, as the reference has them."""
    from megatron_pwdpo.config.schema import RunConfig

    return collect(RunConfig)


def _plain(text: str) -> str:
    return text.replace("``", "").replace("`", "")


def _short(option: Option) -> str:
    return f"{option.key.rsplit('.', 1)[-1]}={_plain(option.default)}"


def help_epilog() -> str:
    """The config part of a command's ``--help``: sections, most used keys, defaults."""
    lines = [
        "config: YAML sections, or section.key=value overrides (defaults of the config",
        "dataclasses shown; train with no --config starts from examples/tiny_cpu.yaml):",
    ]
    for section in sections():
        by_name = {o.key.rsplit(".", 1)[-1]: o for o in section.options}
        keys = [_short(by_name[name]) for name in MOST_USED.get(section.prefix, ())]
        more = len(section.options) - len(keys)
        title = section.prefix or "top"
        body = "  ".join(keys) + (f"  (+{more} more)" if more else "")
        lines += textwrap.wrap(
            body, width=88, initial_indent=f"  {title:<11}", subsequent_indent=" " * 13
        )
    lines += [
        "",
        f"every option with its meaning: {SHOW} (the same as docs/config.md)",
        "example: megatron-pwdpo train data.path=prefs.jsonl loss.beta=0.1 train.steps=200",
    ]
    return "\n".join(lines)


def show(section: str | None = None) -> str:
    """Every option of one section (all sections when None), as plain text.

    Raises:
        KeyError: no section of that name (the message lists the sections).
    """
    chosen = sections()
    names = [s.prefix or "top" for s in chosen]
    if section is not None:
        if section not in names:
            raise KeyError(f"no config section {section!r}; choose one of {names}")
        chosen = [chosen[names.index(section)]]
    out: list[str] = []
    for s in chosen:
        out += [f"[{s.prefix or 'top'}] {_plain(_summary(s.cls))}"]
        for o in s.options:
            out.append(f"  {o.key} ({o.type}) = {_plain(o.default)}")
            out += textwrap.wrap(
                _plain(o.meaning), width=88, initial_indent=" " * 6, subsequent_indent=" " * 6
            )
        out.append("")
    return "\n".join(out)


def _cmd_config(args: argparse.Namespace) -> int:
    from megatron_pwdpo.config.schema import ConfigError

    try:
        text = show(args.show)
    except KeyError as err:
        raise ConfigError(err.args[0]) from None
    sys.stdout.write(text)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``megatron-pwdpo config --show [SECTION]``."""
    cmd = subparsers.add_parser(
        "config",
        help="print every config option with its default and meaning",
        description="Print the config reference (every option, its type, default and "
        "meaning) as plain text; docs/config.md has the same as markdown.",
    )
    cmd.add_argument(
        "--show",
        nargs="?",
        const=None,
        default=None,
        metavar="SECTION",
        help="one section only (" + ", ".join(n or "top" for n in MOST_USED) + ")",
    )
    cmd.set_defaults(func=_cmd_config)
