"""The experiment's report: per-method statistics over seeds, ``results.md`` and
``curves.png`` (see ``megatron_pwdpo.evaluation.experiment``, which runs the experiment)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

# (key in an eval's per-policy metrics, column title, format); "ci" columns take [lo, hi]
COLUMNS = [
    ("pair_accuracy", "pair acc. (as trained)", "{:.3f}"),
    ("pair_accuracy_ci95", "95% CI (pairs)", "{:.3f}"),
    ("pair_accuracy_sum", "pair acc. Σlogp", "{:.3f}"),
    ("pair_accuracy_mean", "pair acc. mean logp", "{:.3f}"),
    ("pair_accuracy_chosen_shorter", "acc. chosen shorter", "{:.3f}"),
    ("pair_accuracy_chosen_longer", "acc. chosen longer", "{:.3f}"),
    ("margin_length_spearman", "ρ(margin, Δlength)", "{:+.2f}"),
    ("accuracy", "point-wise acc.", "{:.3f}"),
    ("nll", "chosen NLL", "{:.3f}"),
]
REFERENCE_OF = {"sft": "sft", "base": "base"}  # a reference scored against itself
LENGTH_RULES = ("shorter_wins", "longer_wins")


def _stats(values: list[float | None]) -> dict[str, Any] | None:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return None
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals), "values": vals}


def _interval(values: list[list[float] | None]) -> dict[str, Any] | None:
    """Mean over seeds of the per-seed interval endpoints (the pairs are the same)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    lo, hi = np.mean([v[0] for v in vals]), np.mean([v[1] for v in vals])
    return {"interval": [float(lo), float(hi)], "n": len(vals), "values": vals}


def policy_metrics(seed_result: dict, method: str) -> tuple[dict, dict] | None:
    """``(metrics of method, its eval group's whole output)`` from one seed's evals."""
    for group, out in seed_result["eval"].items():
        if group != "red_team" and method in out:
            return out[method], out
    return None


def _column(key: str, values: list) -> dict[str, Any] | None:
    return _interval(values) if key.endswith("_ci95") else _stats(values)


def summarise(exp: dict[str, Any], per_seed: dict[int, dict]) -> dict[str, Any]:
    """Per method: mean and sample std over seeds of every column, the mean per-seed
    95% interval, and its paired difference to each length rule; the length rules as
    rows; the held-out pair count."""
    table: dict[str, dict[str, Any]] = {}
    seeds = list(per_seed)
    for method in exp["methods"]:
        found = [policy_metrics(per_seed[s], method) for s in seeds]
        row: dict[str, Any] = {}
        for key, _, _ in COLUMNS:
            if method in REFERENCE_OF and key != "nll":
                continue  # policy == reference: every reward is 0
            row[key] = _column(key, [f[0].get(key) if f else None for f in found])
        for rule in LENGTH_RULES:
            diffs = [
                f[1]["paired_differences"].get(f"{method} - {rule}") if f else None for f in found
            ]
            diffs = [d for d in diffs if d is not None]
            if diffs and method not in REFERENCE_OF:
                row[f"minus_{rule}"] = {
                    **_stats([d["pair_accuracy"] for d in diffs]),
                    "intervals": [d["pair_accuracy_ci95"] for d in diffs],
                    "seeds_above_0": sum(d["pair_accuracy_ci95"][0] > 0 for d in diffs),
                }
        row["train_wall_s"] = _stats([per_seed[s]["wall_s"].get(method) for s in seeds])
        table[method] = row
    first = policy_metrics(per_seed[seeds[0]], exp["methods"][0])
    lengths = first[1]["length_baselines"] if first else {}
    for rule in LENGTH_RULES:
        table[rule] = {
            "pair_accuracy": _stats([lengths.get(rule)]),
            "pair_accuracy_ci95": _interval([lengths.get(f"{rule}_ci95")]),
        }
    table["held_out"] = {k: v for k, v in lengths.items() if not isinstance(v, (float, list))}
    table["differences"] = _differences(exp, per_seed)
    if exp["red_team"]["steps"] > 0:
        rt = [per_seed[s]["eval"]["red_team"]["pointwise_dpo"] for s in seeds]
        table["red_team"] = {
            "spearman": _stats([m["spearman"] for m in rt]),
            "accuracy": _stats([m["accuracy"] for m in rt]),
        }
    return table


