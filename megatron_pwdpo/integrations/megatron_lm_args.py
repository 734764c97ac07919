"""What a megatron-pwdpo YAML means for Megatron-LM's ``pretrain()`` command line, and
what that path refuses (:mod:`megatron_pwdpo.integrations.megatron_lm` has the providers).

The YAML is the single source of truth: :func:`megatron_args` are the Megatron-LM
arguments it implies (the example's ``args_defaults``), :func:`contradictions` names every
parsed flag that differs, :func:`with_layout` builds the model for the flags' parallel
layout (a launch choice), and :func:`checkpoint_problems` refuses a ``--load`` that
Megatron-LM would silently replace with random weights.

Supported: ``sft``, ``pointwise_dpo``, ``ulma`` (whose demonstrations need no
reference: their ``ref_logps`` are NaN, as in ``megatron-pwdpo train``), ``dpo``,
``ipo`` and ``kto``, with ``loss.normalization=global_mean`` and no packing; the main
stage of a preference loss needs ``train.sft_steps=0``. :func:`unsupported` names everything
else, one line each, before any work is done.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megatron_pwdpo.config import ConfigError, RunConfig
from megatron_pwdpo.training.plan import Stage

STAGES = ("main", "sft")

SUPPORTED_LOSSES = ("sft", "pointwise_dpo", "ulma", "dpo", "ipo", "kto")
PAIRWISE = ("dpo", "ipo")  # an example is a (chosen, rejected) pair: 2 items
CACHED = ("pointwise_dpo", "ulma", *PAIRWISE)  # read precompute-ref's cache

_WHY_NOT = {
    "unlikelihood": "its per-token log(1 - p) terms are not wired into this path",
}


def unsupported(
    config: RunConfig, *, ref_cache: str | Path | None = None, stage: str = "main"
) -> list[str]:
    """What a run through Megatron-LM's ``pretrain()`` cannot do: one line each (empty
    when it can). Reads only the config, so it runs before any data or model work.

    Args:
        config: the megatron-pwdpo run config.
        ref_cache: the reference cache the run will read (``--pwdpo-ref-cache``), else
            ``reference.cache_path``.
        stage: ``main`` (``loss.name``) or ``sft`` (the SFT stage of a preference YAML).
    """
    loss, data = config.loss, config.data
    out = []
    if stage not in STAGES:
        return [f"stage {stage!r} is not one of {', '.join(STAGES)}"]
    has_sft_stage = loss.name != "sft" and config.train.sft_steps > 0
    if stage == "sft" and not has_sft_stage:
        out.append(
            f"--pwdpo-stage sft needs an SFT stage in the YAML (a preference loss with "
            f"train.sft_steps > 0), not loss.name={loss.name} with "
            f"train.sft_steps={config.train.sft_steps}"
        )
    if stage == "main" and loss.name not in SUPPORTED_LOSSES:
        out.append(
            f"loss.name={loss.name} is not supported in Megatron-LM's pretrain(): "
            f"{_WHY_NOT.get(loss.name, 'unknown loss')}; train it with megatron-pwdpo train "
            f"(supported here: {', '.join(SUPPORTED_LOSSES)})"
        )
    if stage == "main" and loss.normalization != "global_mean":
        out.append(
            f"loss.normalization={loss.normalization} is not supported in Megatron-LM's "
            "pretrain(): a row's weight there is 1 / global batch size, it cannot depend on "
            "the batch's class counts; set loss.normalization=global_mean"
        )
    if stage == "main" and has_sft_stage:
        out.append(
            f"train.sft_steps={config.train.sft_steps} is not supported in the main stage of "
            "Megatron-LM's pretrain(), which runs one stage: run the SFT stage first "
            "(--pwdpo-stage sft), precompute the reference from its checkpoint, then set "
            "train.sft_steps=0"
        )
    if data.packing != "none":
        out.append(
            f"data.packing={data.packing} is not supported in Megatron-LM's pretrain(): "
            "its items are one row each, padded to data.seq_length; set data.packing=none"
        )
    if stage == "main" and loss.name == "kto":
        if ref_cache is not None:
            out.append(
                "loss.name=kto reads no reference cache (its KL point needs the reference "
                "on each step's mismatched rows): drop --pwdpo-ref-cache; the reference is "
                "reference.checkpoint, else train.init_checkpoint, resident like the policy"
            )
        if not (config.reference.checkpoint or config.train.init_checkpoint):
            out.append(
                "loss.name=kto needs the reference model's weights: set "
                "reference.checkpoint (or train.init_checkpoint)"
            )
    if (
        stage == "main"
        and loss.name in CACHED
        and (ref_cache or config.reference.cache_path) is None
    ):
        out.append(
            f"loss.name={loss.name} needs the reference log-probs of megatron-pwdpo "
            "precompute-ref: pass --pwdpo-ref-cache FILE.npz (or set reference.cache_path)"
        )
    return out


def check_supported(
    config: RunConfig, *, ref_cache: str | Path | None = None, stage: str = "main"
) -> None:
    """Raise a ``ConfigError`` listing :func:`unsupported`'s lines, if any."""
    problems = unsupported(config, ref_cache=ref_cache, stage=stage)
    if problems:
        raise ConfigError("\n".join(problems))


