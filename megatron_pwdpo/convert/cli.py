"""``megatron-pwdpo convert hf-to-mcore | mcore-to-hf``.

    megatron-pwdpo convert hf-to-mcore --hf HF_DIR --out CKPT_DIR [--tp N] [--pp N]
    megatron-pwdpo convert mcore-to-hf --ckpt CKPT_OR_RUN_DIR --out HF_DIR [--hf-like HF_DIR]

Both run in one process (or under torchrun, as data-parallel replicas of the full model).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from megatron_pwdpo.convert.table import ConversionError


def _in_world(timeout_s: int, fn: Callable[[], object]) -> int:
    """Run ``fn`` with Megatron's state initialised at TP=1, PP=1, on the CPU (gloo) even
    where a GPU is visible: the converters hold the model in host memory."""
    from megatron_pwdpo.platform import cpu_bridge, distributed

    distributed.init_distributed(
        tensor_parallel=1,
        pipeline_parallel=1,
        virtual_pipeline=None,
        timeout_s=timeout_s,
        cpu=True,
    )
    try:
        cpu_bridge.manual_seed(0)
        fn()
    finally:
        distributed.shutdown()
    return 0


def _hf_to_mcore(args: argparse.Namespace) -> int:
    from megatron_pwdpo.convert import hf_to_mcore as h
    from megatron_pwdpo.model.build import ParallelConfig

    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp)
    # fail on an unsupported model or layout before Megatron starts
    h.check_layout(h.model_config_from_hf(h.read_hf_config(args.hf)), parallel)
    return _in_world(args.timeout_s, lambda: h.hf_to_mcore(args.hf, args.out, parallel=parallel))


def _mcore_to_hf(args: argparse.Namespace) -> int:
    from megatron_pwdpo.convert.mcore_to_hf import mcore_to_hf

    return _in_world(
        args.timeout_s,
        lambda: mcore_to_hf(args.ckpt, args.out, hf_like=args.hf_like, dtype=args.dtype),
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``convert`` (with ``hf-to-mcore`` and ``mcore-to-hf``) to the CLI.

    A :class:`ConversionError` is a ``ConfigError``: ``main`` reports it in one line.
    """
    convert = subparsers.add_parser("convert", help="Hugging Face <-> Megatron checkpoints")
    sub = convert.add_subparsers(dest="convert_command", required=True)

    to_mcore = sub.add_parser("hf-to-mcore", help="Hugging Face folder -> torch_dist checkpoint")
    to_mcore.add_argument("--hf", required=True, help="folder with config.json + safetensors")
    to_mcore.add_argument("--out", required=True, help="checkpoint folder to write")
    to_mcore.add_argument("--tp", type=int, default=1, help="target TP (checked; any loads)")
    to_mcore.add_argument("--pp", type=int, default=1, help="target PP (checked; any loads)")
    to_mcore.add_argument("--timeout-s", type=int, default=600)
    to_mcore.set_defaults(func=_hf_to_mcore)

    to_hf = sub.add_parser("mcore-to-hf", help="torch_dist checkpoint -> Hugging Face folder")
    to_hf.add_argument("--ckpt", required=True, help="checkpoint root, run dir or iter_N dir")
    to_hf.add_argument("--out", required=True, help="Hugging Face folder to write")
    to_hf.add_argument("--hf-like", default=None, help="take config.json/tokenizer from here")
    to_hf.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    to_hf.add_argument("--timeout-s", type=int, default=600)
    to_hf.set_defaults(func=_mcore_to_hf)


__all__ = ["ConversionError", "register"]
