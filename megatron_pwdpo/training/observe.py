"""What a run shows: ``metrics.jsonl`` (one object per step and per evaluation), a
progress bar with ETA and one readable log line per logged step, on rank 0 only; and,
when ``logging.tensorboard`` / ``logging.wandb`` ask for them, the same entries in
TensorBoard and Weights & Biases.

Every entry has ``stage``, ``step`` (within the stage), ``iteration`` (over the whole run)
and metric numbers; held-out entries also have ``"split": "eval"``. The writers get each
number as ``<stage>/<split>/<metric>`` (``split`` is ``train`` or ``eval``) at x =
``iteration``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from tqdm import tqdm

from megatron_pwdpo.config import ConfigError

if TYPE_CHECKING:
    from megatron_pwdpo.config import LoggingConfig, RunConfig


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _summary_writer_class():
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError(
            f"logging.tensorboard=true needs the tensorboard package ({err}): "
            "pip install 'megatron-pwdpo[tensorboard]' or set logging.tensorboard=false"
        ) from None
    return SummaryWriter


def _wandb_module():
    try:
        import wandb
    except ImportError as err:
        raise ConfigError(
            f"logging.wandb=true needs the wandb package ({err}): "
            "pip install wandb or set logging.wandb=false"
        ) from None
    return wandb


def _wants_wandb(logging: LoggingConfig) -> bool:
    return logging.wandb and logging.wandb_mode != "disabled"


def check_logging(config: RunConfig) -> None:
    """Fail early, with one line, if a writer ``config.logging`` asks for is missing.

    Called before any process group starts, on every rank (they share an environment).
    Imports nothing when no writer is enabled.
    """
    if config.logging.tensorboard:
        _summary_writer_class()
    if _wants_wandb(config.logging):
        _wandb_module()


def _scalars(entry: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """``<stage>/<split>/`` and the entry's finite numbers (not stage/split/step/iteration)."""
    prefix = f"{entry.get('stage', 'run')}/{entry.get('split', 'train')}/"
    values = {
        key: float(value)
        for key, value in entry.items()
        if key not in ("stage", "split", "step", "iteration")
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }
    return prefix, values


def _last_iteration(path: Path) -> int | None:
    """The largest ``iteration`` in an existing metrics.jsonl (a resumed run's start)."""
    if not path.exists():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            iteration = json.loads(line).get("iteration")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(iteration, int):
            last = iteration if last is None else max(last, iteration)
    return last


class _TensorBoardWriter:
    """Scalars under ``<run_dir>/tensorboard``, flushed after every entry (a preempted run
    loses nothing); on resume, events after the checkpoint are purged."""

    def __init__(self, run_dir: Path, resumed_at: int | None):
        writer_class = _summary_writer_class()
        purge = None if resumed_at is None else resumed_at + 1
        self._writer = writer_class(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def write(self, entry: dict[str, Any]) -> None:
        prefix, values = _scalars(entry)
        for key, value in values.items():
            self._writer.add_scalar(prefix + key, value, global_step=entry["iteration"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _WandbWriter:
    """One W&B run per process start, under ``<run_dir>/wandb``; offline unless
    ``logging.wandb_mode=online``."""

    def __init__(self, run_dir: Path, logging: LoggingConfig):
        if logging.wandb_mode == "offline":
            # belt and braces: whatever this wandb version's precedence of settings, an
            # offline run never reaches the network
            os.environ["WANDB_MODE"] = "offline"
        wandb = _wandb_module()
        config_file = run_dir / "config.yaml"
        run_config = yaml.safe_load(config_file.read_text()) if config_file.exists() else None
        self._run = wandb.init(
            project=logging.wandb_project,
            name=run_dir.name,
            dir=str(run_dir),
            mode=logging.wandb_mode,
            config=run_config,
        )

    def write(self, entry: dict[str, Any]) -> None:
        prefix, values = _scalars(entry)
        if values:
            self._run.log(
                {prefix + key: value for key, value in values.items()}, step=entry["iteration"]
            )

    def close(self) -> None:
        self._run.finish()


def final_summary(
    *,
    stages: list[tuple[str, int]],
    wall_s: float,
    held_out: dict[str, Any],
    checkpoint: Path | None,
    metrics: Path,
) -> str:
    """The lines a run ends with: steps per stage, wall time, the last held-out metrics,
    and where the checkpoint and the metrics are."""
    steps = ", ".join(f"{name} {n}" for name, n in stages)
    total = sum(n for _, n in stages)
    lines = [f"done: {total} steps ({steps}) in {wall_s:.1f} s"]
    if held_out:
        lines.append("held-out: " + " | ".join(f"{k} {_fmt(v)}" for k, v in held_out.items()))
    lines.append(f"checkpoint: {checkpoint if checkpoint is not None else '(none)'}")
    lines.append(f"metrics: {metrics}")
    return "\n".join(lines)


class RunLog:
    """Rank-0 writer of ``<run_dir>/metrics.jsonl`` and the console.

    Args:
        run_dir: the run directory (created by the caller).
        enabled: False on ranks other than 0 (every call is then a no-op).
        progress: draw a progress bar.
        logging: the optional TensorBoard / W&B writers (``None``: metrics.jsonl only).
            A missing package raises :class:`ConfigError` (``check_logging`` says so
            before training starts).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        progress: bool,
        logging: LoggingConfig | None = None,
    ):
        self.enabled = enabled
        self.progress = progress and enabled and sys.stderr.isatty()
        self._writers: list[_TensorBoardWriter | _WandbWriter] = []
        if enabled and logging is not None:
            if logging.tensorboard:
                resumed_at = _last_iteration(run_dir / "metrics.jsonl")
                self._writers.append(_TensorBoardWriter(run_dir, resumed_at))
            if _wants_wandb(logging):
                self._writers.append(_WandbWriter(run_dir, logging))
        self._file = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self._bar: tqdm | None = None

    check_logging = staticmethod(check_logging)  # train() calls it before any group starts

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def start_stage(self, name: str, steps: int) -> None:
        if self.progress:
            self._bar = tqdm(total=steps, desc=name, dynamic_ncols=True, leave=False)

    def end_stage(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def record(self, entry: dict[str, Any], *, show: bool = True, advance: bool = False) -> None:
        """Append ``entry`` to metrics.jsonl; print it if ``show``; tick the bar."""
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in entry.items()
        }
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        for writer in self._writers:
            writer.write(entry)
        if advance and self._bar is not None:
            self._bar.update(1)
            if "loss" in entry:
                self._bar.set_postfix(loss=f"{entry['loss']:.4f}")
        if show:
            head = f"[{entry.get('stage', '')}] {entry.get('split', 'train')} step {entry['step']}"
            body = " | ".join(
                f"{k} {_fmt(v)}" for k, v in entry.items() if k not in ("stage", "split", "step")
            )
            self.info(f"{head} | {body}")

    def close(self) -> None:
        self.end_stage()
        for writer in self._writers:
            writer.close()
        self._writers = []
        if self._file is not None:
            self._file.close()
