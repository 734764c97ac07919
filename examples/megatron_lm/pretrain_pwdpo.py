"""Point-wise DPO, ULMA, DPO, IPO, KTO or SFT in Megatron-LM's own loop (``pretrain()``).

Run with Megatron-LM's ``megatron/training`` on the path (``megatron.training`` is part of
Megatron-LM, not of the megatron-core wheel; tested with Megatron-LM ``core_v0.16.1`` and
``core_v0.19.0``) and this package installed. For a preference loss (but KTO, below),
first write the reference log-probs
of every row with the same YAML (``train.sft_steps: 0`` and ``reference.checkpoint`` or
``train.init_checkpoint`` naming the reference)::

    megatron-pwdpo precompute-ref --config my-run.yaml --out ref.npz
    torchrun --nproc-per-node 8 examples/megatron_lm/pretrain_pwdpo.py \\
        --pwdpo-config my-run.yaml --pwdpo-ref-cache ref.npz \\
        --tensor-model-parallel-size 4 --pipeline-model-parallel-size 2 \\
        --save ckpts --load ckpts

The YAML is the single source of truth: the model shape, sequence length, tokenizer,
batch sizes, steps, learning-rate schedule, optimizer, seed and intervals become
Megatron-LM's defaults (``args_defaults``), so the command needs only the YAML and the
launch, parallel and checkpoint flags. A Megatron-LM flag that contradicts the YAML
stops the run with one line naming both values, as do ``--context-parallel-size`` > 1
and ``--calculate-per-token-loss`` (see
``megatron_pwdpo.integrations.megatron_lm_args.contradictions``).
The parallel flags (tensor, pipeline, virtual pipeline, sequence parallel) choose the
layout; the YAML's ``parallel`` section is only their default.

KTO reads no cache: its reference (``reference.checkpoint``, else
``train.init_checkpoint``) is built like the policy and runs, with the KL point, in the
forward step (``megatron_pwdpo.integrations.megatron_lm_kto``); it needs
``--pipeline-model-parallel-size 1``.

With ``dpo`` or ``ipo`` Megatron-LM's batch sizes count rows, two per pair: its
``--micro-batch-size`` and ``--global-batch-size`` are twice the YAML's (the defaults
say so; another value is refused).

``--pwdpo-stage sft`` trains the SFT stage of a preference YAML (``train.sft_steps > 0``):
the demonstrations with token-mean log-probs, as ``megatron-pwdpo train``'s SFT stage.

Before Megatron-LM starts, every rank checks the YAML, the data, the cache and ``--load``
and stops with one line per problem (see
``megatron_pwdpo.integrations.megatron_lm_args.unsupported``).
``--load DIR`` must hold Megatron-LM's ``latest_checkpointed_iteration.txt`` (a
``megatron-pwdpo train`` run's ``checkpoints`` folder does; load it with ``--finetune
--no-load-optim --no-load-rng``); only ``--load`` equal to ``--save`` may be empty (a
first run that resumes itself later). Megatron-LM would start from random weights.

Megatron-LM owns the loop (optimizer, schedule, checkpoints, logging); megatron-pwdpo
supplies the model, the data and the loss. Every metric of the loss (rewards and
log-ratios, negative ones included) goes to Megatron-LM's TensorBoard / W&B writers and,
at each ``--log-interval``, to a ``megatron-pwdpo | iteration N | ...`` line of the text
log (Megatron-LM's own line drops values that are not > 0). Megatron's C++ dataset
helpers are not compiled (a pip megatron-core has no Makefile for them; these datasets
need none). Without CUDA, ``cpu_training_bridge.py`` (next to this file) runs the loop on
the CPU over gloo.
"""

import argparse
import functools
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.training import get_args

from megatron_pwdpo.config import ConfigError, load_config
from megatron_pwdpo.data.schema import DataError
from megatron_pwdpo.integrations.megatron_lm import (
    build_datasets,
    make_forward_step,
    model_provider,
    prepare,
)
from megatron_pwdpo.integrations.megatron_lm_args import (
    STAGES,
    checkpoint_problems,
    contradictions,
    megatron_args,
    with_layout,
)
from megatron_pwdpo.platform import compat


def add_args(parser, *, run=None):
    """Our flags; with ``run`` (``(config, stage)``), also the YAML's values as the
    defaults of Megatron-LM flags whose own default is not None, and a check of every
    parsed flag against the YAML before Megatron-LM does anything with them."""
    group = parser.add_argument_group("megatron-pwdpo")
    group.add_argument("--pwdpo-config", required=True, help="megatron-pwdpo YAML")
    group.add_argument(
        "--pwdpo-ref-cache",
        default=None,
        help="the .npz of megatron-pwdpo precompute-ref (default: reference.cache_path)",
    )
    group.add_argument(
        "--pwdpo-stage",
        choices=STAGES,
        default="main",
        help="main: loss.name; sft: the SFT stage of a preference YAML (train.sft_steps > 0)",
    )
    if run is None:
        return parser
    config, stage = run
    ours = {dest: value for dest, value, _ in megatron_args(config, stage)}
    parser.set_defaults(**{k: v for k, v in ours.items() if parser.get_default(k) is not None})
    # an item is one pre-tokenised row: no data-loader worker processes needed
    parser.set_defaults(num_workers=0)
    parse = parser.parse_args

    def parse_and_check(*args, **kwargs):
        parsed = parse(*args, **kwargs)
        _exit_on(contradictions(parsed, config, stage))
        return parsed

    parser.parse_args = parse_and_check
    return parser


