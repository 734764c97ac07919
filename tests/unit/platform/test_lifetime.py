"""Forked helpers die with their parent, even when it is killed with SIGKILL (Linux)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")

# A parent that forks a sleeping child, prints its pid and dies of SIGKILL.
PARENT = """
import os, signal, sys, time
from megatron_pwdpo.platform import lifetime
if sys.argv[1] == "install":
    lifetime.install_in_trainer()
pid = os.fork()
if pid == 0:
    os.closerange(0, 3)  # an orphan must not hold the test's pipes open
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
time.sleep(0.5)  # the child's at-fork hook has run
os.kill(os.getpid(), signal.SIGKILL)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("install", [True, False])
def test_forked_child_dies_with_a_killed_parent(install):
    cmd = [sys.executable, "-c", PARENT, "install" if install else "no"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    child = int(out.stdout.split()[0])
    try:
        deadline = time.monotonic() + 2
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(child) is not install  # without the hook it lives on: the test can fail
    finally:
        if _alive(child):
            os.kill(child, 9)
