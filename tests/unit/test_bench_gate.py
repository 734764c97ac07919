"""``bench/run_all.py``'s gate: a ratio that misses its target by more than its measured
noise fails the run; within the noise it is reported, not failed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
run_all = pytest.importorskip("run_all")


def _packing(speedup: float, noise: float) -> dict:
    size = {"global_batch_rows": 16, "speedup_packed_over_padded": speedup}
    return {"sizes": [{**size, "target_speedup": 1.6, "speedup_noise": noise}]}


@pytest.mark.parametrize(
    ("speedup", "noise", "verdict"),
    [(1.7, 0.05, "met"), (1.57, 0.05, "within noise"), (1.5, 0.05, "MISSED")],
)
def test_gate_compares_the_shortfall_with_the_noise(speedup, noise, verdict):
    (check,) = run_all.gate_checks(["packing"], {"packing": _packing(speedup, noise)})
    assert check["verdict"] == verdict


def test_lower_is_better_targets_and_skipped_benchmarks():
    memory = {"tiny": {"peak_cache_over_sft": 1.2}}
    result = {
        "step_time_cache_over_sft": 1.02,
        "step_time_cache_over_sft_noise": 0.01,
        "target_cache_over_sft": 1.05,
        "memory": memory,
    }
    verdicts = [c["verdict"] for c in run_all.gate_checks(["reference"], {"reference": result})]
    assert verdicts == ["met", "MISSED"]
    assert run_all.gate_checks(["trl_compare"], {"trl_compare": {"skipped": "no TRL"}}) == []


def test_two_at_a_time_starts_the_longest_first():
    assert run_all.start_order(["ulma_flops", "packing", "attention", "logprobs_memory"]) == [
        "logprobs_memory",
        "attention",
        "packing",
        "ulma_flops",
    ]
    assert set(run_all.QUICK_CPU_S) == set(run_all.BENCHMARKS)


def test_quick_checks_cover_every_gated_ratio_of_the_quick_points():
    """--quick keeps the rows the gate reads: the best-each-side TRL rows without the
    like-for-like ones, the chunked ratio at 1 x 4096 without 16 x 256."""
    trl = run_all.BENCHMARKS["trl_compare"]
    best = {"speed_ours_over_trl": 2.0, "speed_noise": 0.1, "step_peak_ours_over_trl": 0.4}
    result = {"best_kto": best, "best_dpo": best}
    assert len(trl.checks(result)) == 4
    assert trl.summary_rows({}) == []
    lp = run_all.BENCHMARKS["logprobs_memory"]
    assert lp.QUICK_SHAPES == ((1, 4096),) and lp.CHUNK < 4096


def test_quick_runs_two_at_a_time_into_its_own_folder(tmp_path, monkeypatch):
    """Two lanes: every benchmark's result lands in the summary, CPU-s per benchmark
    add up, and the files go to --results-dir (bench/results/quick by default)."""
    import json
    import time
    import types

    running, most = set(), []

    def fake_run(cmd, *, timeout):
        name, out = cmd[1].rsplit("/", 1)[-1][:-3], cmd[cmd.index("--out") + 1]
        running.add(name)
        most.append(len(running))
        time.sleep(0.05)
        running.discard(name)
        with open(out, "w") as f:
            json.dump({"name": name, "quick": "--quick" in cmd}, f)
        return 0, "", "", 1.5

    fake = types.SimpleNamespace(summary_rows=lambda r: [])
    monkeypatch.setattr(run_all, "_run", fake_run)
    monkeypatch.setattr(run_all, "BENCHMARKS", dict.fromkeys(run_all.BENCHMARKS, fake))
    monkeypatch.setattr(run_all, "machine", lambda: {})
    code = run_all.main(["--quick", "--results-dir", str(tmp_path)])
    summary = json.loads((tmp_path / "cpu.json").read_text())
    assert code == 0 and summary["jobs"] == 2 and max(most) == 2
    assert summary["cpu_s"] == 1.5 * len(run_all.QUICK_CPU_S)
    assert all(r["quick"] for r in summary["results"].values())
    assert {p.name for p in tmp_path.iterdir()} == {f"{n}.json" for n in run_all.BENCHMARKS} | {
        "cpu.json"
    }
