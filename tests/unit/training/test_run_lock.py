"""One run per run_dir (run_lock.py): a live holder in another process is refused, named;
a dead one's lock is taken over; without kernel locks the record decides."""

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from megatron_pwdpo.training.run_lock import (
    LOCK_NAME,
    Holder,
    RunDirLock,
    RunDirLocked,
    read_holder,
)

HOLD = textwrap.dedent(
    """
    import sys, time
    from megatron_pwdpo.training.run_lock import RunDirLock
    RunDirLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(120)
    """
)


def _holder_process(run_dir, job="4242"):
    env = {**os.environ, "SLURM_JOB_ID": job}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_naming_the_holder_then_takes_over_a_dead_one(tmp_path):
    proc = _holder_process(tmp_path)
    try:
        with pytest.raises(RunDirLocked) as err:
            RunDirLock(tmp_path).acquire()
        message = str(err.value)
        assert "\n" not in message
        assert f"pid {proc.pid}" in message and "Slurm job 4242" in message
        assert f"host {os.uname().nodename}" in message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the holder died without cleaning up: its record is still there ...
    assert read_holder((tmp_path / LOCK_NAME).read_text()).pid == proc.pid
    # ... and the kernel dropped its lock: taken over, the record now names us
    lock = RunDirLock(tmp_path).acquire()
    assert read_holder((tmp_path / LOCK_NAME).read_text()).pid == os.getpid()
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""  # a clean end leaves no record


def _record(path, **fields):
    holder = {"host": "node-a", "pid": 1, "job": None, "since": "then", **fields}
    (path / LOCK_NAME).write_text(json.dumps(holder))


def _me(job=None, host="node-b"):
    return Holder(host=host, pid=os.getpid(), job=job, since="now")


@pytest.fixture
def no_kernel_locks(monkeypatch):
    def lockf(fd, cmd):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", lockf)


@pytest.mark.parametrize(
    "record, me, job_alive, taken",
    [
        ({"job": "10"}, _me(job="10"), None, True),  # requeue of the same job
        ({"job": "10"}, _me(job="11"), True, False),  # another live job elsewhere
        ({"job": "10"}, _me(job="11"), False, True),  # squeue: that job is over
        ({"job": "10"}, _me(job="11"), None, False),  # cannot tell: refuse
        ({}, _me(), None, False),  # another host, no job: cannot tell
        ({"host": "node-b", "pid": 2**22 + 12345}, _me(), None, True),  # dead pid, same host
        ({"host": "node-b", "pid": os.getppid()}, _me(), None, False),  # live pid, same host
    ],
)
def test_without_kernel_locks_the_record_decides(
    tmp_path, no_kernel_locks, record, me, job_alive, taken
):
    _record(tmp_path, **record)
    lock = RunDirLock(tmp_path, job_alive=lambda job: job_alive)
    if taken:
        lock.acquire(me)
        assert read_holder((tmp_path / LOCK_NAME).read_text()) == me
        lock.release()
    else:
        with pytest.raises(RunDirLocked, match="node-a" if "host" not in record else "node-b"):
            lock.acquire(me)


def test_a_node_local_lock_does_not_let_a_second_job_in_beside_a_live_one(tmp_path):
    # Lustre mounted localflock: our lock succeeds though job 10 runs on node-a
    _record(tmp_path, job="10")
    with pytest.raises(RunDirLocked, match="Slurm job 10"):
        RunDirLock(tmp_path, job_alive=lambda job: True).acquire(_me(job="11"))
    RunDirLock(tmp_path, job_alive=lambda job: False).acquire(_me(job="11")).release()
