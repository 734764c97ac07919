"""Checks on a :class:`~megatron_pwdpo.config.schema.RunConfig`: values, their combinations and,
given the world size, the parallel layout. Each failure is one :class:`ConfigError` line
that names the key(s) and, where there is one, the fix; nothing here starts a process
group or touches a file, so a bad run stops before any expensive work.
"""

from __future__ import annotations

import math

from megatron_pwdpo.config.schema import ConfigError, RunConfig
from megatron_pwdpo.model.precision import check_supported
from megatron_pwdpo.platform import decisions as platform
from megatron_pwdpo.platform.decisions import Platform


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(
    config: RunConfig, *, world_size: int | None = None, on: Platform | None = None
) -> None:
    """Check values and their combinations; ``world_size`` adds the layout checks, ``on``
    the platform's (:func:`megatron_pwdpo.platform.decisions.refusal`; this machine's when None)."""
    m, p, t, d, loss = config.model, config.parallel, config.train, config.data, config.loss
    for key, value in [
        ("model.num_layers", m.num_layers),
        ("model.hidden_size", m.hidden_size),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.ffn_hidden_size", m.ffn_hidden_size),
        ("model.vocab_size", m.vocab_size),
        ("parallel.tensor_parallel", p.tensor_parallel),
        ("parallel.pipeline_parallel", p.pipeline_parallel),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.global_batch_size", t.global_batch_size),
        ("data.seq_length", d.seq_length),
        ("timeout_s", config.timeout_s),
    ]:
        _require(value > 0, f"{key}: must be positive, got {value}")
    for key, value in [
        ("train.steps", t.steps),
        ("train.sft_steps", t.sft_steps),
        ("train.warmup_steps", t.warmup_steps),
        ("train.save_interval", t.save_interval),
        ("data.eval_rows", d.eval_rows),
    ]:
        _require(value >= 0, f"{key}: must be >= 0, got {value}")
    _require(t.keep_checkpoints > 0, "train.keep_checkpoints: must be positive")
    _require(t.max_bad_steps_in_a_row > 0, "train.max_bad_steps_in_a_row: must be positive")
    _require(
        t.time_budget_s is None or t.time_budget_s > 0, "train.time_budget_s: must be positive"
    )
    _require(t.eval_interval > 0, f"train.eval_interval: must be positive, got {t.eval_interval}")
    _require(t.log_interval > 0, f"train.log_interval: must be positive, got {t.log_interval}")
    _require(loss.beta > 0, f"loss.beta: must be positive, got {loss.beta}")
    _require(t.lr > 0 and t.sft_lr > 0, "train.lr and train.sft_lr: must be positive")
    _require(0 <= loss.label_smoothing < 0.5, "loss.label_smoothing: must be in [0, 0.5)")
    _require(
        m.hidden_size % m.num_attention_heads == 0,
        f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads "
        f"({m.num_attention_heads})",
    )
    groups = m.num_query_groups or m.num_attention_heads
    _require(
        m.num_attention_heads % groups == 0,
        f"model.num_attention_heads ({m.num_attention_heads}) must be divisible by "
        f"model.num_query_groups ({groups})",
    )
    _require(
        groups % p.tensor_parallel == 0,
        f"model.num_query_groups ({groups}) must be divisible by parallel.tensor_parallel "
        f"({p.tensor_parallel})",
    )
    stages = p.pipeline_parallel * (p.virtual_pipeline or 1)
    _require(
        m.num_layers % stages == 0,
        f"model.num_layers ({m.num_layers}) must be divisible by pipeline_parallel x "
        f"virtual_pipeline ({stages})",
    )
    _require(
        d.seq_length <= m.max_seq_length,
        f"data.seq_length ({d.seq_length}) exceeds model.max_seq_length ({m.max_seq_length})",
    )
    _require(
        d.packing == "none" or not p.virtual_pipeline,
        f"data.packing={d.packing} with parallel.virtual_pipeline is not supported: the "
        "interleaved schedule needs a fixed number of micro-batches per step (a multiple "
        "of pipeline_parallel), and packed rows fill a data-dependent number; use one of "
        "them",
    )
    _require(
        p.logprob_chunk_size >= 0,
        f"parallel.logprob_chunk_size: must be >= 0, got {p.logprob_chunk_size}",
    )
    _require(
        not (p.logprob_chunk_size and p.sequence_parallel),
        "parallel.logprob_chunk_size with parallel.sequence_parallel is not supported yet "
        "(the output layer's input is sharded along the sequence): set one of them",
    )
    _require(
        not p.sequence_parallel or p.tensor_parallel > 1,
        "parallel.sequence_parallel needs parallel.tensor_parallel > 1",
    )
    multiple = platform.config_token_multiple(config)
    _require(
        d.seq_length % multiple == 0 or not (p.sequence_parallel or config.precision.fp8),
        f"data.seq_length ({d.seq_length}) must be a multiple of {multiple} with "
        f"parallel.sequence_parallel / precision.fp8 at tensor_parallel {p.tensor_parallel} "
        "(fixed-width micro-batches are split along the sequence over the tensor-parallel "
        "ranks, and FP8 GEMMs need aligned tokens per rank)",
    )
    unsupported = check_supported(config.precision) or platform.refusal(
        config, on or platform.detect()
    )
    _require(unsupported is None, str(unsupported))
    needs_ref = loss.name != "sft"
    _require(
        not needs_ref or config.reference.mode != "none",
        f"reference.mode: 'none' is only valid with loss.name=sft (got {loss.name})",
    )
    _validate_reference(config)
    pairwise = loss.name in ("dpo", "ipo")
    if pairwise:
        _require_pairs(loss.name, d)
    _require(
        loss.name != "ipo" or loss.logp_reduction == "mean",
        "loss.name=ipo regresses the margin onto 1/(2 beta), a scale set for mean-reduced "
        "log-probs (IPO, Azar et al. 2023): set loss.logp_reduction=mean",
    )
    _require(
        not pairwise or loss.normalization == "global_mean",
        f"loss.normalization=per_class is for point-wise losses, not {loss.name}",
    )
    _validate_data(d)
    if world_size is not None:
        model_parallel = p.tensor_parallel * p.pipeline_parallel
        _require(
            world_size % model_parallel == 0,
            f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel "
            f"({model_parallel})",
        )
        dp = world_size // model_parallel
        _require(
            t.global_batch_size % (t.micro_batch_size * dp) == 0,
            f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
            f"micro_batch_size x data-parallel size ({t.micro_batch_size} x {dp})",
        )
        micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
        _require(
            not p.virtual_pipeline or micro_batches % p.pipeline_parallel == 0,
            f"parallel.virtual_pipeline: the interleaved schedule needs a multiple of "
            f"pipeline_parallel ({p.pipeline_parallel}) micro-batches per step, got "
            f"{micro_batches} (global_batch_size / (micro_batch_size x data-parallel))",
        )


