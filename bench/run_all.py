"""Run every CPU benchmark, print one markdown table of measured ratios, write
``bench/results/cpu.json`` (and each benchmark's own ``bench/results/NAME.json``).

Each benchmark runs in its own process (its sides alternate inside it; memory sides
in further processes of their own). The full run (more rounds, every point, the cost
curves' whole grid) runs one benchmark at a time and takes many times as long as
``--quick``.

``--quick`` is the one-command check: fewer points and rounds (3 timed rounds where a
ratio's noise is a spread over rounds; only the gated rows where a benchmark has
ungated ones; the same model sizes and shapes), then the gate. Measured 2026-12-05 on
2 idle cores (load average 0.4 at the start): 180 s of wall clock, 351 CPU-s, every
check met.

It runs two benchmarks at a time (``--jobs``, default 2 with ``--quick``, else 1).
That keeps the ratios valid because of how they are measured: every time ratio is of
the CPU time (one intra-op thread) of sides that alternate round by round in one
process, so a benchmark beside it slows both sides alike (shared caches and memory
bandwidth) and takes CPU time from neither (the README's results were measured at load
30-79, with other jobs beside each benchmark); memory is each side's peak resident
memory in its own process, which does not depend on what else runs. Only each
benchmark's wall clock depends on it, and it gates nothing. Quick results go to
``bench/results/quick/`` (git-ignored), so a quick run never overwrites the full run's
files. The run ends with the wall time and CPU time against the 240 s budget of
``--quick``.

    python bench/run_all.py [--quick] [--jobs N] [--only packing,reference,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


# CPU-seconds of each benchmark's --quick run (one at a time, beside a CI run using both
# cores, 2026-12-05): the order in which --jobs > 1 starts them, longest first, so that
# the two lanes end close together
QUICK_CPU_S = {
    "logprobs_memory": 87,
    "attention": 86,
    "reference": 70,
    "trl_compare": 55,
    "cost_curves": 20,
    "packing": 13,
    "ulma_flops": 10,
}
QUICK_BUDGET_S = 240


def start_order(names: list[str]) -> list[str]:
    """``names``, the most expensive benchmark first (by :data:`QUICK_CPU_S`; unknown
    ones last, in the given order)."""
    return sorted(names, key=lambda n: -QUICK_CPU_S.get(n, 0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated names")
    parser.add_argument(
        "--results-dir",
        default=None,
        help="where each benchmark's NAME.json goes (default bench/results, "
        "bench/results/quick with --quick)",
    )
    parser.add_argument("--out", default=None, help="the summary (default RESULTS_DIR/cpu.json)")
    parser.add_argument(
        "--jobs", type=int, default=None, help="benchmarks at a time (default 2 with --quick)"
    )
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    parts = Path(args.results_dir or (RESULTS / "quick" if args.quick else RESULTS))
    parts.mkdir(parents=True, exist_ok=True)
    args.out = args.out or str(parts / "cpu.json")
    jobs = args.jobs or (2 if args.quick else 1)
    start, load0 = time.perf_counter(), os.getloadavg()
    results, walls, cpus, failed = {}, {}, {}, []
    lock = threading.Lock()

    def run(name: str) -> None:
        out = parts / f"{name}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, str(REPO / "bench" / f"{name}.py"), "--out", str(out)]
        cmd += ["--quick"] if args.quick else []
        with lock:
            print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        code, stdout, stderr, cpu = _run(cmd, timeout=3600)
        wall = round(time.perf_counter() - t0, 1)
        skipped = "skipped:" in stdout
        with lock:
            walls[name], cpus[name] = wall, round(cpu, 1)
            if code != 0 or (not out.exists() and not skipped):
                print(f"== {name} FAILED\n" + stdout[-2000:] + stderr[-4000:], file=sys.stderr)
                failed.append(name)
            elif skipped:
                print(stdout.strip())
                results[name] = {"skipped": stdout.strip()}
            else:
                results[name] = json.loads(out.read_text())
                print(f"   {name}: {wall:.0f} s ({cpu:.0f} CPU-s)", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(run, start_order(names) if jobs > 1 else names))
    rows = [
        row
        for name in names
        if name in results and "skipped" not in results[name]
        for row in BENCHMARKS[name].summary_rows(results[name])
    ]
    text = table(rows, SUMMARY_HEADER)
    gate = gate_checks(names, results)
    wall = round(time.perf_counter() - start, 1)
    cpu = round(sum(cpus.values()), 1)
    load = [round(x, 2) for x in (*load0, *os.getloadavg())]
    over = args.quick and wall > QUICK_BUDGET_S
    summary = {
        "machine": machine(),
        "wall_s": wall,
        "wall_s_per_benchmark": walls,
        # the work done (user + system time of the benchmark processes and their
        # workers): what the wall clock would be on idle cores, one process at a time
        "cpu_s": cpu,
        "cpu_s_per_benchmark": cpus,
        "quick": args.quick,
        "jobs": jobs,
        # 1-, 5-, 15-minute load averages at the start, then at the end
        "load_average_start_end": load,
        "quick_budget_s": QUICK_BUDGET_S,
        "over_quick_budget": over,
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
    print(
        f"\n{wall:.0f} s of wall clock in all, {jobs} at a time ({cpu:.0f} CPU-s; load "
        f"average {load[0]:.1f} at the start, {load[3]:.1f} at the end); wrote {args.out}"
    )
    for c in gate:
        print(
            f"{c['verdict']}: {c['name']}: {c['value']} vs target {c['target']} "
            f"(noise {c['noise']})",
            file=sys.stdout if c["verdict"] == "met" else sys.stderr,
        )
    if args.quick:
        verdict = "OVER BUDGET" if over else "within budget"
        print(
            f"--quick: {wall:.0f} s of wall clock vs a budget of {QUICK_BUDGET_S} s: {verdict}"
            + (" (the wall clock counts only on idle cores: see the load average)" if over else ""),
            file=sys.stderr if over else sys.stdout,
        )
    missed = [c for c in gate if c["verdict"] == "MISSED"]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    if missed:
        print(f"FAILED: {len(missed)} target(s) missed by more than their noise", file=sys.stderr)
    return 1 if failed or missed else 0


def _run(cmd: list[str], *, timeout: float) -> tuple[int, str, str, float]:
    """Run ``cmd``; its exit code, stdout, stderr and CPU seconds (user + system of the
    process and of every descendant it waited for: ``os.wait4``, so two benchmarks
    running at once are counted apart)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), usage.ru_utime + usage.ru_stime


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
