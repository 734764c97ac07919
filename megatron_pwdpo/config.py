"""Typed run configuration, loaded from YAML and ``section.field=value`` overrides.

Everything is validated here, before any process group starts: a wrong value stops
the run with one line (:class:`ConfigError`) that names the key, never a traceback
from deep inside Megatron. Relative paths in a config file are resolved against the
file's own folder, so ``examples/tiny_cpu.yaml`` runs from any working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from megatron_pwdpo.model import ModelConfig, ParallelConfig
from megatron_pwdpo.precision import PrecisionConfig, check_supported


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the key."""


LossName = Literal["pointwise_dpo", "ulma", "dpo", "ipo", "kto", "sft"]


@dataclass(frozen=True)
class DataConfig:
    """Where rows come from and how they are tokenised.

    Attributes:
        source: ``hh-rlhf`` (Anthropic transcripts, converted on the fly), ``golden-hh``
            (same schema, chosen rows are demonstrations), ``red-team`` (red-team attempts,
            continuous labels), ``qa-feedback`` (FineGrainedRLHF), ``pointwise`` (canonical
            rows: id, prompt, response, label, kind) or ``preprocessed`` (the output
            prefix of ``megatron-pwdpo preprocess``).
        path: the data: a jsonl(.gz)/JSON/parquet file, a ``datasets`` folder, or the
            preprocessed prefix.
        split: the split of a ``datasets`` folder that holds several.
        hh_mode: for ``hh-rlhf``: ``paired`` keeps chosen and rejected of every pair,
            ``unpaired`` keeps one response per prompt (the truly point-wise setting).
        demo_chosen: for ``hh-rlhf``: chosen rows are demonstrations (``kind=demo``).
        tokenizer: a sentencepiece ``.model`` file, or a Hugging Face tokenizer folder.
        tokenizer_type: ``sentencepiece`` or ``hf`` (local folder; chat template if any).
        red_team_score: for ``red-team``: the field that becomes the label.
        red_team_normalisation: for ``red-team`` harmlessness scores: ``minmax`` over the
            file or ``logistic``.
        balance_classes: sample desirable and undesirable rows equally (the minority
            class is repeated; see ``GlobalBatchSampler``).
        seq_length: tokens per sequence (the prompt is left-truncated to fit).
        packing: ``none`` (one row per sequence, padded to the micro-batch's longest),
            or rows packed first-fit-decreasing into sequences of ``seq_length`` with
            attention that never crosses rows (RoPE is relative, so each row sees
            exactly what it would see alone; ``train.micro_batch_size`` then counts
            packed sequences): ``masked``, a block-diagonal causal mask, for the local
            layer spec (CPU; Transformer Engine's attention ignores such masks), or
            ``thd``, Megatron's ``PackedSeqParams`` with row boundaries (``cu_seqlens``)
            for Transformer Engine (GPU).
        eval_rows: rows held out from the end of the file for evaluation.
        eval_pairs: hold out whole pairs (both rows of a pair on the same side).
    """

    source: Literal[
        "hh-rlhf", "pointwise", "golden-hh", "red-team", "qa-feedback", "preprocessed"
    ] = "hh-rlhf"
    path: str = "data/hh_rlhf_harmless_base_test.jsonl.gz"
    split: str | None = None
    hh_mode: Literal["paired", "unpaired"] = "paired"
    demo_chosen: bool = True
    tokenizer: str = "data/tokenizer.model"
    tokenizer_type: Literal["sentencepiece", "hf"] = "sentencepiece"
    seq_length: int = 256
    eval_rows: int = 256
    red_team_score: Literal["min_harmlessness_score_transcript", "rating"] = (
        "min_harmlessness_score_transcript"
    )
    red_team_normalisation: Literal["minmax", "logistic"] = "minmax"
    balance_classes: bool = False
    packing: Literal["none", "masked", "thd"] = "none"


