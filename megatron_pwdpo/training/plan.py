"""What a run will do before it does it: its stages, and where it starts or resumes.

A run has up to two stages. With ``train.sft_steps > 0`` and a preference loss, an
SFT stage on the demonstrations comes first; its weights are the starting policy
and the frozen reference of the main stage (the usual SFT -> preference recipe, and
the paper's). The main stage optimises ``loss.name`` for ``train.steps`` steps.

Iterations count over the whole run (SFT steps, then main steps). With
``resume=auto`` a run continues from the newest complete checkpoint in
``run_dir/checkpoints``: stages that checkpoint finished are skipped, the stage it
was written in continues after its ``stage_step``, and ``metrics.jsonl`` loses the
lines logged after it (they are logged again). ``resume=never`` refuses a
``run_dir`` that holds checkpoints.

Everything here runs before any process group exists (only the file system and
the config are read), so a bad plan stops the run before it starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from megatron_pwdpo.config import ConfigError, LossConfig, RunConfig
from megatron_pwdpo.data.prepare import PreparedData
from megatron_pwdpo.engine import checkpoint
from megatron_pwdpo.engine.batches import Example, pair_up
from megatron_pwdpo.training.resume_check import check_resume_config


@dataclass
class Stage:
    """One optimisation stage: a loss, its examples (rows or pairs), length and LR."""

    index: int
    name: str
    loss: LossConfig
    examples: list[Example]
    eval_examples: list[Example]
    steps: int
    lr: float
    offset: int  # iterations of the stages before this one


def plan_stages(config: RunConfig, data: PreparedData) -> list[Stage]:
    """The SFT stage (if any) and the main stage, with their training examples.

    SFT trains on demonstrations only (all rows when none are marked, for
    ``loss.name=sft``), with token-mean log-probs; pairwise losses (``dpo``, ``ipo``)
    train on the rows paired up by prompt.

    Raises:
        ConfigError: ``train.sft_steps > 0`` without demonstrations, or a stage with
            no training examples.
    """
    t, loss = config.train, config.loss

    def demos(rows):
        return [r for r in rows if r.is_demo]

    plan = []
    if loss.name != "sft" and t.sft_steps > 0:
        if not demos(data.train):
            raise ConfigError(
                "train.sft_steps > 0 but the data has no demonstrations (rows with "
                f"kind=demo): set train.sft_steps=0{_demo_hint(config)}"
            )
        sft = replace(loss, name="sft", logp_reduction="mean", normalization="global_mean")
        plan.append(("sft", sft, demos(data.train), demos(data.eval), t.sft_steps, t.sft_lr))
    if loss.name == "sft":
        loss = replace(loss, logp_reduction="mean")
        train, held_out = demos(data.train) or data.train, demos(data.eval) or data.eval
    elif loss.name in ("dpo", "ipo"):
        train, held_out = pair_up(data.train), pair_up(data.eval)
        if not train:
            raise ConfigError(
                f"loss.name={loss.name} needs chosen/rejected pairs, but the training rows of "
                f"data.source={config.data.source} hold none (a pair is two rows with ids "
                "<pair>-c and <pair>-r, as hh-rlhf/golden-hh with data.hh_mode=paired, "
                "qa-feedback with data.qa_mode=pairs and pairwise write them): use a "
                "point-wise loss, or data from a paired source"
            )
    else:
        train, held_out = data.train, data.eval
    plan.append((loss.name, loss, train, held_out, t.steps, t.lr))
    stages, offset = [], 0
    for index, (name, stage_loss, examples, evals, steps, lr) in enumerate(plan):
        if not examples:
            raise ConfigError(f"stage '{name}' has no training examples")
        stages.append(Stage(index, name, stage_loss, examples, evals, steps, lr, offset))
        offset += steps
    return stages


def _demo_hint(config: RunConfig) -> str:
    """Where the data config itself could supply demonstrations, the key that does."""
    d = config.data
    if d.source in ("auto", "trl", "hh-rlhf", "pairwise") and not d.demo_chosen:
        return ", or data.demo_chosen=true (chosen responses become demonstrations)"
    if d.source == "pointwise":
        return ", or mark demonstrations with kind=demo in the rows"
    return ""


def check_init_checkpoint(config: RunConfig) -> None:
    """The initial checkpoint exists and was written for this model (RoPE, shapes...).

    Raises:
        ConfigError: ``train.init_checkpoint`` is missing or does not fit ``model``.
    """
    from megatron_pwdpo.convert import check_model_config

    try:
        checkpoint.resolve_checkpoint(config.train.init_checkpoint)
    except FileNotFoundError as err:
        raise ConfigError(f"train.init_checkpoint: {err}") from None
    check_model_config(config.model, config.train.init_checkpoint)


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from and its common state (``stage``,
    ``stage_step``, ``iteration``, ``skipped_steps``... as ``Runner._save`` writes it)."""

    path: Path
    common: dict
    changes: tuple[str, ...] = ()  # allowed config changes since the checkpoint (to log)

    @property
    def iteration(self) -> int:
        return self.common["iteration"]

    def finished(self, stage: Stage) -> bool:
        """Whether the checkpoint was written after ``stage`` ended (nothing left to do)."""
        saved = self.common["stage"]
        return stage.index < saved or (
            stage.index == saved and self.common["stage_step"] >= stage.steps
        )


