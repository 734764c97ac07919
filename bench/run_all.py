"""Run every CPU benchmark, print one markdown table of measured ratios, write
``bench/results/cpu.json`` (and each benchmark's own ``bench/results/NAME.json``).

Each benchmark runs in its own process (its sides alternate inside it; memory sides
in further processes of their own). About 5 minutes on 2 idle cores; ``--quick``
is a smoke run of about half that.

    python bench/run_all.py [--quick] [--only packing,reference,...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import attention
import cost_curves
import logprobs_memory
import packing
import reference
import trl_compare
import ulma_flops
from common import REPO, RESULTS, SUMMARY_HEADER, machine, table

BENCHMARKS = {
    "packing": packing,
    "reference": reference,
    "ulma_flops": ulma_flops,
    "logprobs_memory": logprobs_memory,
    "trl_compare": trl_compare,
    "attention": attention,
    "cost_curves": cost_curves,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated names")
    parser.add_argument("--out", default=str(RESULTS / "cpu.json"))
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    start, results, walls, cpus, failed = time.perf_counter(), {}, {}, {}, []
    for name in names:
        out = RESULTS / f"{name}.json"
        cmd = [sys.executable, str(REPO / "bench" / f"{name}.py"), "--out", str(out)]
        cmd += ["--quick"] if args.quick else []
        t0, cpu0 = time.perf_counter(), _children_cpu_s()
        print(f"== {name}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        walls[name] = round(time.perf_counter() - t0, 1)
        cpus[name] = round(_children_cpu_s() - cpu0, 1)
        skipped = "skipped:" in proc.stdout
        if proc.returncode != 0 or (not out.exists() and not skipped):
            print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
            failed.append(name)
            continue
        if skipped:
            print(proc.stdout.strip())
            results[name] = {"skipped": proc.stdout.strip()}
            continue
        results[name] = json.loads(out.read_text())
        print(f"   {walls[name]:.0f} s ({cpus[name]:.0f} CPU-s)", flush=True)
    rows = [
        row
        for name in names
        if name in results and "skipped" not in results[name]
        for row in BENCHMARKS[name].summary_rows(results[name])
    ]
    text = table(rows, SUMMARY_HEADER)
    gate = gate_checks(names, results)
    wall = round(time.perf_counter() - start, 1)
    summary = {
        "machine": machine(),
        "wall_s": wall,
        "wall_s_per_benchmark": walls,
        # the work done (user + system time of the benchmark processes and their
        # workers): what the wall clock would be on idle cores, one process at a time
        "cpu_s": round(sum(cpus.values()), 1),
        "cpu_s_per_benchmark": cpus,
        "quick": args.quick,
        "table": [dict(zip(SUMMARY_HEADER, (str(c) for c in row), strict=True)) for row in rows],
        "results": results,
        "failed": failed,
        "checks": gate,
    }
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    print()
    print(text)
    print(f"\n{wall:.0f} s in all ({sum(cpus.values()):.0f} CPU-s); wrote {args.out}")
    missed = [c for c in gate if c["verdict"] == "MISSED"]
    for c in gate:
        if c["verdict"] != "met":
            print(
                f"{c['verdict']}: {c['name']}: {c['value']} vs target {c['target']} "
                f"(noise {c['noise']})",
                file=sys.stderr,
            )
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    if missed:
        print(f"FAILED: {len(missed)} target(s) missed by more than their noise", file=sys.stderr)
    return 1 if failed or missed else 0


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children (and theirs)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def gate_checks(names: list[str], results: dict) -> list[dict]:
    """Every benchmark's ``checks(result)`` with a verdict: ``met``, ``within noise``
    (missed by no more than the ratio's measured round-to-round noise) or ``MISSED``."""
    out = []
    for name in names:
        result, module = results.get(name), BENCHMARKS[name]
        if not result or "skipped" in result or not hasattr(module, "checks"):
            continue
        for c in module.checks(result):
            sign = 1 if c["higher_is_better"] else -1
            shortfall = sign * (c["target"] - c["value"])  # > 0: missed
            verdict = (
                "met" if shortfall <= 0 else "within noise" if shortfall <= c["noise"] else "MISSED"
            )
            out.append({**c, "benchmark": name, "verdict": verdict})
    return out


if __name__ == "__main__":
    sys.exit(main())
