"""``bench/gpu.py --cpu-dry-run``: the GPU benchmark's whole pipeline (worker process,
training session, reference-forward timing, FLOP and MFU arithmetic, table) on the CPU
in fp32, so a change elsewhere that breaks the script shows here, where no GPU runs it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_gpu_benchmark_runs_end_to_end_on_cpu():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu.py"), "--cpu-dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BENCH,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "nothing measured, nothing written" in proc.stdout
    row = re.search(r"^\| bf16 \| (\d+) \| 1\.00x \| ([\d.]+)% \|", proc.stdout, re.M)
    assert row and int(row.group(1)) > 0 and float(row.group(2)) > 0, proc.stdout
    summary = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("{")))
    assert summary["model"] == "tiny" and summary["timed_steps"] == 2
