"""The experiment's report: per-method statistics over seeds, ``results.md`` and
``curves.png`` (see ``megatron_pwdpo.experiment``, which runs the experiment)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = [
    ("pair_accuracy", "pair acc.", "{:.3f}"),
    ("pair_margin", "pair margin", "{:+.3f}"),
    ("accuracy", "point-wise acc.", "{:.3f}"),
    ("nll", "chosen NLL (nats/token)", "{:.3f}"),
    ("ppl", "chosen ppl", "{:.1f}"),
]
REWARD_KEYS = ("pair_accuracy", "pair_margin", "accuracy", "spearman")


def _stats(values: list[float | None]) -> dict[str, Any] | None:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return None
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals), "values": vals}


def summarise(exp: dict[str, Any], per_seed: dict[int, dict]) -> dict[str, Any]:
    """Mean and sample std over seeds of every metric of every method."""
    table: dict[str, dict[str, Any]] = {}
    seeds = list(per_seed)
    for method in exp["methods"]:
        row = {}
        for key in [c[0] for c in COLUMNS]:
            if method == "sft" and key in REWARD_KEYS:
                continue  # policy == reference: every reward is 0
            row[key] = _stats([per_seed[s]["eval"]["hh"][method].get(key) for s in seeds])
        row["train_wall_s"] = _stats([per_seed[s]["wall_s"][method] for s in seeds])
        table[method] = row
    if exp["red_team"]["steps"] > 0:
        rt = [per_seed[s]["eval"]["red_team"]["pointwise_dpo"] for s in seeds]
        table["red_team"] = {
            "spearman": _stats([m["spearman"] for m in rt]),
            "accuracy": _stats([m["accuracy"] for m in rt]),
        }
    return table


def _cell(stat: dict[str, Any] | None, fmt: str) -> str:
    if stat is None:
        return "—"
    if stat["n"] == 1:
        return fmt.format(stat["mean"])
    return f"{fmt.format(stat['mean'])} ± {fmt.replace('+', '').format(stat['std'])}"


def markdown(exp: dict[str, Any], table: dict[str, Any], total_wall_s: float) -> str:
    seeds = exp["seeds"]
    lines = [
        f"Held-out: the last {exp['eval_pairs']} HH-RLHF pairs; mean ± std over "
        f"{len(seeds)} seed(s) {seeds}; {exp['sft_steps']} SFT steps, then {exp['steps']} "
        f"steps per preference method from that SFT model (also the reference). "
        f"Wall time of all runs {total_wall_s / 60:.1f} min.",
        "",
        "| method | " + " | ".join(c[1] for c in COLUMNS) + " | train wall (s) |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for method in exp["methods"]:
        row = table[method]
        cells = [_cell(row.get(key), fmt) for key, _, fmt in COLUMNS]
        lines.append(
            f"| {method} | " + " | ".join(cells) + f" | {_cell(row['train_wall_s'], '{:.0f}')} |"
        )
    if "red_team" in table:
        rt = table["red_team"]
        lines += [
            "",
            f"Continuous labels (red-team style fixture, {exp['red_team']['steps']} steps of "
            "point-wise DPO with soft labels from the SFT model): Spearman(implicit reward, "
            f"held-out score) = {_cell(rt['spearman'], '{:.3f}')}; point-wise accuracy "
            f"(label > 0.5) = {_cell(rt['accuracy'], '{:.3f}')}.",
        ]
    lines.append("")
    lines.append(
        "SFT's reward columns are empty: its policy is the reference, so every reward is 0."
    )
    return "\n".join(lines) + "\n"


_CURVE_METRIC = {"sft": "nll", "dpo": "pair_accuracy", "red_team": "accuracy"}


def _curves(run_dir: Path, stage: str, split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    path = run_dir / "metrics.jsonl"
    points = []
    for line in path.read_text().splitlines() if path.exists() else []:
        entry = json.loads(line)
        if entry.get("stage") == stage and entry.get("split", "train") == split and key in entry:
            points.append((entry["step"], entry[key]))
    arr = np.array(points, dtype=np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def plot(exp: dict[str, Any], path: Path) -> None:
    """Training loss (top) and the held-out metric logged during training (bottom) of
    every method: mean over seeds, shaded min..max."""
    try:
        import matplotlib
    except ImportError:
        print("[experiment] no matplotlib: curves.png skipped (pip install 'megatron-pwdpo[plot]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(exp["methods"]) + (["red_team"] if exp["red_team"]["steps"] > 0 else [])
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 5.6), squeeze=False)
    for col, name in enumerate(names):
        stage = "pointwise_dpo" if name == "red_team" else name
        metric = _CURVE_METRIC.get(name, "accuracy")
        for row, (split, key) in enumerate([("train", "loss"), ("eval", metric)]):
            ax, runs = axes[row][col], []
            for seed in exp["seeds"]:
                steps, values = _curves(
                    Path(exp["run_dir"]) / f"seed{seed}" / name, stage, split, key
                )
                if len(values):
                    runs.append((steps, values))
            if runs:
                n = min(len(v) for _, v in runs)
                stack = np.stack([v[:n] for _, v in runs])
                x = runs[0][0][:n]
                ax.plot(x, stack.mean(0), marker="o" if split == "eval" else None, ms=3)
                ax.fill_between(x, stack.min(0), stack.max(0), alpha=0.25)
            ax.set_title(f"{name}: {split} {key}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
