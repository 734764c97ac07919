"""Surviving long runs: preemption signals, time budgets, bad steps, injected faults.

* **Preemption.** SIGTERM (sent by Slurm and Kubernetes before a kill) and SIGUSR1
  (Slurm's ``--signal=USR1@secs``) only set a flag. At the next step boundary every
  rank agrees (one all-reduce of two flags) to save a checkpoint and exit with
  :data:`EXIT_PREEMPTED` (75); under ``slurm/common.sh`` (which sets
  :data:`REQUEUE_FILE_VAR`) they exit 0 instead and rank 0 leaves a marker file, which
  the batch script turns into a requeue.
* **Time limits.** ``train.time_budget_s``, and the Slurm job's end time (exported by
  ``slurm/common.sh``), do the same at the last step boundary from which a step and a
  save still fit, judged from the step and save times measured (:class:`StopRequest`).
* **Bad steps.** A non-finite loss or gradient norm skips the optimizer update and is
  counted; ``train.max_bad_steps_in_a_row`` of them in a row abort the run.
* **Fault injection** for tests: ``PWDPO_FAULT="<kind>@<step>[:<rank>]"`` (several
  separated by commas) with kind ``raise`` (an exception on that rank), ``exit`` (the
  process dies), ``stall`` (it hangs, as on a collective whose peer is gone), ``hold``
  (it waits for the file ``$PWDPO_FAULT_RELEASE`` to appear), ``nan``
  (NaN gradients at that step) or ``kill_in_save`` (SIGKILL in the middle of writing the
  checkpoint of that step). Steps count over the whole run (both stages).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again", the job should be requeued
# Set by slurm/common.sh: a file to create (rank 0) instead of exiting 75, so that every
# rank exits 0 under `srun --kill-on-bad-exit=1` and the batch script still requeues.
REQUEUE_FILE_VAR = "PWDPO_REQUEUE_FILE"


def write_requeue_marker(path: str, reason: str) -> None:
    """Ask the batch script to requeue the job (written whole: temp file + rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(reason + "\n")
    os.replace(tmp, path)


def exit_now(code: int) -> None:
    """Leave at once, without clean-up collectives that could wait on a dead peer; stop
    our own helper processes first (torch_dist's writer manager would outlive us)."""
    for child in multiprocessing.active_children():
        child.terminate()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def usr1_kept_from_helpers():
    """Block SIGUSR1 in this thread while helper processes may start (it arrives after).

    Slurm delivers a step's signals to every process of the step, not only to the ranks:
    torch_dist's writer starts a spawn-context ``Manager`` on the first save, which lives
    on and would die of the USR1 that asks for a checkpoint, breaking that very save
    (BrokenPipeError). Processes started in here inherit the blocked signal and never see
    it. (SIGTERM cannot be kept out this way: Python's resource tracker unblocks it.)
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


JOB_END_VAR = "PWDPO_JOB_END_TIME"  # epoch seconds; slurm/common.sh exports the job's end


class StopRequest:
    """Collects stop requests (signals, time budget, the job's end) and agrees on them.

    A deadline (``train.time_budget_s`` from the start, or the Slurm job's end time in
    ``$PWDPO_JOB_END_TIME``) stops the run at the last step boundary from which one more
    step and a checkpoint still fit: at step end, it stops when
    ``now + reserve > deadline``, with ``reserve = 1.5 * (longest step + longest save) +
    margin_s`` from the times measured in this run (:meth:`note_step`, :meth:`note_save`;
    ``known_save_s`` carries the save time measured before a requeue). Until a save has
    been timed, the save part is unknown and Slurm's ``USR1`` (``--signal=B:USR1@SECS``)
    is the backstop.
    """

    SAFETY = 1.5

    def __init__(
        self,
        *,
        time_budget_s: float | None,
        job_end: float | None = None,
        known_save_s: float = 0.0,
        margin_s: float = 30.0,
        clock=time.time,
    ):
        self.signal_name: str | None = None
        self.clock = clock
        now = clock()
        ends = [now + time_budget_s] if time_budget_s is not None else []
        if job_end is not None:
            ends.append(job_end)
        self.deadline = min(ends) if ends else None
        self.step_s, self.save_s, self.margin_s = 0.0, known_save_s, margin_s
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    @staticmethod
    def job_end_from_env(env: dict[str, str] | None = None) -> float | None:
        """``$PWDPO_JOB_END_TIME`` (epoch seconds), if set and a number."""
        value = (os.environ if env is None else env).get(JOB_END_VAR, "")
        try:
            return float(value) if value else None
        except ValueError:
            return None

    def _handler(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def note_step(self, seconds: float) -> None:
        self.step_s = max(self.step_s, seconds)

    def note_save(self, seconds: float) -> None:
        self.save_s = max(self.save_s, seconds)

    def reserve_s(self) -> float:
        """Seconds to keep before a deadline: one more step and one save, with margin."""
        return self.SAFETY * (self.step_s + self.save_s) + self.margin_s

    def over_time(self) -> bool:
        return self.deadline is not None and self.clock() + self.reserve_s() > self.deadline

    def agreed(self, device: torch.device) -> str | None:
        """The reason to stop now if any rank has one (a collective: call on every rank)."""
        flags = torch.tensor(
            [float(self.signal_name is not None), float(self.over_time())], device=device
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            return f"signal {self.signal_name or 'on another rank'}"
        if flags[1] > 0:
            return f"time limit (reserve {self.reserve_s():.0f} s for a step and a save)"
        return None


class BadStepCounter:
    """Counts skipped steps; raises after ``limit`` in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def update(self, ok: bool, step: int) -> None:
        if ok:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"step {step}: {self.in_a_row} steps in a row had a non-finite loss or "
                f"gradient norm (train.max_bad_steps_in_a_row={self.limit}); stopping"
            )


class FaultInjector:
    """Reads ``PWDPO_FAULT`` (see the module docstring); a no-op when it is unset.

    Several faults are separated by commas, e.g. ``exit@3:1,stall@3:0``.
    """

    def __init__(self, rank: int, env: dict[str, str] | None = None):
        spec = (os.environ if env is None else env).get("PWDPO_FAULT", "")
        self.faults: set[tuple[str, int]] = set()
        for one in filter(None, spec.split(",")):
            kind, _, where = one.strip().partition("@")
            step, _, on_rank = where.partition(":")
            if not on_rank or int(on_rank) == rank:
                self.faults.add((kind, int(step)))

    def at(self, kind: str, step: int) -> bool:
        return (kind, step) in self.faults

    def before_update(self, step: int, chunks: list[torch.nn.Module]) -> None:
        """Raise, die, or poison the gradients, as asked, just before the update."""
        if self.at("raise", step):
            raise RuntimeError(f"injected fault at step {step}")
        if self.at("exit", step):
            exit_now(13)
        if self.at("hold", step):
            release = Path(os.environ["PWDPO_FAULT_RELEASE"])
            while not release.exists():  # a test does something meanwhile, then releases
                time.sleep(0.1)
        if self.at("stall", step):
            while True:  # a rank stuck for good, as in a collective whose peer died
                time.sleep(60)
        if self.at("nan", step):
            for chunk in chunks:
                for param in chunk.parameters():
                    grad = getattr(param, "main_grad", None)
                    if grad is not None:
                        grad.fill_(float("nan"))

    def in_save(self, step: int) -> None:
        if self.at("kill_in_save", step):
            os.kill(os.getpid(), signal.SIGKILL)