def _differences(exp: dict[str, Any], per_seed: dict[int, dict]) -> dict[str, Any]:
    """Paired differences of pair accuracy between trained methods scored in one eval
    (the same pairs, the same reference): mean and std over seeds, the per-seed 95%
    paired-bootstrap intervals."""
    out: dict[str, Any] = {}
    for seed, result in per_seed.items():
        for group, evals in result["eval"].items():
            for name, d in (evals.get("paired_differences") or {}).items():
                a, b = name.split(" - ")
                if group == "red_team" or b in LENGTH_RULES or {a, b} & set(REFERENCE_OF):
                    continue
                entry = out.setdefault(name, {"values": [], "intervals": [], "seeds": []})
                entry["values"].append(d["pair_accuracy"])
                entry["intervals"].append(d["pair_accuracy_ci95"])
                entry["seeds"].append(seed)
    for entry in out.values():
        entry.update(_stats(entry["values"]) or {})
        entry["seeds_excluding_0"] = sum(lo > 0 or hi < 0 for lo, hi in entry["intervals"])
    return out


def _cell(stat: dict[str, Any] | None, fmt: str) -> str:
    if stat is None:
        return "—"
    if "interval" in stat:
        lo, hi = stat["interval"]
        return f"[{fmt.format(lo)}, {fmt.format(hi)}]"
    if stat["n"] == 1:
        return fmt.format(stat["mean"])
    return f"{fmt.format(stat['mean'])} ± {fmt.replace('+', '').format(stat['std'])}"


def _minus_cell(stat: dict[str, Any] | None) -> str:
    if stat is None:
        return "—"
    return f"{_cell(stat, '{:+.3f}')} ({stat['seeds_above_0']}/{stat['n']})"


def markdown(exp: dict[str, Any], table: dict[str, Any], total_wall_s: float) -> str:
    seeds = exp["seeds"]
    held = table.get("held_out", {})
    lines = [
        f"Held-out: the last {exp['eval_pairs']} HH-RLHF pairs of the file, of which "
        f"{held.get('pairs', '?')} fit the sequence length (chosen shorter in "
        f"{held.get('chosen_shorter_pairs', '?')}, longer in "
        f"{held.get('chosen_longer_pairs', '?')}, equal in {held.get('equal_length_pairs', '?')}); "
        f"mean ± std over {len(seeds)} seed(s) {seeds}; {exp['sft_steps']} SFT steps (and "
        f"base steps), then {exp['steps']} steps per method. Wall time of all runs "
        f"{total_wall_s / 60:.1f} min.",
        "",
        "| method | "
        + " | ".join(c[1] for c in COLUMNS)
        + " | − shorter_wins (seeds > 0) | train wall (s) |",
        "|---" * (len(COLUMNS) + 3) + "|",
    ]
    for method in [*exp["methods"], *LENGTH_RULES]:
        row = table[method]
        cells = [_cell(row.get(key), fmt) for key, _, fmt in COLUMNS]
        wall = _cell(row.get("train_wall_s"), "{:.0f}")
        minus = _minus_cell(row.get("minus_shorter_wins"))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {minus} | {wall} |")
    diffs = table.get("differences") or {}
    if diffs:
        lines += [
            "",
            "Paired differences of pair accuracy (same held-out pairs, same reference; "
            "mean ± std over seeds, and each seed's 95% paired-bootstrap interval):",
            "",
            "| difference | mean ± std | per-seed 95% intervals | seeds excluding 0 |",
            "|---|---|---|---|",
        ]
        for name, d in diffs.items():
            intervals = ", ".join(f"[{lo:+.3f}, {hi:+.3f}]" for lo, hi in d["intervals"])
            lines.append(
                f"| {name} | {_cell(d, '{:+.3f}')} | {intervals} | "
                f"{d['seeds_excluding_0']}/{len(d['intervals'])} |"
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
    lines += [
        "",
        "Columns: pair accuracy with the log-prob reduction the method trained with (Σ for "
        "ours, as `loss.logp_reduction`; official_* as in `OFFICIAL_LOSS`; sft_continued "
        "scored as ours), its 95% percentile-bootstrap interval over the held-out pairs "
        "(2,000 resamples, seed 0; the mean of the seeds' endpoints), the pair accuracy "
        "under each reduction, within the pairs whose chosen response is shorter / longer, "
        "the rank correlation of the margin with the length difference, point-wise "
        "accuracy, per-token NLL of the held-out chosen responses, and the paired "
        'difference to the rule "the shorter response wins" (seeds whose interval is '
        "above 0). sft and base are references: their reward columns are empty. "
        "shorter_wins / longer_wins: the length-only rules by response tokens (ties half).",
    ]
    return "\n".join(lines) + "\n"


_CURVE_METRIC = {
    "sft": "nll",
    "base": "nll",
    "sft_continued": "nll",
    "dpo": "pair_accuracy",
    "official_dpo": "pair_accuracy",
    "red_team": "accuracy",
}
_STAGE = {
    "red_team": "pointwise_dpo",
    "base": "sft",
    "sft_continued": "sft",
    "official_dpo": "dpo",
    "official_pointwise_dpo": "pointwise_dpo",
    "official_ulma": "ulma",
}


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
    fig, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), 5.0), squeeze=False)
    for col, name in enumerate(names):
        stage = _STAGE.get(name, name)
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