def _exit_on(problems):
    if problems:
        sys.exit("\n".join(f"pretrain_pwdpo.py: error: {line}" for line in problems))


def load_problems(argv):
    """``--load`` that would start from random weights (``checkpoint_problems``)."""
    flags = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    flags.add_argument("--load")
    flags.add_argument("--save")
    known, _ = flags.parse_known_args(argv)
    return checkpoint_problems(known.load, save=known.save)


def provide_model(*args, run, **kwargs):
    """The model provider (``run``: the YAML's config), for the layout of the flags;
    Megatron-LM 0.16 adds its own ``config=`` and ``pg_collection=`` keywords."""
    return model_provider(with_layout(run, get_args()))(*args, **kwargs)


def datasets_provider(num_samples, vp_stage=None, *, config, data, ref_logps, stage):
    del vp_stage  # every virtual stage reads the same rows
    train, valid = build_datasets(
        config,
        data,
        ref_logps,
        global_batch_size=config.train.global_batch_size,  # examples: rows or pairs
        num_samples=num_samples,
        stage=stage,
    )
    return train, valid, None


def _num_microbatches(training: bool) -> int:
    """Micro-batches per data-parallel rank of a training iteration or of one
    evaluation iteration (Megatron-LM 0.19 may evaluate with its own batch size)."""
    if training:
        return get_num_microbatches()
    args = get_args()
    evaluated = getattr(args, "eval_global_batch_size", None) or args.global_batch_size
    return evaluated // (args.micro_batch_size * args.data_parallel_size)


def kto_forward_step(config):
    """KTO's forward step: the reference and the KL point run in it (PP=1)."""
    from megatron_pwdpo.integrations.megatron_lm_kto import KtoForwardStep

    return KtoForwardStep(
        lambda: with_layout(config, get_args()),
        num_microbatches=_num_microbatches,
        data_parallel_group=parallel_state.get_data_parallel_group,
    )


def forward_step(data_iterator, model, *, stage):
    step = make_forward_step(
        stage.loss,
        num_microbatches=get_num_microbatches(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
    )
    return step(data_iterator, model)


def log_every_metric(training_log):
    """Wrap Megatron-LM's ``training_log``: after its line, the last rank prints every
    metric of the iteration (negative ones too) and the gradient norm in full precision."""

    @functools.wraps(training_log)
    def logged(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs):
        out = training_log(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs)
        # (loss_scale, report_memory_flag, skipped_iter, grad_norm, ...) in 0.16
        grad_norm = rest[3] if len(rest) > 3 else kwargs.get("grad_norm")
        last = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
        due = iteration % get_args().log_interval == 0 or kwargs.get("is_first_iteration")
        if last and loss_dict and due:
            fields = [f"{k} {float(v):.9g}" for k, v in loss_dict.items()]
            if grad_norm is not None:
                fields.append(f"grad_norm {float(grad_norm):.9g}")
            line = " | ".join([f"megatron-pwdpo | iteration {iteration}", *fields])
            # one write: print() writes the text and its newline apart, so under
            # PYTHONUNBUFFERED another rank's line (the memory report) could land inside it
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        return out

    return logged


def _skip_dataset_helpers():
    """Megatron-LM compiles its C++ dataset helpers with ``make`` in megatron-core's
    folder, which a pip install lacks the Makefile for; these datasets use none."""
    from megatron.core.datasets import utils

    utils.compile_helpers = lambda: print("> megatron-pwdpo: no dataset helpers needed")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, _ = add_args(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)
    try:  # all checks (config, data, cache, --load) before Megatron-LM builds anything
        config = load_config(ours.pwdpo_config)
        _exit_on(load_problems(argv))
        data, ref_logps, stage = prepare(
            config, ref_cache=ours.pwdpo_ref_cache, stage=ours.pwdpo_stage
        )
    except (ConfigError, DataError) as err:
        _exit_on(str(err).splitlines())
    if not torch.cuda.is_available():
        sys.path.insert(0, str(Path(__file__).parent))
        import cpu_training_bridge

        cpu_training_bridge.install()
    _skip_dataset_helpers()
    from megatron.training import training

    if not hasattr(training.training_log, "__wrapped__"):
        training.training_log = log_every_metric(training.training_log)
    datasets = functools.partial(
        datasets_provider, config=config, data=data, ref_logps=ref_logps, stage=stage
    )
    datasets.is_distributed = True
    step = functools.partial(forward_step, stage=stage)
    if stage.loss.name == "kto":
        step = kto_forward_step(config)
    sys.argv = [sys.argv[0], *argv]  # Megatron-LM parses sys.argv
    # Megatron-LM's pretrain() changed its call in core_v0.19.0 (a config container)
    compat.pretrain(
        datasets,
        functools.partial(provide_model, run=config),
        ModelType.encoder_or_decoder,
        step,
        extra_args_provider=functools.partial(add_args, run=(config, stage)),
        args_defaults={dest: value for dest, value, _ in megatron_args(config, stage)},
    )


if __name__ == "__main__":
    main()