def _require_pairs(name: str, d) -> None:
    """``dpo``/``ipo`` need chosen/rejected pairs: refuse the sources that give none.

    ``pointwise`` and ``preprocessed`` rows may hold pairs (ids ``<pair>-c``/``-r``, as
    written from a paired source); ``training.plan.plan_stages`` refuses them when they do not.
    """
    need = f"loss.name={name} needs chosen/rejected pairs"
    _require(
        d.source != "red-team",
        f"{need}, and data.source=red-team has none (one transcript, one score): use a "
        "point-wise loss (pointwise_dpo, ulma, kto), or a paired source (hh-rlhf, golden-hh, "
        "qa-feedback with data.qa_mode=pairs, pairwise)",
    )
    _require(
        d.source not in ("hh-rlhf", "golden-hh") or d.hh_mode == "paired",
        f"{need}: data.hh_mode=unpaired keeps one response per prompt; set data.hh_mode=paired",
    )
    _require(
        d.source != "qa-feedback" or d.qa_mode == "pairs",
        f"{need}: data.source=qa-feedback with data.qa_mode=win_rate gives point-wise rows; "
        "set data.qa_mode=pairs",
    )


def _validate_data(d) -> None:
    """Source options: the declared red-team score range."""
    problem = score_range_problem(
        d.red_team_score_range,
        source=d.source,
        score=d.red_team_score,
        normalisation=d.red_team_normalisation,
    )
    _require(problem is None, f"data.red_team_score_range: {problem}")


def score_range_problem(
    value: object, *, source: str, score: str, normalisation: str
) -> str | None:
    """What is wrong with a declared red-team score range ``[low, high]`` (None: nothing;
    ``value`` None is no declared range). Shared by the config and ``preprocess``."""
    if value is None:
        return None
    if not (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        return f"expected [low, high] (two numbers) or null, got {value!r}"
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{[lo, hi]} must be finite"
    if not lo < hi:
        return f"low must be below high, got {[lo, hi]}"
    if (source, score, normalisation) != (
        "red-team",
        "min_harmlessness_score_transcript",
        "minmax",
    ):
        return (
            "applies only to the red-team source with the min_harmlessness_score_transcript "
            "score and minmax normalisation (rating has a fixed 0-4 scale)"
        )
    return None


def _validate_reference(config: RunConfig) -> None:
    ref, t, name = config.reference, config.train, config.loss.name
    if name == "sft":
        return
    sft_stage = t.sft_steps > 0
    _require(
        not (ref.checkpoint and sft_stage),
        "reference.checkpoint is set but train.sft_steps > 0 makes the SFT result the "
        "reference: set one of them",
    )
    if ref.mode != "cache":
        return
    _require(
        ref.cache_path is not None,
        "reference.mode=cache needs reference.cache_path (megatron-pwdpo precompute-ref --out)",
    )
    _require(
        not sft_stage,
        "reference.mode=cache needs a fixed reference, but train.sft_steps > 0 makes the "
        "SFT result the reference: train the SFT stage first, run precompute-ref from its "
        "checkpoint, then train with train.sft_steps=0 train.init_checkpoint=<it>",
    )
    _require(
        name != "kto",
        "reference.mode=cache cannot serve loss.name=kto (its KL point needs the reference "
        "on mismatched pairs made per batch): use reference.mode=resident or offload",
    )
    _require(
        bool(ref.checkpoint or t.init_checkpoint),
        "reference.mode=cache needs the reference's checkpoint: set reference.checkpoint or "
        "train.init_checkpoint (a random initialisation depends on the layout)",
    )
