"""``bench/gpu_check.py --dry-run``: the GPU check's every part on the CPU (carried wheels
installed and seen by the children, the default run trained, killed and resumed, pytest,
the GPU benchmark with the TRL comparison) and its one summary, so the command a lent GPU
will run cannot break unseen. The numbers are checked where the CPU makes them exact: the
resumed run repeats the uninterrupted one, and TRL, handed our converted weights and
token ids, computes the same log-probs and the same loss after a step."""

import importlib.util
import json
import zipfile
from pathlib import Path

import pytest
from conftest import run_python

pytestmark = pytest.mark.dist

CHECK = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


def _probe_wheel(folder: Path) -> None:
    """A pure-Python wheel (``gpucheck_probe`` 1.0), as pip builds one."""
    folder.mkdir()
    info = "gpucheck_probe-1.0.dist-info"
    files = {
        "gpucheck_probe/__init__.py": "VERSION = '1.0'\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpucheck_probe\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / "gpucheck_probe-1.0-py3-none-any.whl", "w") as whl:
        for name, text in {**files, f"{info}/RECORD": record}.items():
            whl.writestr(name, text)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_the_whole_check_runs_on_cpu_and_writes_one_summary(tmp_path):
    _probe_wheel(tmp_path / "wheels")
    out = tmp_path / "out"
    args = ["--dry-run", "--out", str(out), "--wheels", str(tmp_path / "wheels")]
    proc = run_python([str(CHECK), *args, "--site", str(tmp_path / "site")], timeout=900)
    s = _summary(out)
    parts = s["parts"]
    assert s["dry_run"] and s["result"] == "passed", proc.stdout[-4000:]
    assert {n: p["status"] for n, p in parts.items()} == dict.fromkeys(parts, "passed")
    assert parts["environment"]["numbers"]["carried"] == {"gpucheck_probe": "1.0"}
    train = parts["train"]["numbers"]
    assert train["iterations"] == 6 and train["pointwise_dpo_median_tokens_per_s"] > 0
    resume = parts["resume"]["numbers"]
    assert resume["resumed_from_iteration"] == 4 and resume["steps_compared"] == 6
    assert resume["max_rel_diff"] <= 1e-6  # fp32 on CPU: exact up to reduction order
    tests = parts["tests"]["numbers"]
    assert tests["passed"] > 0 and tests["failures"] == tests["errors"] == 0

    bench = parts["bench"]["numbers"]
    assert bench["runs"]["bf16"]["tokens_per_s_per_gpu"] > 0
    trl = bench["trl"]
    assert set(trl["comparisons"]) == {"dpo", "kto", "cache", "packed"}
    assert trl["shape"]["packing"] == "masked"
    if importlib.util.find_spec("trl") is None:  # a comparison-only dependency ('.[bench]')
        assert all("TRL is not installed" in t["why"] for t in trl["targets"])
        assert all(t["status"] == "not measured" for t in trl["targets"])
        for c in trl["comparisons"].values():  # our sides still run and report
            assert trl["sides"][c["ours"]]["tokens_per_s"] > 0
            assert trl["sides"][c["ours"]]["profile"]
    else:
        for name, c in trl["comparisons"].items():
            assert c["trl_weights"].startswith("converted from ours"), name
            assert c["probe_max_rel_diff"] < 1e-4, (name, c)  # same weights and tokens
            # one step of the same optimizer on the same batch: the same next loss
            assert c["last_loss_rel_diff"] < 1e-3, (name, c)
            assert c["speed_ours_over_trl"] > 0 and c["memory_ours_over_trl"] > 0
        for t in trl["targets"]:
            assert t["status"] in ("pass", "miss"), t
            assert (t["status"] == "miss") == bool(t["misses"]) == ("profile" in t)
            if t["status"] == "miss":
                assert t["profile"] and all(p["self_ms"] >= 0 for p in t["profile"])
    md = (out / "summary.md").read_text()
    assert md.startswith("# GPU check (CPU dry run): passed")
    assert "### Targets (issue #24 item 7)" in md and "| resume | passed |" in md
    assert (out / "check.log").stat().st_size > 0


def test_a_failing_part_is_reported_and_the_check_goes_on(tmp_path):
    out = tmp_path / "out"
    proc = run_python(
        [
            str(CHECK),
            "--dry-run",
            "--out",
            str(out),
            "--wheels",
            "",
            "--dtype",
            "fp64",  # refused by the config: train fails, resume cannot run
            "--skip",
            "bench",
        ],
        timeout=600,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout[-3000:]
    s = _summary(out)
    status = {n: p["status"] for n, p in s["parts"].items()}
    assert status == {
        "wheels": "skipped",
        "environment": "passed",
        "train": "failed",
        "resume": "skipped",
        "tests": "passed",
        "bench": "skipped",
    }
    assert "precision.dtype" in s["parts"]["train"]["error"]
    assert s["result"] == "failed: train"
    assert "### train: failed" in (out / "summary.md").read_text()
