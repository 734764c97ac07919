"""A trainer killed with SIGKILL leaves no process behind, and the checkpoint it was
writing is not taken as complete.

torch_dist's checkpoint writer starts a spawn-context ``Manager`` (a child process) on the
first save; without ``megatron_pwdpo.lifetime`` it outlived a ``kill -9`` of the trainer.
Descendants are found by session: the trainer starts its own session here, which every
process it starts joins (none of them calls ``setsid``), and which survives reparenting.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY

from megatron_pwdpo.checkpoint import latest_checkpoint

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


def _train(run_dir: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    args = [*TINY, "train.sft_steps=0", "train.save_interval=1", f"run_dir={run_dir}", *extra]
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
    start from step 1's checkpoint, not from the half-committed one."""
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
    assert (root / "iter_0000002.tmp").is_dir()  # written, never committed
    assert latest_checkpoint(root) == root / "iter_0000001"
