"""``slurm/train.sbatch`` on a real one-node Slurm (Debian's 22.05, started here).

The tiny CPU model on 2 tasks (gloo, ranks from ``SLURM_PROCID``/``SLURM_NTASKS``):
the job trains and checkpoints; then the same job is sent USR1 the way
``#SBATCH --signal=B:USR1@SECS`` sends it before a time limit, saves, asks for a requeue,
requeues itself and resumes, and ends with the uninterrupted run's per-step losses,
while a second job submitted on its run_dir is refused. A job whose rank dies ends
within a minute. The convert job
exports the trained model, and the precompute-ref job on 2 tasks writes the cache that one
process writes.

Slurm and munge are installed with apt-get when missing (root only; otherwise the tests
are skipped, saying why). One cluster serves the module (see ``slurm_cluster.py``).
Run them alone with ``pytest -m slurm``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, run_cli
from slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_installed

from megatron_pwdpo.reference.cache import read_cache

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
STEPS = 30  # DPO steps after 2 SFT steps: iterations 1..32
ARGS = [*TINY, "train.sft_steps=2", f"train.steps={STEPS}", "timeout_s=120"]
# The scripts' #SBATCH lines ask for nodes of 8 GPUs; the test node has 4 CPUs and no GPU.
# --exclusive=user: jobs of this user share the node (the scripts ask for --exclusive)
ONE_NODE = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--exclusive=user"]
TWO_TASKS = [*ONE_NODE, "--ntasks-per-node=2"]


@pytest.fixture(scope="module")
def cluster():
    try:
        installed_s = ensure_installed()
    except SlurmUnavailable as err:
        pytest.skip(str(err))
    root = Path(tempfile.mkdtemp(prefix="pwdpo-slurm-"))  # short: munge's socket path
    start = time.monotonic()
    try:
        with SlurmCluster(root) as c:
            print(
                f"\nslurm: installed in {installed_s:.1f} s, up in {time.monotonic() - start:.1f} s"
            )
            yield c
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _submit(
    cluster: SlurmCluster,
    script: str,
    workdir: Path,
    args: list[str],
    resources: list[str],
    env: dict[str, str] | None = None,
) -> int:
    """``sbatch RESOURCES slurm/SCRIPT ARGS``, the job running in ``workdir``."""
    env = {
        "PWDPO_PYTHON": sys.executable,
        "PWDPO_HOME": str(REPO),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        "PWDPO_FAULT": "",
        **(env or {}),
    }
    return cluster.sbatch(
        [
            *resources,
            f"--chdir={workdir}",
            f"--output={workdir}/slurm-%j.out",
            str(REPO / "slurm" / script),
            *args,
        ],
        env=env,
    )


def _submit_train(
    cluster: SlurmCluster, workdir: Path, run_dir: Path, *extra: str, env=None
) -> int:
    config = str(REPO / "examples" / "tiny_cpu.yaml")
    return _submit(
        cluster,
        "train.sbatch",
        workdir,
        [config, *ARGS, f"run_dir={run_dir}", *extra],
        TWO_TASKS,
        env=env,
    )


def _output(workdir: Path, job_id: int) -> str:
    path = workdir / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else "(no job output)"


def _train_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    losses = {}
    for row in rows:
        if row.get("split", "train") == "train":
            assert row["iteration"] not in losses, f"iteration {row['iteration']} logged twice"
            losses[row["iteration"]] = row["loss"]
    return losses


def _check_finished(run_dir: Path) -> None:
    assert (run_dir / "config.yaml").exists()
    assert int((run_dir / "checkpoints" / "latest.txt").read_text()) == STEPS + 2
    assert (run_dir / "checkpoints" / f"iter_{STEPS + 2:07d}").is_dir()
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """One job run to the end: (workdir, run_dir, job id, scontrol's fields)."""
    workdir = tmp_path_factory.mktemp("job")
    run_dir = workdir / "run"
    start = time.monotonic()
    job_id = _submit_train(cluster, workdir, run_dir)
    info = cluster.wait(job_id, timeout=240)
    print(f"\nslurm: train job {job_id} {info['JobState']} in {time.monotonic() - start:.1f} s")
    return workdir, run_dir, job_id, info


def test_train_job_trains_and_checkpoints(cluster, uninterrupted):
    workdir, run_dir, job_id, info = uninterrupted
    out = _output(workdir, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        f"{info['JobState']} {info['ExitCode']}\n{out[-5000:]}\n{cluster.log_tail()}"
    )
    # two Slurm tasks formed one gloo world through MASTER_ADDR/MASTER_PORT from the script
    assert "world 2: tp 1 pp 1 dp 2; backend gloo" in out
    assert f"rendezvous {info['NodeList']}:{20000 + job_id % 10000}" in out
    # the job's end (4 h after its start, from squeue) reached the run as its time limit
    limit = re.search(r"time limit (\S+ \S+): stops", out)
    assert limit, out[-3000:]
    end = time.mktime(time.strptime(limit.group(1), "%Y-%m-%d %H:%M:%S"))
    assert abs(end - (time.time() + 4 * 3600)) < 600, limit.group(0)
    assert "in use by" not in out and not (run_dir / ".pwdpo.lock").read_text()
    assert sorted(_train_losses(run_dir)) == list(range(1, STEPS + 3))
    _check_finished(run_dir)


def _wait_for_iteration(run_dir: Path, iteration: int, *, timeout: float) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and f'"iteration": {iteration},' in metrics.read_text():
            return
        time.sleep(0.1)
    raise TimeoutError(f"iteration {iteration} not reached in {timeout} s")


def test_usr1_requeues_and_resumes_and_a_second_job_on_the_run_dir_is_refused(
    cluster, uninterrupted, tmp_path
):
    run_dir, release = tmp_path / "run", tmp_path / "release"
    start = time.monotonic()
    # both ranks wait before the update of iteration 4 until `release` exists
    hold = {"PWDPO_FAULT": "hold@4", "PWDPO_FAULT_RELEASE": str(release)}
    job_id = _submit_train(cluster, tmp_path, run_dir, env=hold)
    try:
        _wait_for_iteration(run_dir, 3, timeout=240)  # 2 SFT steps, then 1 DPO step
        # a second job on the same run_dir is refused by its rank 0 (the lock), and
        # srun --kill-on-bad-exit ends its other rank: it fails fast, touching nothing
        other = tmp_path / "other"
        other.mkdir()
        second = _submit_train(cluster, other, run_dir)
        second_info = cluster.wait(second, timeout=180)
        release.touch()
        _wait_for_iteration(run_dir, 4, timeout=60)
        second_out = _output(other, second)
        assert second_info["JobState"] == "FAILED", second_out[-3000:]
        refusal = [line for line in second_out.splitlines() if "is in use by" in line]
        assert refusal and f"Slurm job {job_id}," in refusal[0], second_out[-3000:]
        assert "host " in refusal[0] and "pid " in refusal[0]
        # what `#SBATCH --signal=B:USR1@900` does 900 s before the time limit
        cluster.run(["scancel", "--batch", "--signal=USR1", str(job_id)])
        info = cluster.wait(job_id, timeout=240)
    finally:
        print(f"\nslurm: requeued job {job_id} done in {time.monotonic() - start:.1f} s")
    out = _output(tmp_path, job_id)
    context = f"{info['JobState']} {info['ExitCode']}\n{out[-6000:]}\n{cluster.log_tail()}"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", context
    assert info["Restarts"] == "1", context
    assert "got SIGUSR1" in out and "asked for a requeue: requeueing" in out, context
    assert not list(tmp_path.glob(".pwdpo-requeue-*")), context
    assert "restart 1" in out and "resumed 'pointwise_dpo' at step" in out, context
    # the first run stopped early and saved there; the requeued one finished the run ...
    saved = [int(n) for n in re.findall(r"saved checkpoint \S*/iter_(\d+)", out)]
    assert 4 <= min(s for s in saved if s > 2) < STEPS + 2, context
    _check_finished(run_dir)
    # ... with the per-step losses of the run that was never interrupted
    expected, got = _train_losses(uninterrupted[1]), _train_losses(run_dir)
    assert sorted(got) == sorted(expected)
    iterations = sorted(got)
    np.testing.assert_allclose(
        [got[i] for i in iterations], [expected[i] for i in iterations], rtol=1e-5
    )


def test_a_rank_that_fails_ends_the_job_within_a_minute(cluster, tmp_path):
    # rank 1 dies at step 3 while rank 0 hangs there for good (as on a collective whose
    # peer is gone, under NCCL); timeout_s is 10 minutes: only srun --kill-on-bad-exit
    # can end the job sooner
    run_dir = tmp_path / "run"
    job_id = _submit_train(
        cluster, tmp_path, run_dir, "timeout_s=600", env={"PWDPO_FAULT": "exit@3:1,stall@3:0"}
    )
    _wait_for_iteration(run_dir, 2, timeout=180)
    failed_at = time.monotonic()
    info = cluster.wait(job_id, timeout=120)
    took = time.monotonic() - failed_at
    out = _output(tmp_path, job_id)
    print(f"\nslurm: job {job_id} {info['JobState']} {took:.1f} s after iteration 2")
    assert info["JobState"] == "FAILED" and took < 60, f"{took:.0f} s\n{out[-4000:]}"
    assert info["Restarts"] == "0" and "requeueing" not in out
    assert int((run_dir / "checkpoints" / "latest.txt").read_text()) == 2  # end of SFT


def test_convert_job_exports_the_trained_model(cluster, uninterrupted, tmp_path):
    out = tmp_path / "hf"
    args = ["mcore-to-hf", "--ckpt", str(uninterrupted[1]), "--out", str(out)]
    start = time.monotonic()
    resources = [*ONE_NODE, "--mem=0"]  # the script asks for 200G (a 70B model)
    job_id = _submit(cluster, "convert.sbatch", tmp_path, [*args, "--timeout-s=120"], resources)
    info = cluster.wait(job_id, timeout=180)
    print(f"\nslurm: convert job {job_id} {info['JobState']} in {time.monotonic() - start:.1f} s")
    assert info["JobState"] == "COMPLETED", f"{info['ExitCode']}\n{_output(tmp_path, job_id)}"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 2
    assert (out / "model.safetensors").stat().st_size > 0


def test_precompute_ref_job_writes_the_cache_one_process_would(cluster, uninterrupted, tmp_path):
    # 2 tasks = 2 data-parallel replicas split the rows; the cache must not depend on it
    config = str(REPO / "examples" / "tiny_cpu.yaml")
    common = [*TINY, f"train.init_checkpoint={uninterrupted[1] / 'checkpoints'}"]
    job_id = _submit(
        cluster, "precompute_ref.sbatch", tmp_path, [config, "ref.npz", *common], TWO_TASKS
    )
    info = cluster.wait(job_id, timeout=240)
    out = _output(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED", f"{info['ExitCode']}\n{out[-5000:]}"
    assert "2 tasks" in out and "wrote" in out, out[-3000:]
    run_cli(["precompute-ref", "--config", config, "--out", str(tmp_path / "one.npz"), *common])
    job, one = read_cache(tmp_path / "ref.npz"), read_cache(tmp_path / "one.npz")
    assert len(job["ids"]) == len(one["ids"]) > 1000
    assert job["ids"].tolist() == one["ids"].tolist()
    assert job["fingerprint"] == one["fingerprint"]
    np.testing.assert_allclose(job["logps"], one["logps"], rtol=1e-5)
    assert np.all(job["logps"] < 0)
