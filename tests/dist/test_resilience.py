"""Long runs that survive: exact resume, kills during a save, preemption, time budgets,
failing ranks, non-finite steps, and a checkpoint resharded from TP=2 to TP=1."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import TINY, read_metrics, run_cli

pytestmark = pytest.mark.dist

# 3 SFT steps then 3 point-wise DPO steps = iterations 1..6; checkpoints at stage steps 2
# and at each stage's end: iterations 2, 3 (SFT end), 5 and 6.
ARGS = ["train", *TINY, "train.sft_steps=3", "train.steps=3", "train.save_interval=2"]


def _by_iteration(run_dir):
    train = [m for m in read_metrics(run_dir) if m.get("split", "train") == "train"]
    return {m["iteration"]: m for m in train}


def _evals(run_dir):
    return {(m["stage"], m["step"]): m for m in read_metrics(run_dir) if m.get("split") == "eval"}


def _assert_same_curve(a, b, rtol=1e-6):
    ma, mb = _by_iteration(a), _by_iteration(b)
    assert sorted(ma) == sorted(mb) == list(range(1, 7))
    for it in ma:
        for key in ("loss", "grad_norm", "lr"):
            np.testing.assert_allclose(mb[it][key], ma[it][key], rtol=rtol, err_msg=f"{it} {key}")
    # evaluations after each stage's last update see the weights the updates produced
    ea, eb = _evals(a), _evals(b)
    assert (
        set(ea) == set(eb) == {("sft", 0), ("sft", 3), ("pointwise_dpo", 0), ("pointwise_dpo", 3)}
    )
    for key in ea:
        np.testing.assert_allclose(eb[key]["loss"], ea[key]["loss"], rtol=rtol, err_msg=str(key))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    run_cli([*ARGS, f"run_dir={run_dir}"])
    return run_dir


def _env(**extra):
    return {**os.environ, **extra}


@pytest.mark.parametrize("fault", ["exit@6", "exit@4", "kill_in_save@5"])
def test_resume_after_a_crash_reproduces_the_curve(uninterrupted, tmp_path, fault):
    crashed = run_cli([*ARGS, f"run_dir={tmp_path}"], check=False, env={"PWDPO_FAULT": fault})
    assert crashed.returncode != 0
    latest = int((tmp_path / "checkpoints" / "latest.txt").read_text())
    assert latest == {"exit@6": 5, "exit@4": 3, "kill_in_save@5": 3}[fault]
    run_cli([*ARGS, f"run_dir={tmp_path}"])  # resume=auto
    _assert_same_curve(uninterrupted, tmp_path)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)], ids=["tp2-to-tp1", "tp1-to-tp2"])
def test_resume_at_another_tensor_parallel_size_continues_the_curve(
    uninterrupted, tmp_path, before, after
):
    # the checkpoint at iteration 5 is mid-stage: Adam's moments are resharded on load
    crashed = run_cli(
        [*ARGS, f"run_dir={tmp_path}", f"parallel.tensor_parallel={before}"],
        nproc=before,
        check=False,
        env={"PWDPO_FAULT": "exit@6"},
    )
    assert crashed.returncode != 0
    assert int((tmp_path / "checkpoints" / "latest.txt").read_text()) == 5
    resumed = run_cli(
        [*ARGS, f"run_dir={tmp_path}", f"parallel.tensor_parallel={after}"], nproc=after
    )
    assert "RNG not restored" in resumed.stdout + resumed.stderr  # the layout changed
    _assert_same_curve(uninterrupted, tmp_path, rtol=2e-5)  # TP=2 = TP=1 to rounding


def test_a_reference_in_the_initial_checkpoint_is_read_not_copied_also_on_resume(
    uninterrupted, tmp_path
):
    import json
    import shutil

    init = tmp_path / "init"
    shutil.copytree(uninterrupted / "checkpoints", init)  # iterations 3, 5 and 6 kept
    dpo = [*ARGS, "train.sft_steps=0", f"train.init_checkpoint={init}"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    run_cli([*dpo, f"run_dir={full}"])
    proc = run_cli([*dpo, f"run_dir={crashed}"], check=False, env={"PWDPO_FAULT": "exit@3"})
    assert proc.returncode != 0
    for run in (full, crashed):  # no 141 GB copy at 70B: a record of where it is
        assert not (run / "checkpoints" / "reference").exists()
        record = json.loads((run / "checkpoints" / "reference.json").read_text())
        assert record == {"checkpoint": str((init / "iter_0000006").resolve())}
    # the initial checkpoint's latest.txt moves on; the resumed run keeps its reference
    (init / "latest.txt").write_text("5\n")
    run_cli([*dpo, f"run_dir={crashed}"])
    a, b = _by_iteration(full), _by_iteration(crashed)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for it in a:  # the loss depends on the reference through the implicit reward
        np.testing.assert_allclose(b[it]["loss"], a[it]["loss"], rtol=1e-6, err_msg=str(it))


def test_completed_run_resumes_to_nothing(uninterrupted):
    before = (uninterrupted / "metrics.jsonl").read_text()
    proc = run_cli([*ARGS, f"run_dir={uninterrupted}"])
    assert "already complete at iteration 6" in proc.stdout
    assert (uninterrupted / "metrics.jsonl").read_text() == before


def test_resume_never_refuses_a_used_run_dir(uninterrupted):
    proc = run_cli([*ARGS, f"run_dir={uninterrupted}", "resume=never"], check=False)
    assert proc.returncode == 2 and "resume=never" in proc.stderr


def test_time_budget_saves_and_exits_75_then_resumes(uninterrupted, tmp_path):
    proc = run_cli([*ARGS, f"run_dir={tmp_path}", "train.time_budget_s=0.001"], check=False)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "latest.txt").read_text().strip() == "1"
    while proc.returncode == 75:  # what slurm/train.sbatch does: requeue until done
        proc = run_cli([*ARGS, f"run_dir={tmp_path}", "train.time_budget_s=0.001"], check=False)
    assert proc.returncode == 0
    _assert_same_curve(uninterrupted, tmp_path)


def test_sigterm_saves_a_checkpoint_and_exits_75(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "megatron_pwdpo.cli",
        *ARGS,
        "train.steps=400",
        f"run_dir={tmp_path}",
    ]
    proc = subprocess.Popen(
        cmd,
        env=_env(OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (
        not metrics.exists() or '"pointwise_dpo", "step": 1' not in metrics.read_text()
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    latest = int((tmp_path / "checkpoints" / "latest.txt").read_text())
    assert 4 <= latest < 403
    assert "signal SIGTERM" in err


def test_nan_gradients_are_skipped_and_counted(tmp_path):
    run_cli([*ARGS, f"run_dir={tmp_path}"], env={"PWDPO_FAULT": "nan@2"})
    steps = _by_iteration(tmp_path)
    assert steps[1]["skipped_steps"] == 0 and steps[2]["skipped_steps"] == 1
    assert all(np.isfinite(steps[i]["loss"]) for i in range(3, 7))


def test_non_finite_steps_in_a_row_abort(tmp_path):
    proc = run_cli(
        [*ARGS, f"run_dir={tmp_path}", "train.max_bad_steps_in_a_row=1"],
        check=False,
        env={"PWDPO_FAULT": "nan@2"},
    )
    assert proc.returncode == 1
    assert "non-finite" in proc.stderr


@pytest.mark.parametrize("kind", ["raise", "exit"])
def test_a_failing_rank_ends_the_whole_run(tmp_path, kind):
    start = time.monotonic()
    proc = run_cli(
        [*ARGS, f"run_dir={tmp_path}", "timeout_s=30"],
        nproc=2,
        check=False,
        env={"PWDPO_FAULT": f"{kind}@2:1"},
        timeout=120,
    )
    assert proc.returncode != 0
    assert time.monotonic() - start < 100
    if kind == "raise":
        assert "rank 1 failed: RuntimeError: injected fault at step 2" in proc.stderr
    else:
        # torchrun's failure summary names the rank that died and its exit code
        assert re.search(r"rank\s*:\s*1\b", proc.stderr), proc.stderr[-3000:]
        assert re.search(r"exitcode\s*:\s*13\b", proc.stderr), proc.stderr[-3000:]


def test_tp2_checkpoint_loads_at_tp1_with_the_same_outputs(tmp_path):
    sft = [*TINY, "loss.name=sft", "train.steps=2"]
    run_cli(["train", *sft, "parallel.tensor_parallel=2", f"run_dir={tmp_path / 'tp2'}"], nproc=2)
    run_cli(
        [
            "train",
            *sft,
            "train.steps=0",
            f"run_dir={tmp_path / 'tp1'}",
            f"train.init_checkpoint={tmp_path / 'tp2' / 'checkpoints'}",
        ]
    )
    tp2_final = [m for m in read_metrics(tmp_path / "tp2") if m.get("split") == "eval"][-1]
    tp1_start = [m for m in read_metrics(tmp_path / "tp1") if m.get("split") == "eval"][0]
    assert tp2_final["step"] == 2 and tp1_start["step"] == 0
    np.testing.assert_allclose(tp1_start["loss"], tp2_final["loss"], rtol=1e-6)


def test_plot_draws_a_real_run(uninterrupted):
    proc = run_cli(["plot", str(uninterrupted)])
    png = uninterrupted / "curves.png"
    assert proc.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
