"""One run per ``run_dir``: a lock file that a second job on the same folder cannot take.

Two jobs writing one ``run_dir`` destroy each other's work: the second deletes the
first's ``iter_N.tmp``, rotates its checkpoints and rewrites its ``metrics.jsonl``. So
``train`` takes ``<run_dir>/.pwdpo.lock`` before it reads or writes anything there, on
rank 0 only (the ranks of one job share the folder by design; rank 0 stands for them).

* **The lock** is a POSIX record lock (``fcntl.lockf``) on that file, held for the whole
  run: the kernel (or the NFS server) drops it when the holding process ends, however it
  ends, so a crashed, killed or requeued job leaves no stale lock behind, and its
  requeued self takes it again. Two processes racing for it cannot both get it.
* **The record**: the holder writes ``{"host", "pid", "job", "since"}`` into the file,
  which names it in the one-line refusal the next one gets. A record also guards file
  systems whose locks are local to one node (Lustre mounted ``localflock``): a lock
  obtained over a record of a *different* Slurm job that ``squeue`` still lists as
  running is refused all the same.
* **No lock support** (``ENOLCK``, ``ENOSYS``..., e.g. Lustre without ``flock``): the
  record alone decides. It is stale, and taken over, when its holder is provably gone:
  the same host and a dead pid, the same Slurm job (an earlier run of a requeued job),
  or a Slurm job ``squeue`` no longer lists. Otherwise the run is refused, and the error
  says which file to delete once the holder is known to be gone. (Without a lock, two
  runs started in the same instant over a stale record can both get in.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_pwdpo.config import ConfigError

LOCK_NAME = ".pwdpo.lock"
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class RunDirLocked(ConfigError):
    """Another run holds the ``run_dir`` (the message names it)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run dir: host, pid, Slurm job id (None outside Slurm), start time."""

    host: str
    pid: int
    job: str | None
    since: str

    @classmethod
    def me(cls, env: dict[str, str] | None = None) -> Holder:
        env = os.environ if env is None else env
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            job=env.get("SLURM_JOB_ID"),
            since=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )

    def describe(self) -> str:
        job = f"Slurm job {self.job}" if self.job else "not a Slurm job"
        return f"host {self.host}, pid {self.pid}, {job}, since {self.since}"


def read_holder(text: str) -> Holder | None:
    """The holder a lock file names, or None (empty or unreadable: nobody)."""
    try:
        data = json.loads(text)
        return Holder(str(data["host"]), int(data["pid"]), data.get("job"), str(data["since"]))
    except (ValueError, KeyError, TypeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def slurm_job_alive(job: str) -> bool | None:
    """Whether ``squeue`` lists ``job`` as pending/running (None: cannot tell)."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    try:
        proc = subprocess.run(
            [squeue, "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        # squeue fails on an id it no longer knows ("Invalid job id specified")
        return False if "nvalid job id" in proc.stderr else None
    states = proc.stdout.split()
    return any(s not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for s in states)


def holder_gone(holder: Holder, me: Holder, job_alive=slurm_job_alive) -> bool:
    """Whether ``holder`` has provably stopped (see the module docstring)."""
    if holder.job is not None and holder.job == me.job:
        return True  # an earlier run of this very job (requeued): never two at once
    if holder.host == me.host:
        return holder.pid == me.pid or not _pid_alive(holder.pid)
    if holder.job is not None:
        return job_alive(holder.job) is False
    return False


class RunDirLock:
    """``<run_dir>/.pwdpo.lock``, held from :meth:`acquire` to :meth:`release` (or the
    process's end). Rank 0 of a run takes it; see the module docstring."""

    def __init__(self, run_dir: str | os.PathLike[str], *, job_alive=slurm_job_alive):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.job_alive = job_alive
        self.fd: int | None = None
        self.kernel_lock = False

    def _refuse(self, holder: Holder | None) -> RunDirLocked:
        who = holder.describe() if holder else "a process that wrote no record"
        return RunDirLocked(
            f"run_dir {self.run_dir} is in use by another run ({who}): wait for it to end or "
            f"use another run_dir (if that run is gone, delete {self.path})"
        )

    def acquire(self, me: Holder | None = None) -> RunDirLock:
        """Take the lock or raise :class:`RunDirLocked` naming the holder."""
        me = me or Holder.me()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.kernel_lock = True
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EACCES):
                    raise self._refuse(read_holder(_read(fd))) from None
                if err.errno not in _NO_LOCKS:
                    raise
            previous = read_holder(_read(fd))
            if previous is not None and not self._may_replace(previous, me):
                raise self._refuse(previous)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(asdict(me)) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # closing drops our record lock too
            raise
        self.fd = fd
        return self

    def _may_replace(self, previous: Holder, me: Holder) -> bool:
        if self.kernel_lock:
            # we hold the lock: the record is stale unless a node-local lock let us in
            # beside a live job elsewhere
            if previous.host == me.host or previous.job is None or previous.job == me.job:
                return True
            return self.job_alive(previous.job) is not True
        return holder_gone(previous, me, self.job_alive)

    def release(self) -> None:
        """Clear the record and drop the lock (also done by the process's end)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace")
