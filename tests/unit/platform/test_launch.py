"""launch.py: the launched process group never outlives its launcher (a grandchild such as
torch_dist's writer manager included), output goes to files, and torchrun commands."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from megatron_pwdpo.platform.launch import python_command, run_group

SRC = str(Path(__file__).resolve().parents[3])

# Starts a sleeping grandchild in its own group (the default for a child process) and
# prints its pid; then exits or, with "hang", sleeps too (ignoring SIGTERM).
PARENT = """
import signal, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(grandchild.pid, flush=True)
if sys.argv[1] == "hang":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(120)
"""

# A launcher launched by run_group: its own child goes to a group of its own, which only
# its exit_on_sigterm + run_group can stop.
NESTED = f"""
import subprocess, sys
sys.path.insert(0, {SRC!r})
from megatron_pwdpo.platform.launch import exit_on_sigterm, run_group
with exit_on_sigterm():
    run_group([sys.executable, "-c", {PARENT!r}, "hang"], stdout=sys.stdout)
"""


def _dead(pid: int, within: float = 5.0) -> bool:
    """``pid`` is gone, or a zombie: dead, waiting for init to reap it (this machine's
    init does not reap orphans, so a killed orphan stays a zombie)."""
    deadline = time.monotonic() + within
    while True:
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (ProcessLookupError, FileNotFoundError):
            return True
        if state == "Z":
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _pids(path: Path) -> list[int]:
    return [int(word) for word in path.read_text().split()]


def test_an_orphaned_grandchild_is_killed_when_the_child_exits(tmp_path):
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        code = run_group([sys.executable, "-c", PARENT, "exit"], stdout=f, timeout=60)
    assert code == 0
    (grandchild,) = _pids(out)
    assert _dead(grandchild)


def test_a_timeout_returns_none_and_kills_the_group(tmp_path):
    out = tmp_path / "out.txt"
    start = time.monotonic()
    with open(out, "w") as f:
        code = run_group([sys.executable, "-c", PARENT, "hang"], stdout=f, timeout=2, grace=0.5)
    assert code is None
    assert time.monotonic() - start < 30  # not the children's 120 s sleeps
    (grandchild,) = _pids(out)
    assert _dead(grandchild)


def test_a_nested_launcher_stops_its_own_groups_on_sigterm(tmp_path):
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        code = run_group([sys.executable, "-c", NESTED], stdout=f, timeout=5, grace=10)
    assert code is None
    # the nested launcher's child and its grandchild: in another session, killed by the
    # nested run_group's finally (SIGTERM -> SystemExit), not by the outer SIGKILL
    (great_grandchild,) = _pids(out)
    assert _dead(great_grandchild)


def test_output_lands_in_the_files(tmp_path):
    script = "import sys; print('to stdout'); print('to stderr', file=sys.stderr); sys.exit(3)"
    with open(tmp_path / "o", "w") as o, open(tmp_path / "e", "w") as e:
        assert run_group([sys.executable, "-c", script], stdout=o, stderr=e) == 3
    assert (tmp_path / "o").read_text() == "to stdout\n"
    assert (tmp_path / "e").read_text() == "to stderr\n"
    with open(tmp_path / "both", "w") as both:  # stderr defaults to the same file
        assert run_group([sys.executable, "-c", script], stdout=both) == 3
    assert sorted((tmp_path / "both").read_text().splitlines()) == ["to stderr", "to stdout"]


def test_environment_and_exit_codes(tmp_path):
    script = "import os, sys; sys.exit(int(os.environ['CODE']))"
    with open(tmp_path / "log", "w") as log:
        code = run_group(
            [sys.executable, "-c", script], stdout=log, env={**os.environ, "CODE": "0"}
        )
        assert code == 0
        code = run_group(
            [sys.executable, "-c", script], stdout=log, env={**os.environ, "CODE": "7"}
        )
        assert code == 7


def test_commands():
    assert python_command(["-m", "megatron_pwdpo.cli", "train"]) == [
        sys.executable,
        "-m",
        "megatron_pwdpo.cli",
        "train",
    ]
    assert python_command(["bench/gpu.py", "--x"], nproc=1) == [
        sys.executable,
        "bench/gpu.py",
        "--x",
    ]
    cmd = python_command(["-m", "megatron_pwdpo.cli", "train", "a=1"], nproc=4)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[3] == "--nproc-per-node=4"
    assert cmd[4].startswith("--master-port=")
    assert cmd[5:] == ["-m", "megatron_pwdpo.cli", "train", "a=1"]
    port = int(cmd[4].split("=", 1)[1])
    assert 1024 <= port < 65536
    with socket.socket() as sock:  # free: it can be bound
        sock.bind(("127.0.0.1", port))
    assert python_command(["bench/gpu.py"], nproc=2)[5:] == ["bench/gpu.py"]


def test_torchrun_accepts_the_command(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text("import os; print('rank', os.environ['RANK'], os.environ['WORLD_SIZE'])\n")
    with open(tmp_path / "log", "w") as log:
        code = run_group(python_command([str(script)], nproc=2), stdout=log, timeout=120)
    text = (tmp_path / "log").read_text()
    assert code == 0, text
    assert sorted(line for line in text.splitlines() if line.startswith("rank")) == [
        "rank 0 2",
        "rank 1 2",
    ]


def test_subprocess_constants_are_accepted():
    assert run_group([sys.executable, "-c", "print('x')"], stdout=subprocess.DEVNULL) == 0
