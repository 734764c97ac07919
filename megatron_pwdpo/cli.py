"""``megatron-pwdpo``: the command line.

    megatron-pwdpo train [--config FILE] [section.field=value ...]
    megatron-pwdpo tokenizer train --data FILE --out PREFIX [--vocab-size N]

``train`` with no ``--config`` runs ``examples/tiny_cpu.yaml`` (the tiny CPU default).
Launch it under ``torchrun --nproc-per-node N`` (or ``srun``) for several processes.
A bad config or bad data stops with one line naming the key, or the file and line,
and exit code 2, before any model is built.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from megatron_pwdpo.platform import lifetime
from megatron_pwdpo.platform.known_warnings import quiet_known_warnings

if lifetime.importing_in_spawned_child():
    # A spawn-context child (e.g. torch_dist's writer Manager) imports this module as its
    # parent's main module, before anything else: it dies with its parent from here on,
    # and its imports (Megatron's below) stay as quiet as the parent's.
    lifetime.install_in_spawned_child()
    quiet_known_warnings()

from megatron_pwdpo.config import DEFAULT_CONFIG, ConfigError, load_config  # noqa: E402

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
# The commands that take a run config: their --help lists its sections and keys.
CONFIG_COMMANDS = ("train", "eval", "precompute-ref", "experiment")


def _quiet_third_party() -> None:
    """Megatron's logger at WARNING, ours at INFO as plain lines."""
    logging.getLogger("megatron").setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def _cmd_train(args: argparse.Namespace) -> int:
    config_path = args.config
    if config_path is None:
        if not DEFAULT_CONFIG.exists():
            raise ConfigError(
                f"no --config given and the default {DEFAULT_CONFIG} is missing (it ships "
                "with a source checkout, not a wheel): pass --config FILE"
            )
        config_path = DEFAULT_CONFIG
    if args.dry_run:
        return _dry_run(config_path, args)
    config = load_config(config_path, args.overrides)
    from megatron_pwdpo.training.loop import train

    train(config)
    return 0


def _dry_run(config_path: Path, args: argparse.Namespace) -> int:
    """Validate for ``--world-size`` on this platform (or ``--platform``) and print the
    plan and the memory estimate per GPU; start nothing."""
    from megatron_pwdpo.config.validation import validate
    from megatron_pwdpo.model.sizing import memory_table
    from megatron_pwdpo.platform import decisions as platform
    from megatron_pwdpo.platform.distributed import world_from_env

    on = platform.PLATFORMS[args.platform] if args.platform else platform.detect()
    config = load_config(config_path, args.overrides, on=on)
    p = config.parallel
    world = args.world_size or world_from_env().world_size
    validate(config, world_size=world, on=on)
    dp = world // (p.tensor_parallel * p.pipeline_parallel)
    plan = platform.plan_build(config, on, data_parallel=dp)
    print(f"{config_path}: valid for a world of {world} on {on.name}")
    print(f"model: {plan.describe()}")
    print(memory_table(config, world))
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from megatron_pwdpo.data.prepare import load_rows_from_path
    from megatron_pwdpo.data.tokenizer import row_texts, train_sentencepiece

    rows = load_rows_from_path(args.data, source=args.source)
    path = train_sentencepiece(row_texts(rows), model_prefix=args.out, vocab_size=args.vocab_size)
    print(f"wrote {path} ({args.vocab_size} pieces, from {len(rows)} rows of {args.data})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-pwdpo",
        description="Point-wise preference alignment (point-wise DPO, ULMA) on Megatron-Core. "
        "Run 'megatron-pwdpo COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a policy (SFT, point-wise DPO, ...)")
    train.add_argument("--config", type=Path, default=None, help="YAML config file")
    train.add_argument("overrides", nargs="*", help="section.field=value overrides")
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, print the build plan and the memory estimate per GPU, and exit",
    )
    train.add_argument(
        "--world-size", type=int, default=None, help="with --dry-run: the number of GPUs"
    )
    train.add_argument(
        "--platform",
        choices=["cpu", "gpu", "gpu-te"],
        default=None,
        help="with --dry-run: plan for this platform instead of this machine's (gpu: CUDA "
        "without Transformer Engine; gpu-te: an H100 with TE and apex)",
    )
    train.set_defaults(func=_cmd_train)

    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    tok_train = tok_sub.add_parser("train", help="train a sentencepiece model on a dataset")
    tok_train.add_argument("--data", required=True, help="hh-rlhf or point-wise jsonl(.gz)")
    tok_train.add_argument("--source", choices=["hh-rlhf", "pointwise"], default="hh-rlhf")
    tok_train.add_argument("--out", required=True, help="output prefix (writes PREFIX.model)")
    tok_train.add_argument("--vocab-size", type=int, default=2048)
    tok_train.set_defaults(func=_cmd_tokenizer_train)
    from megatron_pwdpo.data.cli import register as register_data_commands

    register_data_commands(sub)
    from megatron_pwdpo.convert.cli import register as register_convert_commands

    register_convert_commands(sub)
    from megatron_pwdpo.evaluation.experiment import register as register_experiment_commands

    register_experiment_commands(sub)
    from megatron_pwdpo.evaluation.plot import register as register_plot_command

    register_plot_command(sub)
    from megatron_pwdpo.reference.cli import register as register_reference_commands

    register_reference_commands(sub)
    from megatron_pwdpo.config.docs import register as register_config_reference

    register_config_reference(sub)
    from megatron_pwdpo.config.help import help_epilog
    from megatron_pwdpo.config.help import register as register_config_command

    register_config_command(sub)
    epilog = help_epilog()
    for name in CONFIG_COMMANDS:
        command = sub.choices[name]
        command.epilog = epilog
        command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_known_warnings()  # before build_parser, whose imports may warn
    lifetime.install_in_trainer()  # helper processes die with this one
    args = build_parser().parse_args(argv)
    _quiet_third_party()
    from megatron_pwdpo.data.schema import DataError
    from megatron_pwdpo.platform.resilience import (
        EXIT_PREEMPTED,
        REQUEUE_FILE_VAR,
        exit_now,
        write_requeue_marker,
    )
    from megatron_pwdpo.training.loop import Preempted

    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    try:
        return args.func(args)
    except (ConfigError, DataError) as err:
        if rank == "0":
            print(f"megatron-pwdpo: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Preempted as stop:
        marker = os.environ.get(REQUEUE_FILE_VAR)
        if marker:
            # under slurm/common.sh: every rank exits 0 (srun --kill-on-bad-exit would
            # turn a first 75 into SIGKILL for the others); rank 0 leaves the marker
            # the batch script reads to requeue the job
            if rank == "0":
                write_requeue_marker(marker, str(stop))
                print(f"megatron-pwdpo: {stop}; requeue asked ({marker})", file=sys.stderr)
            return 0
        if rank == "0":
            print(
                f"megatron-pwdpo: {stop}; exit {EXIT_PREEMPTED} (requeue to resume)",
                file=sys.stderr,
            )
        return EXIT_PREEMPTED
    except Exception as err:
        # Name the failing rank, then leave at once: the other ranks are stopped by
        # torchrun/srun, or fail their next collective within timeout_s. No clean-up
        # collective here, as it could wait on a peer that is already gone.
        traceback.print_exc()
        print(
            f"megatron-pwdpo: rank {rank} failed: {type(err).__name__}: {err}",
            file=sys.stderr,
            flush=True,
        )
        exit_now(EXIT_FAILURE)


if __name__ == "__main__":
    sys.exit(main())
