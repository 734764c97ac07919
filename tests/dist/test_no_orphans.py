"""A trainer killed with SIGKILL leaves no process behind, and the checkpoint it was
writing is not taken as complete.

torch_dist's checkpoint writer starts a spawn-context ``Manager`` (a child process) on the
first save; without ``megatron_pwdpo.platform.lifetime`` it outlived a ``kill -9`` of the trainer.
Descendants are found by session: the trainer starts its own session here, which every
process it starts joins (none of them calls ``setsid``), and which survives reparenting.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, read_metrics

from megatron_pwdpo.engine.checkpoint import latest_checkpoint

pytestmark = pytest.mark.dist


def session_members(sid: int) -> list[int]:
    """Pids of the live (not zombie) processes of session ``sid``, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _write_trl_pairs(path: Path, n: int = 40) -> Path:
    """TRL's paired format with an implicit prompt (``chosen``/``rejected`` only)."""
    with path.open("w") as f:
        for i in range(n):
            prompt = f"Question {i}: what colour is the sky?"
            record = {"chosen": f"{prompt} Blue, mostly.", "rejected": f"{prompt} Green."}
            f.write(json.dumps(record) + "\n")
    return path


def _train(run_dir: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``megatron-pwdpo train`` with DPO on a TRL paired file (format detected), saving
    every step, in a session of its own."""
    data = _write_trl_pairs(run_dir / "pairs.jsonl")
    args = [
        *TINY,
        f"data.path={data}",
        "loss.name=dpo",
        "train.sft_steps=0",
        "train.save_interval=1",
        f"run_dir={run_dir}",
        *extra,
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "megatron_pwdpo.cli", "train", *args],
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_sigkill_mid_save_leaves_no_descendant_and_no_complete_checkpoint(tmp_path):
    """SIGKILL while the checkpoint of step 2 is written (after step 1's save started the
    writer's helpers): within 5 s no process of the trainer is left, and resuming would
    start from step 1's checkpoint, not from the half-committed one. (The run trains DPO
    on a TRL paired file as it is: steps 1 and 2 complete before the kill.)"""
    root = tmp_path / "checkpoints"
    proc = _train(tmp_path, "train.steps=3", env={"PWDPO_FAULT": "kill_in_save@2"})
    try:
        assert proc.wait(timeout=240) == -signal.SIGKILL
        deadline = time.monotonic() + 5
        while session_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = session_members(proc.pid)
        assert not left, f"processes of the killed trainer still alive: {left}"
    finally:
        for pid in session_members(proc.pid):
            os.kill(pid, signal.SIGKILL)
    assert [m["step"] for m in read_metrics(tmp_path) if m.get("split") != "eval"] == [1, 2]
    assert (root / "iter_0000002.tmp").is_dir()  # written, never committed
    assert latest_checkpoint(root) == root / "iter_0000001"