def _tokenizer_type(config: RunConfig) -> str:
    return {"sentencepiece": "SentencePieceTokenizer", "hf": "HuggingFaceTokenizer"}[
        config.data.tokenizer_type
    ]


# Defaults only, never contradictions: how often to log, evaluate and save, how many
# held-out batches to evaluate, and the parallel layout (a launch choice: the model is
# built for the flags' layout, :func:`with_layout`).
FREE = "(a default only)"


def _layout_args(p) -> list[tuple[str, object]]:
    return [
        ("tensor_model_parallel_size", p.tensor_parallel),
        ("pipeline_model_parallel_size", p.pipeline_parallel),
        ("sequence_parallel", p.sequence_parallel),
    ]


def with_layout(config: RunConfig, args) -> RunConfig:
    """``config`` with the parallel layout of Megatron-LM's parsed flags (tensor, pipeline,
    virtual pipeline, sequence parallel): the layout the model is built for."""
    layout = dataclasses.replace(
        config.parallel,
        tensor_parallel=args.tensor_model_parallel_size,
        pipeline_parallel=args.pipeline_model_parallel_size,
        virtual_pipeline=getattr(args, "virtual_pipeline_model_parallel_size", None),
        sequence_parallel=bool(args.sequence_parallel),
    )
    return dataclasses.replace(config, parallel=layout)


