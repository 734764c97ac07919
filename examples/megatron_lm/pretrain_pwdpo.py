"""Point-wise DPO, ULMA or SFT inside Megatron-LM's own training loop.

Run from a Megatron-LM checkout (``megatron.training`` is part of Megatron-LM, not of
megatron-core), with this package installed. For a preference loss, first write the
reference log-probs of every row with the same YAML (``train.sft_steps: 0`` and
``reference.checkpoint`` or ``train.init_checkpoint`` naming the reference):

    megatron-pwdpo precompute-ref --config my-run.yaml --out ref.npz
    torchrun --nproc-per-node 8 examples/megatron_lm/pretrain_pwdpo.py \\
        --pwdpo-config my-run.yaml --pwdpo-ref-cache ref.npz \\
        --tensor-model-parallel-size 4 --pipeline-model-parallel-size 2 \\
        --micro-batch-size 2 --global-batch-size 64 --seq-length 1024 \\
        --max-position-embeddings 1024 --train-iters 500 --lr 5e-7 ... (usual Megatron-LM flags)

Megatron-LM owns the loop (optimizer, schedule, checkpoints, logging); megatron-pwdpo
supplies the model, the data and the loss (see megatron_pwdpo/megatron_lm.py). The
model shape and data come from the megatron-pwdpo YAML; keep Megatron-LM's parallel and
batch flags consistent with it: the model provider stops unless the TP, PP, virtual
pipeline, sequence-parallel and ``--seq-length`` flags equal the YAML's.

Before Megatron-LM starts, every rank checks the YAML and the cache and stops with one
line per problem: losses other than ``sft``, ``pointwise_dpo`` and ``ulma`` (DPO/IPO need
pairs in a micro-batch, KTO a per-batch KL point), ``loss.normalization=per_class``,
``train.sft_steps > 0``, packing, class balancing, and a cache that is not this run's
(other reference checkpoint, model, tokenizer, ``data.seq_length`` or
``loss.logp_reduction``, rows missing or re-tokenised). ``--pwdpo-ref-cache`` defaults
to ``reference.cache_path``; ULMA's demonstrations need no reference.
"""

import argparse
import sys
from functools import partial

from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.training import get_args, pretrain

from megatron_pwdpo.config import ConfigError, load_config
from megatron_pwdpo.data.schema import DataError
from megatron_pwdpo.megatron_lm import build_datasets, make_forward_step, model_provider, prepare


def add_args(parser):
    group = parser.add_argument_group("megatron-pwdpo")
    group.add_argument("--pwdpo-config", required=True, help="megatron-pwdpo YAML")
    group.add_argument(
        "--pwdpo-ref-cache",
        default=None,
        help="the .npz of megatron-pwdpo precompute-ref (default: reference.cache_path)",
    )
    return parser


def check_flags(args, config):
    """Megatron-LM's flags that the YAML's model, precision and data must agree with."""
    p, d, prec = config.parallel, config.data, config.precision
    fp8 = prec.fp8 is not None
    pairs = [
        ("--tensor-model-parallel-size", args.tensor_model_parallel_size, p.tensor_parallel),
        ("--pipeline-model-parallel-size", args.pipeline_model_parallel_size, p.pipeline_parallel),
        (
            "--num-virtual-stages-per-pipeline-rank",
            getattr(args, "virtual_pipeline_model_parallel_size", None),
            p.virtual_pipeline,
        ),
        ("--sequence-parallel", bool(args.sequence_parallel), p.sequence_parallel),
        ("--seq-length", args.seq_length, d.seq_length),
        ("--bf16", bool(getattr(args, "bf16", False)), prec.dtype == "bf16"),
        ("--fp16", bool(getattr(args, "fp16", False)), False),
        ("--fp8-format", getattr(args, "fp8", None), prec.fp8_format if fp8 else None),
        ("--fp8-recipe", getattr(args, "fp8_recipe", None) if fp8 else None, prec.fp8),
    ]
    keys = [
        "parallel.tensor_parallel",
        "parallel.pipeline_parallel",
        "parallel.virtual_pipeline",
        "parallel.sequence_parallel",
        "data.seq_length",
        "precision.dtype (bf16)",
        "precision.dtype (fp16 is not offered)",
        "precision.fp8_format (with precision.fp8)",
        "precision.fp8",
    ]
    for (flag, theirs, ours), key in zip(pairs, keys, strict=True):
        if theirs != ours:
            raise ConfigError(f"{flag} {theirs} differs from the YAML's {key}={ours}")


def model_provider_checked(config):
    provide = model_provider(config)

    def checked(pre_process=True, post_process=True, vp_stage=None):
        check_flags(get_args(), config)  # before the model is built
        return provide(pre_process, post_process, vp_stage=vp_stage)

    return checked


def datasets_provider(num_samples, *, config, data, ref_logps):
    args = get_args()
    check_flags(args, config)
    train, valid = build_datasets(
        config, data, ref_logps, global_batch_size=args.global_batch_size, num_samples=num_samples
    )
    return train, valid, None


def forward_step(data_iterator, model, *, config):
    step = make_forward_step(
        config.loss,
        num_microbatches=get_num_microbatches(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
    )
    return step(data_iterator, model)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, _ = add_args(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)
    try:  # all checks (config, data, cache) before Megatron-LM builds anything
        config = load_config(ours.pwdpo_config)
        data, ref_logps = prepare(config, ref_cache=ours.pwdpo_ref_cache)
    except (ConfigError, DataError) as err:
        sys.exit("\n".join(f"pretrain_pwdpo.py: error: {line}" for line in str(err).splitlines()))
    datasets = partial(datasets_provider, config=config, data=data, ref_logps=ref_logps)
    datasets.is_distributed = True
    pretrain(
        datasets,
        model_provider_checked(config),
        ModelType.encoder_or_decoder,
        partial(forward_step, config=config),
        extra_args_provider=add_args,
    )


if __name__ == "__main__":
    main()
