"""Helper processes die with the trainer, even after a ``kill -9`` (Linux).

torch_dist's checkpoint writer starts a spawn-context ``multiprocessing.Manager`` on the
first save (a grandchild of whoever launched the trainer) and forks writer processes;
torch's data loaders fork workers. A trainer killed with SIGKILL runs no clean-up code, so
such a child lived on (holding memory) for as long as nobody killed it. Linux can do it
for us: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` in a child makes the kernel send it SIGKILL
when its parent dies. The command line sets it in every child the trainer starts:

* **forked** children (``fork`` context, data-loader workers, forks of forks): an
  ``os.register_at_fork`` hook (`install_in_trainer`) runs in each child right after the
  fork, with the parent's pid noted just before it;
* **spawned** children (``spawn`` context, such as the writer's ``Manager``): a fresh
  interpreter that imports the parent's main module (``megatron_pwdpo.cli``, or the
  ``megatron-pwdpo`` script that imports it) before it does anything else; that import
  sees `importing_in_spawned_child` and calls `install_in_spawned_child`, which finds the
  parent's pid in :data:`PARENT_ENV` (set by the parent, inherited with the environment).

Both check after the ``prctl`` that the parent is still the one expected: a parent that
died between starting the child and the ``prctl`` would otherwise leave it orphaned.
Python's ``resource_tracker`` (also spawned) exits by itself once every process holding
its pipe is gone. Elsewhere (not Linux) these functions do nothing.

The signal goes out when the *thread* that started the child exits; the trainer starts
its helpers from its main thread, which lives as long as the process.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
PARENT_ENV = "MEGATRON_PWDPO_PARENT_PID"

_prctl: Callable[..., int] | None = None
_forking_parent: int | None = None


def _load_prctl() -> Callable[..., int] | None:
    global _prctl
    if _prctl is None and sys.platform.startswith("linux"):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    return _prctl


def die_with_parent(expected_parent: int | None, *, sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies.

    Args:
        expected_parent: the parent's pid; if ``os.getppid()`` differs once the request
            is in place, the parent is already gone and this process exits at once.
        sig: the signal (SIGKILL: nothing can delay it).

    Returns:
        Whether the request is in place (False off Linux).
    """
    prctl = _load_prctl()
    if prctl is None or prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)  # orphaned before the request: nobody would ever signal us
    return True


def _before_fork() -> None:
    global _forking_parent
    _forking_parent = os.getpid()


def _after_fork_in_child() -> None:
    die_with_parent(_forking_parent)
    os.environ[PARENT_ENV] = str(os.getpid())


def install_in_trainer() -> None:
    """In the trainer: its forked children die with it (at-fork hook), and spawned ones
    find its pid in :data:`PARENT_ENV`. Idempotent."""
    os.environ[PARENT_ENV] = str(os.getpid())
    if _load_prctl() is not None and _forking_parent is None:
        _before_fork()  # also marks the hooks as registered
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def importing_in_spawned_child() -> bool:
    """True while a spawn-context child runs its parent's main module (``spawn.prepare``
    marks the process as ``_inheriting`` for exactly that time; ``sys.argv`` is already
    the parent's then, so it cannot tell)."""
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def install_in_spawned_child() -> None:
    """In a spawned child, as early as possible: die with the parent named by
    :data:`PARENT_ENV`, and become the parent its own children expect."""
    parent = os.environ.get(PARENT_ENV)
    if parent is None or not parent.isdigit():
        return
    die_with_parent(int(parent))
    install_in_trainer()