@dataclass(frozen=True)
class LossConfig:
    """Which loss (DESIGN.md §1) and its hyper-parameters.

    Attributes:
        name: the loss.
        beta: inverse temperature of the implicit reward ``r = beta (logp - ref_logp)``.
        mode: point-wise DPO variant, ``bce`` (binary/soft labels) or ``mse``.
        log_z: log-partition constant added to the reward.
        logp_reduction: ``sum`` or ``mean`` of token log-probs over the response.
        sft_weight: ULMA's weight of the demonstration (SFT) term.
        label_smoothing: cDPO's epsilon.
        desirable_weight: KTO's ``w_D``.
        undesirable_weight: KTO's ``w_U``.
        normalization: how per-row losses of a global batch are combined:
            ``global_mean`` (sum / rows, or / pairs for pairwise losses) or ``per_class``
            (mean over desirable rows + mean over undesirable rows, the ULMA reference
            code's reduction; rows split at label 0.5; point-wise losses only).
    """

    name: LossName = "pointwise_dpo"
    beta: float = 0.1
    mode: Literal["bce", "mse"] = "bce"
    log_z: float = 0.0
    logp_reduction: Literal["sum", "mean"] = "mean"
    sft_weight: float = 1.0
    label_smoothing: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    normalization: Literal["global_mean", "per_class"] = "global_mean"


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop.

    Attributes:
        steps: optimizer steps of the main stage.
        sft_steps: steps of an SFT stage on the demonstrations run first; its result is
            the starting policy and the frozen reference of the main stage (0 = none).
        micro_batch_size: rows per forward pass on one rank.
        global_batch_size: rows per optimizer step over all data-parallel ranks.
        lr: peak learning rate (cosine decay to ``min_lr`` after ``warmup_steps``).
        sft_lr: peak learning rate of the SFT stage.
        min_lr: final learning rate.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay.
        adam_beta1: Adam beta1.
        adam_beta2: Adam beta2.
        clip_grad: max global gradient norm.
        eval_interval: evaluate every this many steps (and at step 0 and the end).
        log_interval: log every this many steps.
        seed: seed of weights and data order.
        progress: show a progress bar on rank 0.
        save_interval: save a training checkpoint every this many steps (0 = only at the
            end of each stage); preemption saves at the next step boundary regardless.
        keep_checkpoints: keep the newest this many training checkpoints.
        time_budget_s: save and exit (code 75, to be requeued) once this many seconds
            have passed, at a step boundary; ``None`` = no budget.
        max_bad_steps_in_a_row: steps with a non-finite loss or gradient norm are
            skipped and counted; this many in a row stop the run.
        init_checkpoint: a torch_dist checkpoint (a run's ``checkpoints`` folder or one
            ``iter_N`` in it, or a converted Hugging Face model) loaded as the initial
            policy, at any TP/PP layout; ``None`` = random initialisation from ``seed``.
    """

    steps: int = 60
    sft_steps: int = 60
    micro_batch_size: int = 8
    global_batch_size: int = 16
    lr: float = 3e-4
    sft_lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    eval_interval: int = 20
    log_interval: int = 1
    seed: int = 1234
    progress: bool = True
    save_interval: int = 0
    keep_checkpoints: int = 3
    time_budget_s: float | None = None
    max_bad_steps_in_a_row: int = 5
    init_checkpoint: str | None = None


@dataclass(frozen=True)
class ReferenceConfig:
    """The frozen reference model.

    Attributes:
        mode: ``resident`` (a frozen copy with the policy's layout), ``offload`` (its
            weights in host memory, swapped into the policy for each reference pass),
            ``cache`` (per-row log-probs written by ``megatron-pwdpo precompute-ref``; no
            model) or ``none`` (SFT). See ``megatron_pwdpo/reference.py``.
        cache_path: the cache file of ``mode=cache``.
        checkpoint: the reference's weights when no SFT stage makes them (any layout);
            ``None`` = the policy at the start of the preference stage (with
            ``train.sft_steps=0``, ``train.init_checkpoint``).
    """

    mode: Literal["resident", "offload", "cache", "none"] = "resident"
    cache_path: str | None = None
    checkpoint: str | None = None


@dataclass(frozen=True)
class LoggingConfig:
    """Optional metric writers besides ``metrics.jsonl`` (rank 0; see ``observe.py``).

    Attributes:
        tensorboard: write TensorBoard events to ``<run_dir>/tensorboard`` (needs the
            ``tensorboard`` package).
        wandb: log to Weights & Biases (needs the ``wandb`` package).
        wandb_project: the W&B project.
        wandb_mode: ``offline`` (the default: files under ``<run_dir>/wandb``, no network;
            ``wandb sync`` uploads them later), ``online``, or ``disabled`` (no writer).
    """

    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "megatron-pwdpo"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"


@dataclass(frozen=True)
class RunConfig:
    """A whole run.

    Attributes:
        run_dir: where ``config.yaml``, ``metrics.jsonl`` and checkpoints go.
        timeout_s: process-group timeout: a hung collective fails after this long.
        resume: ``auto`` continues from the newest complete checkpoint in
            ``run_dir/checkpoints`` (a finished run has nothing left to do); ``never``
            refuses a run directory that already holds checkpoints.
    """

    run_dir: str = "runs/tiny"
    timeout_s: int = 300
    resume: Literal["auto", "never"] = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)


# --------------------------------------------------------------------------- loading


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


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Load a YAML file (or the defaults), apply overrides, validate.

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
        for section, key in _PATH_KEYS:
            value = tree.get(section, {}).get(key) if isinstance(tree.get(section), dict) else None
            if isinstance(value, str) and not Path(value).is_absolute():
                tree[section][key] = str((path.parent / value).resolve())
        if isinstance(tree.get("run_dir"), str) and not Path(tree["run_dir"]).is_absolute():
            tree["run_dir"] = str(Path.cwd() / tree["run_dir"])
    tree = _merge(tree, parse_overrides(list(overrides)))
    config = _build(RunConfig, tree, "")
    validate(config)
    return config


def to_dict(config: RunConfig) -> dict[str, Any]:
    """The config as plain data (what ``config.yaml`` in the run directory holds)."""
    return dataclasses.asdict(config)


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# --------------------------------------------------------------------------- checks


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(config: RunConfig, *, world_size: int | None = None) -> None:
    """Check values and their combinations; ``world_size`` adds the layout checks."""
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
        d.packing != "masked" or not torch.cuda.is_available(),
        "data.packing=masked needs the local layer spec (CPU); on GPU Transformer Engine "
        "ignores the block-diagonal mask: use data.packing=thd",
    )
    _require(
        d.packing != "thd" or _have_transformer_engine(),
        "data.packing=thd needs Transformer Engine on GPU (megatron-core's local layer "
        "spec refuses PackedSeqParams): use data.packing=masked on CPU",
    )
    _require(
        d.packing != "thd" or not p.virtual_pipeline,
        "data.packing=thd with parallel.virtual_pipeline is not supported (the interleaved "
        "schedule exchanges activations of one fixed shape): use one of them",
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
        not p.sequence_parallel or torch.cuda.is_available(),
        "parallel.sequence_parallel needs Transformer Engine on GPU (megatron-core's local "
        "layer spec, used on CPU, refuses it)",
    )
    _require(
        not p.sequence_parallel or p.tensor_parallel > 1,
        "parallel.sequence_parallel needs parallel.tensor_parallel > 1",
    )
    unsupported = check_supported(config.precision)
    _require(unsupported is None, str(unsupported))
    needs_ref = loss.name != "sft"
    _require(
        not needs_ref or config.reference.mode != "none",
        f"reference.mode: 'none' is only valid with loss.name=sft (got {loss.name})",
    )
    _validate_reference(config)
    pairwise = loss.name in ("dpo", "ipo")
    _require(
        not pairwise or (d.source == "hh-rlhf" and d.hh_mode == "paired"),
        f"loss.name={loss.name} needs pairs: data.source=hh-rlhf with data.hh_mode=paired",
    )
    _require(
        not pairwise or loss.normalization == "global_mean",
        f"loss.normalization=per_class is for point-wise losses, not {loss.name}",
    )
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


def _have_transformer_engine() -> bool:
    """CUDA and an importable Transformer Engine (what the TE layer spec needs)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except (ImportError, RuntimeError):
        return False
    return True


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
