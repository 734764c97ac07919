"""Training checkpoints as the loop writes them: the metadata a resume reads back
(:func:`megatron_pwdpo.training.plan.resume_point`), and the longest save so far, which the
time budget keeps in reserve across requeues."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from megatron_pwdpo.config import RunConfig, dump_yaml
from megatron_pwdpo.engine import checkpoint
from megatron_pwdpo.training.plan import Stage


def save_training_checkpoint(
    policy: list,
    ckpt_root: Path,
    *,
    config: RunConfig,
    stage: Stage,
    step: int,
    optimizer,
    scheduler,
    skipped_steps: int,
    before_commit: Callable[[], None] | None = None,
) -> Path:
    """Save the policy, optimizer and LR schedule at ``step`` of ``stage`` (iteration
    ``stage.offset + step``), keeping the newest ``train.keep_checkpoints``."""
    iteration = stage.offset + step
    common = {
        "config": dump_yaml(config),
        "stage": stage.index,
        "stage_name": stage.name,
        "stage_step": step,
        "iteration": iteration,
        "scheduler": scheduler.state_dict(),
        "layout": checkpoint.layout(),
        "skipped_steps": skipped_steps,
        # the optimizer state's format: a resume builds the same optimizer
        "distributed_optimizer": policy[0].ddp_config.use_distributed_optimizer,
    }
    return checkpoint.save_checkpoint(
        policy,
        ckpt_root,
        iteration=iteration,
        common=common,
        optimizer=optimizer,
        keep=config.train.keep_checkpoints,
        before_commit=before_commit,
    )


def save_untrained(policy: list, ckpt_root: Path, *, config: RunConfig, stage: Stage) -> None:
    """A run of zero steps saves its starting policy as iteration 0 (e.g. to turn an
    initial checkpoint into a run directory), with no optimizer state."""
    checkpoint.save_checkpoint(
        policy,
        ckpt_root,
        iteration=0,
        common={
            "config": dump_yaml(config),
            "stage": stage.index,
            "stage_step": 0,
            "iteration": 0,
            "layout": checkpoint.layout(),
        },
    )


SAVE_SECONDS_FILE = "save_seconds.txt"  # the longest save so far, kept over requeues


def read_save_seconds(ckpt_root: Path) -> float:
    try:
        return float((ckpt_root / SAVE_SECONDS_FILE).read_text())
    except (OSError, ValueError):
        return 0.0


def write_save_seconds(ckpt_root: Path, seconds: float) -> None:
    tmp = ckpt_root / f"{SAVE_SECONDS_FILE}.tmp"
    tmp.write_text(f"{seconds:.3f}\n")
    tmp.replace(ckpt_root / SAVE_SECONDS_FILE)
