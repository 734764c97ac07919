"""The GPU check's summary: ``summary.json`` as recorded, ``summary.md`` to read.

Standard library only (``gpu_check.py`` runs before the carried wheels are installed).
"""

from __future__ import annotations

import json
from pathlib import Path


def _table(rows: list[list], header: list[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = (str(c).replace("|", "/").replace("\n", " ") for c in row)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _short(numbers: dict | None, keys: tuple[str, ...]) -> str:
    numbers = numbers or {}
    return ", ".join(f"{k} {numbers[k]}" for k in keys if numbers.get(k) is not None)


HIGHLIGHTS = {
    "wheels": ("installed",),
    "environment": (
        "device",
        "torch",
        "megatron-core",
        "transformers",
        "trl",
        "transformer_engine",
    ),
    "train": (
        "iterations",
        "steps_per_s",
        "sft_last_loss",
        "dpo_last_loss",
        "pointwise_dpo_last_loss",
    ),
    "resume": ("resumed_from_iteration", "steps_compared", "max_rel_diff", "bitwise_equal"),
    "tests": ("passed", "failures", "errors", "skipped", "workers", "cuda_visible"),
    "bench": ("model", "seq_length", "dtype", "attention"),
}


def _parts(summary: dict) -> list[str]:
    rows = []
    for name, p in summary["parts"].items():
        what = p.get("why") or _short(p.get("numbers"), HIGHLIGHTS.get(name, ()))
        rows.append([name, p["status"], p["seconds"], what])
    return _table(rows, ["part", "status", "seconds", "numbers"])


def _bench(result: dict) -> list[str]:
    lines = []
    runs = result.get("runs") or {}
    if runs:
        lines += ["", "### Precisions (point-wise DPO, resident reference)", ""]
        rows = []
        for name, x in runs.items():
            if "tokens_per_s_per_gpu" not in x:
                rows.append([name, x.get("skipped") or "failed", "", "", "", ""])
                continue
            rows.append(
                [
                    name,
                    f"{x['tokens_per_s_per_gpu']:.0f}",
                    f"{x.get('policy_mfu_vs_bf16_peak', float('nan')):.1%}",
                    f"{x.get('reference_mfu_vs_bf16_peak', float('nan')):.1%}",
                    f"{x.get('step_mfu_vs_bf16_peak', float('nan')):.1%}",
                    f"{x['max_memory_allocated_gib']:.1f}",
                ]
            )
        lines += _table(
            rows, ["precision", "tokens/s", "policy MFU", "ref MFU", "step MFU", "peak GiB"]
        )
    trl = result.get("trl")
    if not trl:
        return lines
    lines += ["", "### Against TRL (same GPU, weights, token ids, batches)", ""]
    rows = []
    for name, cmp in trl["comparisons"].items():
        x, y = trl["sides"].get(cmp["ours"], {}), trl["sides"].get(cmp["trl"], {})
        if "not_compared" in cmp:  # what was measured all the same, and why not the rest
            ours_rate = f"{x['tokens_per_s']:.0f}" if "tokens_per_s" in x else ""
            ours_peak = f"{x['peak_gib']:.2f} / -" if "peak_gib" in x else ""
            why = cmp["not_compared"][:300]
            rows.append([name, ours_rate, why, "", ours_peak, "", "", ""])
            continue
        rows.append(
            [
                name,
                f"{x['tokens_per_s']:.0f}",
                f"{y['tokens_per_s']:.0f}",
                f"{cmp['speed_ours_over_trl']:.2f}x",
                f"{x['peak_gib']:.2f} / {y['peak_gib']:.2f}",
                f"{cmp.get('memory_ours_over_trl', float('nan')):.2f}x",
                f"{cmp['probe_max_rel_diff']:.1e}",
                f"{cmp.get('last_loss_rel_diff', float('nan')):.1e}",
            ]
        )
    header = ["comparison", "ours tok/s", "TRL tok/s", "speed", "peak GiB ours / TRL"]
    lines += _table(rows, [*header, "memory", "probe logp diff", "last loss diff"])
    memory = next((s.get("memory") for s in trl["sides"].values() if s.get("memory")), None)
    lines += ["", f"Memory: {memory}. Shape: `{json.dumps(trl['shape'])}`.", ""]
    lines += ["### Targets (issue #24 item 7)", ""]
    rows = [
        [
            t["comparison"],
            t["target"],
            t["status"],
            "; ".join(t.get("misses", [])) or t.get("why", ""),
        ]
        for t in trl["targets"]
    ]
    lines += _table(rows, ["comparison", "target", "status", "why"])
    for t in trl["targets"]:
        if t.get("profile"):
            lines += ["", f"Our step's top kernels ({t['comparison']}: {t['status']}):", ""]
            rows = [
                [p["name"], p["self_ms"], f"{p['share']:.1%}", p["calls"]] for p in t["profile"]
            ]
            lines += _table(rows, ["kernel / op", "self ms", "share", "calls"])
    return lines


def markdown(summary: dict) -> str:
    env = summary["parts"].get("environment", {}).get("numbers") or {}
    head = [
        f"# GPU check{' (CPU dry run)' if summary['dry_run'] else ''}: {summary['result']}",
        "",
        f"{summary['started']}, {summary['total_s']} s of a {summary['budget_s']} s budget; "
        f"device {env.get('device', 'cpu')}, Python {env.get('python')}, torch {env.get('torch')}, "
        f"megatron-core {env.get('megatron-core')}, transformers {env.get('transformers')}, "
        f"TRL {env.get('trl')}, Transformer Engine {env.get('transformer-engine') or 'none'}, "
        f"commit {env.get('git_commit')}.",
        "",
        *_parts(summary),
    ]
    bench = summary["parts"].get("bench", {}).get("numbers")
    if bench:
        head += _bench(bench)
    errors = [(n, p["error"]) for n, p in summary["parts"].items() if p.get("error")]
    for name, error in errors:
        head += ["", f"### {name}: failed", "", "```", error, "```"]
    tests = summary["parts"].get("tests", {}).get("numbers") or {}
    if tests.get("failed_tests"):
        head += ["", "### Failed tests", "", *[f"- `{t}`" for t in tests["failed_tests"]]]
    return "\n".join(head) + "\n"


def write(out: Path, summary: dict) -> tuple[Path, Path]:
    """``summary.json`` and ``summary.md`` in ``out``."""
    as_json, as_md = out / "summary.json", out / "summary.md"
    as_json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    as_md.write_text(markdown(summary))
    return as_json, as_md
