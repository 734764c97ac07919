"""The typed run configuration: one dataclass per YAML section, and :class:`ConfigError`.

Loading (YAML, ``section.field=value`` overrides, relative paths) is
:mod:`megatron_pwdpo.config.load`; the checks on values and their combinations are
:mod:`megatron_pwdpo.config.validation`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_pwdpo.model.build import ModelConfig, ParallelConfig
from megatron_pwdpo.model.precision import PrecisionConfig


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the key."""


LossName = Literal["pointwise_dpo", "ulma", "dpo", "ipo", "kto", "sft", "unlikelihood"]


@dataclass(frozen=True)
class DataConfig:
    """Where rows come from and how they are tokenised.

    Attributes:
        source: ``auto`` (detected from the first record's fields; see
            ``megatron_pwdpo.data.loading``), ``trl`` (Hugging Face TRL's preference
            formats, text or conversational: prompt/completion/label with a bool or [0, 1]
            label, prompt/chosen/rejected, or chosen/rejected with an implicit prompt),
            ``hh-rlhf`` (Anthropic transcripts, converted on the fly), ``golden-hh``
            (same schema, chosen rows are demonstrations), ``red-team`` (red-team attempts,
            continuous labels), ``qa-feedback`` (FineGrainedRLHF), ``pointwise`` (canonical
            rows: prompt, response, label, optional id and kind), ``pairwise`` (generic
            pairs: prompt, chosen, rejected, optional id) or ``preprocessed`` (the output
            prefix of ``megatron-pwdpo preprocess``). Pairs become two rows, ``<id>-c``
            (label 1) and ``<id>-r`` (label 0), which ``dpo``/``ipo`` pair up again. Rows
            without an id get ``trl-{index:06d}`` (``row-{index:06d}`` for ``pointwise``)
            from their 0-based position in the file.
        path: the data: a jsonl(.gz)/JSON/parquet file, a ``datasets`` folder, a Hub
            dataset ``hf:OWNER/NAME``, or the preprocessed prefix.
        split: the split of a ``datasets`` folder that holds several; ``None`` = its only
            split (``train`` for a Hub dataset).
        hh_mode: for ``hh-rlhf`` and ``golden-hh``: ``paired`` keeps chosen and rejected
            of every pair, ``unpaired`` keeps one response per prompt (the truly
            point-wise setting; a fair coin per pair drawn from ``unpaired_seed``).
        unpaired_seed: seed of ``hh_mode=unpaired``'s pick (0 by default; another seed
            keeps the other response of about half the pairs).
        demo_chosen: for ``hh-rlhf``, ``pairwise`` and ``trl``: chosen rows, and rows
            labelled 1 (``true``) that carry no ``kind`` of their own (``trl``,
            ``pointwise``), are demonstrations (``kind=demo``, trained by ULMA's SFT term).
        qa_mode: for ``qa-feedback``: ``win_rate`` (each prediction one row labelled with
            its win rate) or ``pairs`` (each non-tied comparison a chosen/rejected pair,
            what ``dpo``/``ipo`` need); both keep gold and corrected answers as
            demonstrations.
        tokenizer: a sentencepiece ``.model`` file, or a Hugging Face tokenizer folder.
        tokenizer_type: ``sentencepiece`` or ``hf`` (local folder; chat template if any).
        red_team_score: for ``red-team``: the field of each attempt that becomes the
            label.
        red_team_normalisation: for ``red-team`` harmlessness scores: ``minmax`` or
            ``logistic``.
        red_team_score_range: ``[lo, hi]``, the declared range of ``minmax``: label =
            ``(score - lo) / (hi - lo)`` clipped to [0, 1], the same scale for every file
            and split; ``None`` = each file's own minimum and maximum.
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
        eval_rows: rows held out from the end of the file for evaluation, moved back to
            the start of a run of rows sharing one prompt, so both rows of a pair (and
            all rows of a QA item) are on the same side.
    """

    source: Literal[
        "auto",
        "trl",
        "hh-rlhf",
        "pointwise",
        "golden-hh",
        "red-team",
        "qa-feedback",
        "pairwise",
        "preprocessed",
    ] = "auto"
    path: str = "data/hh_rlhf_harmless_base_test.jsonl.gz"
    split: str | None = None
    hh_mode: Literal["paired", "unpaired"] = "paired"
    unpaired_seed: int = 0
    demo_chosen: bool = True
    qa_mode: Literal["win_rate", "pairs"] = "win_rate"
    tokenizer: str = "data/tokenizer.model"
    tokenizer_type: Literal["sentencepiece", "hf"] = "sentencepiece"
    seq_length: int = 256
    eval_rows: int = 256
    red_team_score: Literal["min_harmlessness_score_transcript", "rating"] = (
        "min_harmlessness_score_transcript"
    )
    red_team_normalisation: Literal["minmax", "logistic"] = "minmax"
    red_team_score_range: list[float] | None = None
    balance_classes: bool = False
    packing: Literal["none", "masked", "thd"] = "none"


@dataclass(frozen=True)
class LossConfig:
    """Which loss (DESIGN.md §1) and its hyper-parameters.

    Attributes:
        name: the loss: ``pointwise_dpo`` (point-wise DPO on rows labelled in [0, 1]),
            ``ulma`` (maximum likelihood on demonstrations, point-wise DPO on the other
            rows), ``dpo`` or ``ipo`` (pairwise; need chosen/rejected pairs), ``kto``,
            ``sft`` (maximum likelihood only; no reference model), or ``unlikelihood``
            (maximum likelihood on desirable rows, ``log(1 - p)`` of every token of the
            undesirable ones; the reference only feeds the logged reward metrics).
        beta: inverse temperature of the implicit reward ``r = beta (logp - ref_logp)``.
        mode: ``pointwise_dpo`` variant: ``bce`` (binary/soft labels, cross-entropy) or
            ``mse`` (the reward regressed on the label, every row: this project's
            extension); ``ulma`` variant: ``bce`` (the paper's) or ``mse`` (the ULMA
            authors' continuous hybrid: ``(z - r)^2`` only on rows whose label is not 1,
            the SFT term on label-1 rows).
        log_z: log-partition constant added to the reward (``pointwise_dpo``, ``ulma``).
        logp_reduction: ``sum`` or ``mean`` of token log-probs over the response.
        sft_weight: ULMA's weight of the demonstration (SFT) term.
        label_smoothing: cDPO's epsilon for ``dpo``, in [0, 0.5) (0 = plain DPO).
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
            model) or ``none`` (SFT). See ``megatron_pwdpo/reference/strategies.py``.
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
        timeout_s: process-group timeout in seconds: a hung collective fails after this
            long.
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
