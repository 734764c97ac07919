"""``bench/gpu.py --cpu-dry-run``: the GPU benchmark's whole pipeline (worker process,
training session, reference-forward timing, FLOP and MFU arithmetic, table) on the CPU
in fp32, so a change elsewhere that breaks the script shows here, where no GPU runs it."""

import json
import re
from pathlib import Path

import pytest
from conftest import run_python

pytestmark = pytest.mark.dist

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_gpu_benchmark_runs_end_to_end_on_cpu():
    proc = run_python([str(BENCH / "gpu.py"), "--cpu-dry-run"], cwd=BENCH)
    assert "nothing measured, nothing written" in proc.stdout
    mfu = r"([\d.]+)% \| "
    row = re.search(r"^\| bf16 \| (\d+) \| 1\.00x \| " + 3 * mfu, proc.stdout, re.M)
    assert row, proc.stdout
    tokens_per_s, *mfus = (float(x) for x in row.groups())
    assert tokens_per_s > 0 and all(x > 0 for x in mfus), proc.stdout  # policy, reference, step
    summary = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("{")))
    assert summary["model"] == "tiny" and summary["timed_steps"] == 2
