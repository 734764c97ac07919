"""``megatron-pwdpo plot RUN_DIR [--out PNG]``: the curves of one run, from its
``metrics.jsonl``, in one PNG (default ``RUN_DIR/curves.png``).

Panels (each drawn only if its metrics are in the file), x = iteration over the run:

* per stage: the training loss (every step; a moving average from 20 steps on) and the
  held-out loss;
* held-out accuracy: point-wise ``accuracy`` and, if present, ``pair_accuracy``;
* held-out mean rewards: ``reward_desirable`` vs ``reward_undesirable`` (point-wise
  losses), or ``reward_chosen`` vs ``reward_rejected`` (pairwise losses).

Needs matplotlib (``pip install 'megatron-pwdpo[plot]'``); it draws with the Agg canvas,
so no display and no global backend switch.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_pwdpo.config import ConfigError

ACCURACY_KEYS = ("accuracy", "pair_accuracy")
REWARD_PAIRS = (
    ("reward_desirable", "reward_undesirable"),
    ("reward_chosen", "reward_rejected"),
)


class MetricsFileError(ConfigError):
    """A missing, empty or unreadable metrics.jsonl (one line, exit code 2 like a bad config)."""


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The entries of ``run_dir/metrics.jsonl``; each must be an object with an integer
    ``iteration``. Raises :class:`MetricsFileError` naming the file (and line)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        what = "no such directory" if not Path(run_dir).is_dir() else "no metrics.jsonl in it"
        raise MetricsFileError(f"{run_dir}: {what} (expected a run directory)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise MetricsFileError(f"{path}: cannot read ({err})") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise MetricsFileError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(entry, dict):
            raise MetricsFileError(f"{path}:{number}: expected a JSON object")
        iteration = entry.get("iteration")
        if isinstance(iteration, bool) or not isinstance(iteration, int):
            raise MetricsFileError(f"{path}:{number}: no integer 'iteration'")
        entries.append(entry)
    if not entries:
        raise MetricsFileError(f"{path}: empty (no step was recorded)")
    return entries


def _series(
    entries: list[dict[str, Any]], key: str, *, stage: str | None, split: str
) -> tuple[list[int], list[float]]:
    """(iterations, values) of ``key``, sorted by iteration; missing/None values skipped."""
    points = sorted(
        (e["iteration"], float(e[key]))
        for e in entries
        if (stage is None or e.get("stage") == stage)
        and e.get("split", "train") == split
        and isinstance(e.get(key), int | float)
        and not isinstance(e.get(key), bool)
        and math.isfinite(e[key])
    )
    return [p[0] for p in points], [p[1] for p in points]


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


@dataclass
class Panel:
    """One subplot: a title and its lines ``(label, xs, ys, style)``."""

    title: str
    lines: list[tuple[str, list[int], list[float], str]] = field(default_factory=list)


def panels(entries: list[dict[str, Any]]) -> list[Panel]:
    """The panels the entries can fill, in drawing order."""
    stages = list(dict.fromkeys(str(e["stage"]) for e in entries if "stage" in e))
    out = []
    for stage in stages:
        panel = Panel(f"{stage}: loss")
        xs, ys = _series(entries, "loss", stage=stage, split="train")
        if xs:
            # faint raw steps under a moving average, or a plain line when they are few
            panel.lines.append(("train", xs, ys, "raw" if len(ys) >= 20 else "-"))
            if len(ys) >= 20:
                window = max(2, len(ys) // 20)
                smooth = _moving_average(ys, window)[window - 1 :]  # full windows only
                panel.lines.append((f"train (mean of {window})", xs[window - 1 :], smooth, "-"))
        xs, ys = _series(entries, "loss", stage=stage, split="eval")
        if xs:
            panel.lines.append(("held-out", xs, ys, "o-"))
        if panel.lines:
            out.append(panel)
    multi = len(stages) > 1
    accuracy = Panel("held-out accuracy")
    rewards = Panel("held-out mean reward")
    for stage in stages:
        tag = f"{stage}: " if multi else ""
        for key in ACCURACY_KEYS:
            xs, ys = _series(entries, key, stage=stage, split="eval")
            if xs:
                accuracy.lines.append((tag + key, xs, ys, "o-"))
        for pair in REWARD_PAIRS:
            for key in pair:
                xs, ys = _series(entries, key, stage=stage, split="eval")
                if xs:
                    rewards.lines.append((tag + key.removeprefix("reward_"), xs, ys, "o-"))
    return out + [p for p in (accuracy, rewards) if p.lines]


def _figure(n: int, title: str):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise MetricsFileError(
            "plot needs matplotlib: pip install 'megatron-pwdpo[plot]'"
        ) from None
    cols = min(n, 3) if n != 4 else 2
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=11)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def plot_run(run_dir: Path, out: Path | None = None) -> tuple[Path, list[str]]:
    """Draw ``run_dir``'s curves into ``out`` (default ``run_dir/curves.png``).

    Returns:
        the PNG's path and the titles of the panels drawn.
    """
    run_dir = Path(run_dir)
    entries = read_metrics(run_dir)
    drawn = panels(entries)
    if not drawn:
        raise MetricsFileError(
            f"{run_dir / 'metrics.jsonl'}: nothing to plot (no loss, accuracy or reward values)"
        )
    fig, axes = _figure(len(drawn), run_dir.resolve().name)
    for ax, panel in zip(axes, drawn, strict=False):
        for label, xs, ys, style in panel.lines:
            if style == "raw":
                ax.plot(xs, ys, lw=0.8, alpha=0.45, label=label)
            else:
                ax.plot(xs, ys, style, lw=1.4, ms=3.5, label=label)
        if panel.title == "held-out accuracy":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("iteration", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out = Path(out) if out is not None else run_dir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out, [p.title for p in drawn]


def _cmd_plot(args: argparse.Namespace) -> int:
    out, titles = plot_run(args.run_dir, args.out)
    print(f"wrote {out} ({len(titles)} panels: {', '.join(titles)})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``megatron-pwdpo plot`` to the CLI."""
    cmd = subparsers.add_parser(
        "plot",
        help="draw a run's loss, held-out accuracy and rewards from its metrics.jsonl",
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    cmd.add_argument("run_dir", type=Path, help="a run directory (holds metrics.jsonl)")
    cmd.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/curves.png)")
    cmd.set_defaults(func=_cmd_plot)