def resume_point(config: RunConfig) -> ResumePoint | None:
    """The newest complete checkpoint in ``run_dir/checkpoints``; None for a fresh run.

    Raises:
        ConfigError: there are checkpoints and ``resume=never``, or ``config`` changes a
            field the checkpoint's run must keep (:mod:`~megatron_pwdpo.training.resume_check`).
    """
    root = Path(config.run_dir) / "checkpoints"
    latest = checkpoint.latest_checkpoint(root)
    if latest is None:
        return None
    if config.resume == "never":
        raise ConfigError(f"{root} holds checkpoints and resume=never: use a new run_dir")
    common = checkpoint.read_common(latest)
    changes = check_resume_config(common.get("config"), config, where=str(latest))
    return ResumePoint(latest, common, tuple(changes))


def stages_to_run(
    stages: list[Stage], resume: ResumePoint | None
) -> Iterator[tuple[Stage, Path | None]]:
    """The stages still to optimise, each with the checkpoint to continue it from
    (None: from its first step). Stages ``resume`` finished are left out."""
    for stage in stages:
        if resume is not None and resume.finished(stage):
            continue
        within = resume is not None and stage.index == resume.common["stage"]
        yield stage, resume.path if within else None


def trim_metrics(run_dir: Path, iteration: int) -> None:
    """Drop metrics.jsonl lines written after the checkpoint a run resumes from."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if json.loads(line).get("iteration", 0) <= iteration
    ]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def follow_checkpoint_optimizer(config: RunConfig, common: dict, *, path) -> RunConfig:
    """The config a resume from ``path`` runs with: its optimizer is the kind that wrote
    the checkpoint's optimizer state (megatron-core loads a distributed optimizer's state
    only into a distributed optimizer, and a plain one's only into a plain one).

    ``parallel.distributed_optimizer=auto`` follows the checkpoint (a run resumed at
    DP=1 from a DP=2 run keeps the distributed optimizer, which is correct at any DP);
    an explicit setting that contradicts it is refused in one line.
    """
    written = bool(common.get("distributed_optimizer", False))
    setting = config.parallel.distributed_optimizer
    if setting == "auto":
        parallel = replace(config.parallel, distributed_optimizer=written)
        return replace(config, parallel=parallel)
    if bool(setting) != written:
        kind = "the distributed optimizer" if written else "the plain (non-distributed) optimizer"
        raise ConfigError(
            f"{path} holds optimizer state of {kind}; parallel.distributed_optimizer="
            f"{str(setting).lower()} cannot resume it: set parallel.distributed_optimizer="
            f"{str(written).lower()} (or auto), or start a new run_dir"
        )
    return config