def megatron_args(config: RunConfig, stage: Stage) -> list[tuple[str, object, str]]:
    """The Megatron-LM arguments the YAML implies, as ``(dest, value, YAML key)``: the
    model shape, sequence length, tokenizer, batch sizes, the stage's steps and
    learning-rate schedule, optimizer, seed, intervals, the held-out rows (as
    ``eval_iters`` whole global batches) and the parallel layout.

    ``dict((d, v) for d, v, _ in ...)`` is the example's ``args_defaults``.
    """
    m, p, t, d = config.model, config.parallel, config.train, config.data
    groups = m.num_query_groups or m.num_attention_heads
    sft = stage.loss.name == "sft" and config.loss.name != "sft"
    # Megatron-LM counts items (rows); a pair is two (see the module docstring)
    rows, per = (2, "2 x ") if stage.loss.name in PAIRWISE else (1, "")
    out = [
        ("num_layers", m.num_layers, "model.num_layers"),
        ("hidden_size", m.hidden_size, "model.hidden_size"),
        ("ffn_hidden_size", m.ffn_hidden_size, "model.ffn_hidden_size"),
        ("num_attention_heads", m.num_attention_heads, "model.num_attention_heads"),
        ("group_query_attention", groups != m.num_attention_heads, "model.num_query_groups"),
        ("num_query_groups", groups, "model.num_query_groups"),
        ("max_position_embeddings", m.max_seq_length, "model.max_seq_length"),
        ("position_embedding_type", "rope", "model (RoPE)"),
        ("rotary_base", m.rotary_base, "model.rotary_base"),
        ("normalization", "RMSNorm", "model (RMSNorm)"),
        ("swiglu", True, "model (SwiGLU)"),
        ("add_bias_linear", False, "model (no linear biases)"),
        ("add_qkv_bias", m.qkv_bias, "model.qkv_bias"),
        ("untie_embeddings_and_output_weights", m.untie_embeddings, "model.untie_embeddings"),
        ("init_method_std", m.init_method_std, "model.init_method_std"),
        ("seq_length", d.seq_length, "data.seq_length"),
        ("tokenizer_type", _tokenizer_type(config), "data.tokenizer_type"),
        ("tokenizer_model", str(d.tokenizer), "data.tokenizer"),
        ("micro_batch_size", rows * t.micro_batch_size, per + "train.micro_batch_size"),
        ("global_batch_size", rows * t.global_batch_size, per + "train.global_batch_size"),
        ("train_iters", stage.steps, "train.sft_steps" if sft else "train.steps"),
        ("lr", stage.lr, "train.sft_lr" if sft else "train.lr"),
        ("min_lr", t.min_lr, "train.min_lr"),
        ("lr_warmup_iters", min(t.warmup_steps, stage.steps), "train.warmup_steps"),
        ("lr_decay_style", "cosine", "train (cosine decay)"),
        ("weight_decay", t.weight_decay, "train.weight_decay"),
        ("adam_beta1", t.adam_beta1, "train.adam_beta1"),
        ("adam_beta2", t.adam_beta2, "train.adam_beta2"),
        ("clip_grad", t.clip_grad, "train.clip_grad"),
        ("seed", t.seed, "train.seed"),
        ("log_interval", t.log_interval, FREE),
        ("eval_interval", t.eval_interval, FREE),
        # the held-out rows, in whole global batches
        ("eval_iters", len(stage.eval_examples) // t.global_batch_size, FREE),
        *[(dest, value, FREE) for dest, value in _layout_args(p)],
        ("bf16", config.precision.dtype == "bf16", "precision.dtype (bf16)"),
    ]
    if m.kv_channels is not None:
        out.append(("kv_channels", m.kv_channels, "model.kv_channels"))
    if t.save_interval > 0:
        out.append(("save_interval", t.save_interval, FREE))
    return out


def contradictions(args, config: RunConfig, stage: Stage) -> list[str]:
    """Megatron-LM's parsed flags (``args``) that differ from the YAML, and settings this
    path refuses; one line each, e.g. ``--hidden-size 256 differs from the YAML's
    model.hidden_size=128``. An argument left unset (None) is not a contradiction: the
    YAML's value fills it (``args_defaults``). Intervals, ``--eval-iters`` and the
    parallel layout are defaults only (``FREE``): the flags choose them."""
    out = []
    for dest, ours, key in megatron_args(config, stage):
        theirs = getattr(args, dest, None)
        if key != FREE and theirs is not None and theirs != ours:
            out.append(f"--{dest.replace('_', '-')} {theirs} differs from the YAML's {key}={ours}")
    prec = config.precision
    fp8 = prec.fp8 is not None
    checks = [
        ("--fp16", "fp16", False, "precision.dtype (fp16 is not offered)"),
        ("--fp8-format", "fp8", prec.fp8_format if fp8 else None,
         "precision.fp8_format (with precision.fp8)"),
        ("--fp8-recipe", "fp8_recipe", prec.fp8, "precision.fp8"),
    ]  # fmt: skip
    for flag, dest, ours, key in checks:
        theirs = getattr(args, dest, None)
        if dest == "fp8_recipe" and not fp8:
            theirs = None  # Megatron-LM's recipe default means nothing without --fp8-format
        if dest == "fp16":
            theirs = bool(theirs)
        if theirs != ours:
            out.append(f"{flag} {theirs} differs from the YAML's {key}={ours}")
    cp = getattr(args, "context_parallel_size", 1) or 1
    if cp > 1:
        out.append(
            f"--context-parallel-size {cp} is not supported: Megatron-LM's schedule "
            "multiplies each micro-batch's loss by the CP size, and the plugin's sequence "
            "log-probs are not summed across CP ranks; use tensor/pipeline/data parallelism"
        )
    pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    if stage.loss.name == "kto" and pp > 1:
        out.append(
            f"--pipeline-model-parallel-size {pp} is not supported with loss.name=kto: its "
            "reference and KL passes run in the forward step, outside Megatron's pipeline "
            "schedule; use tensor/data parallelism (or megatron-pwdpo train)"
        )
    if getattr(args, "calculate_per_token_loss", False):
        out.append(
            "--calculate-per-token-loss is not supported: the plugin's loss is a mean over "
            "rows (each weighs 1 / global batch size), and Megatron-LM would divide it by "
            "the number of tokens instead; drop the flag"
        )
    return out


def checkpoint_problems(load: str | Path | None, *, save: str | Path | None = None) -> list[str]:
    """Why ``--load`` would start from random weights, one line each (empty: it loads).

    Megatron-LM only warns when the folder has no ``latest_checkpointed_iteration.txt``
    (with ``--exit-on-missing-checkpoint`` it exits with status 0) and trains from random
    weights; this refuses that, except for ``--load`` equal to ``--save`` (a first run
    that a later one resumes). A ``megatron-pwdpo train`` checkpoints folder carries the
    tracker (:data:`megatron_pwdpo.engine.checkpoint.MEGATRON_LM_TRACKER`).
    """
    from megatron_pwdpo.engine.checkpoint import MEGATRON_LM_TRACKER, iteration_name

    if load is None:
        return []
    load = Path(load)
    tracker = load / MEGATRON_LM_TRACKER
    if tracker.exists():
        text = tracker.read_text().strip()
        if text == "release" or (text.isdigit() and (load / iteration_name(int(text))).is_dir()):
            return []
        return [f"--load {load}: {MEGATRON_LM_TRACKER} names iteration {text!r}, not there"]
    if save is not None and Path(save).resolve() == load.resolve():
        return []
    if (load / "metadata.json").exists() and (load.parent / MEGATRON_LM_TRACKER).exists():
        return [f"--load {load} is one checkpoint: pass its folder, --load {load.parent}"]
    hint = ""
    if (load / "latest.txt").exists():
        hint = (
            " (a megatron-pwdpo train checkpoints folder from before the tracker: write "
            f"the iteration of its latest.txt into {tracker})"
        )
    return [f"--load {load} has no {MEGATRON_LM_TRACKER}: no checkpoint to load{hint}"]
