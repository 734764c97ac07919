"""Launching ``python`` child processes (one, or ``torchrun`` with several ranks) that
cannot outlive their launcher.

Why not ``subprocess.run``: a run that saves a torch_dist checkpoint starts the
checkpoint writer's manager as a *grandchild* process. When the child exits (or is
killed after a timeout) that grandchild can live on: it keeps the child's stdout and
stderr open, so a reader of pipes waits forever, and it keeps running after the test,
benchmark or experiment step that started it. A rank that hangs in a collective does
the same to a launcher without a timeout. So :func:`run_group`

* starts the child in its own session, hence its own process group, which its
  children and grandchildren (torchrun's ranks, the writer) join unless they leave it;
* writes its output to files, never to pipes;
* waits with an optional timeout and, however the wait ends (exit, timeout, an
  exception such as ``KeyboardInterrupt``), kills the whole group with ``SIGKILL``.

A launcher that is itself launched this way (``experiment`` under a test's
:func:`run_group`) puts its own children in groups that the outer kill does not reach:
it runs its launches inside :func:`exit_on_sigterm`, and the outer :func:`run_group`
sends ``SIGTERM`` and waits ``grace`` seconds before its ``SIGKILL`` after a timeout.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import IO


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``--master-port``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def python_command(program: Sequence[str], *, nproc: int = 1) -> list[str]:
    """The command that runs ``python PROGRAM`` in one process, or ``nproc`` ranks of it.

    Args:
        program: what follows ``python``: ``["-m", module, *args]`` or
            ``[script, *args]``. ``torch.distributed.run`` takes the same two forms.
        nproc: processes; above 1 the program runs under ``torch.distributed.run`` on
            this node, with a free rendezvous port (several launches may run at once).
    """
    if nproc <= 1:
        return [sys.executable, *program]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        *program,
    ]


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    # ProcessLookupError: nobody is left in the group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def run_group(
    cmd: Sequence[str],
    *,
    stdout: IO | int,
    stderr: IO | int = subprocess.STDOUT,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    grace: float = 5.0,
    cwd: str | os.PathLike | None = None,
) -> int | None:
    """Run ``cmd`` in its own process group; kill the group when it ends.

    Args:
        cmd: the command (e.g. from :func:`python_command`).
        stdout: an open file (or descriptor) for the output. Not a pipe: a grandchild
            that outlives the child would hold it open.
        stderr: the same, or ``subprocess.STDOUT`` (default) for one log.
        env: the child's environment (default: this process's).
        timeout: seconds before the group is stopped; ``None`` waits as long as it runs.
        grace: after a timeout, seconds between ``SIGTERM`` (which lets a nested
            launcher stop its own groups, see :func:`exit_on_sigterm`) and ``SIGKILL``.
        cwd: the child's working directory (default: this process's).

    Returns:
        The child's exit code (negative: killed by that signal), ``None`` on timeout.
        Either way no process of the group is left running.
    """
    child = subprocess.Popen(
        list(cmd),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        env=None if env is None else dict(env),
        cwd=cwd,
        start_new_session=True,  # pgid == child.pid
    )
    try:
        try:
            return child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(child.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=grace)
            return None
    finally:
        # the group outlives the child while a grandchild (the checkpoint writer) lives
        _kill_group(child.pid, signal.SIGKILL)
        child.wait()


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """While active, ``SIGTERM`` and ``SIGHUP`` raise ``SystemExit`` in this process.

    A launcher that is stopped by ``SIGTERM`` would otherwise die without running the
    ``finally`` of :func:`run_group`, leaving the groups it started (in their own
    sessions, out of reach of a kill aimed at the launcher's group) running. Only the
    main thread can set signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
