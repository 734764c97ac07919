"""The training loop: stages of optimizer steps, with evaluation, checkpoints and stops.

``train`` checks the run, plans it (:mod:`~megatron_pwdpo.training.plan`: the SFT and main
stages, and the checkpoint a resumed run continues from), opens it
(:mod:`~megatron_pwdpo.training.start`: process groups, run directory, log), then hands
each stage still to run to :meth:`Runner.run_stage`. A :class:`Runner` is the
:class:`~megatron_pwdpo.training.step_work.StepWork` of every step (micro-batches,
reference log-probs, Megatron's schedule, the optimizer step) plus what a stage adds: the
sampler, periodic evaluation and checkpoints (:mod:`~megatron_pwdpo.training.saving`), and
stops on signals or the time budget. A resumed stage reloads its optimizer and
LR-schedule state; the data order needs nothing more (the sampler's only state is the step).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch

from megatron_pwdpo.config import RunConfig
from megatron_pwdpo.config.validation import validate
from megatron_pwdpo.data.prepare import PreparedData, prepare_data
from megatron_pwdpo.data.sampler import GlobalBatchSampler
from megatron_pwdpo.engine import checkpoint
from megatron_pwdpo.engine.setup import Layout, build_optimizer
from megatron_pwdpo.platform import distributed
from megatron_pwdpo.platform.resilience import BadStepCounter, StopRequest
from megatron_pwdpo.reference.strategies import build_reference
from megatron_pwdpo.training.observe import RunLog, final_summary
from megatron_pwdpo.training.plan import (
    ResumePoint,
    Stage,
    check_init_checkpoint,
    follow_checkpoint_optimizer,
    plan_stages,
    resume_point,
    stages_to_run,
)
from megatron_pwdpo.training.run_lock import RunDirLock
from megatron_pwdpo.training.saving import (
    read_save_seconds,
    save_training_checkpoint,
    save_untrained,
    write_save_seconds,
)
from megatron_pwdpo.training.start import open_run
from megatron_pwdpo.training.step_work import StepWork


class Preempted(Exception):
    """A checkpoint was saved because of a signal or the time budget; exit and requeue."""


class Runner(StepWork):
    """A :class:`StepWork` with what the stages share: the log, checkpoints, stops."""

    def __init__(self, config: RunConfig, data: PreparedData, layout: Layout, log: RunLog):
        super().__init__(config, data, layout)
        self.log = log
        self.ckpt_root = Path(config.run_dir) / "checkpoints"
        self.stop = StopRequest(
            time_budget_s=config.train.time_budget_s,
            job_end=StopRequest.job_end_from_env(),
            known_save_s=read_save_seconds(self.ckpt_root),
        )
        if self.stop.deadline is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.stop.deadline))
            log.info(
                f"time limit {when}: stops at the last step from which a step and a save "
                f"fit (save time so far {self.stop.save_s:.1f} s)"
            )
        self.bad_steps = BadStepCounter(config.train.max_bad_steps_in_a_row)

    def run_stage(self, stage: Stage, *, resume_from: Path | None) -> dict[str, float]:
        """Optimise one stage from its start, or from ``resume_from`` within it."""
        t = self.config.train
        optimizer, scheduler = build_optimizer(self.policy, t, lr=stage.lr, steps=stage.steps)
        first = 1
        if resume_from is not None:
            common = checkpoint.load_checkpoint(self.policy, resume_from, optimizer=optimizer)
            scheduler.num_steps = 0  # load_state_dict *adds* the saved step count
            scheduler.load_state_dict(common["scheduler"])
            first = common["stage_step"] + 1
            self.log.info(f"resumed '{stage.name}' at step {first} from {resume_from}")
        labels = None if isinstance(stage.examples[0], tuple) else [r.label for r in stage.examples]
        sampler = GlobalBatchSampler(
            len(stage.examples),
            global_batch_size=t.global_batch_size,
            seed=t.seed,
            labels=labels,
            balance=self.config.data.balance_classes and stage.loss.name != "sft",
        )
        self.log.info(
            f"stage '{stage.name}': {stage.steps} steps on {len(stage.examples)} examples, "
            f"loss {stage.loss.name}, lr {stage.lr:g}"
        )
        last_eval = self._eval_and_log(stage, 0) if first == 1 else {}
        self.log.start_stage(stage.name, stage.steps - first + 1)
        for step in range(first, stage.steps + 1):
            iteration, start = stage.offset + step, time.perf_counter()
            indices = sampler.global_batch((step - 1) * t.global_batch_size)
            lr = optimizer.param_groups[0]["lr"]
            metrics, ok, grad_norm, tokens = self.train_step(
                stage, [stage.examples[i] for i in indices], iteration, optimizer
            )
            if ok:
                scheduler.step(increment=1)
            self.bad_steps.update(ok, iteration)
            entry = {
                "stage": stage.name,
                "step": step,
                "iteration": iteration,
                **metrics,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens / (time.perf_counter() - start),
                "skipped_steps": self.bad_steps.total,
                **self.reference_stats,
            }
            self.log.record(entry, show=step % t.log_interval == 0, advance=True)
            if step % t.eval_interval == 0 or step == stage.steps:
                last_eval = self._eval_and_log(stage, step)
            self.stop.note_step(time.perf_counter() - start)
            stop = self.stop.agreed(distributed.device())
            periodic = t.save_interval > 0 and step % t.save_interval == 0
            if stop or periodic or step == stage.steps:
                self._save(stage, step, optimizer, scheduler)
            if stop:
                self.log.end_stage()
                raise Preempted(f"stopped at iteration {iteration} ({stop}); checkpoint saved")
        self.log.end_stage()
        return last_eval

    def _save(self, stage: Stage, step: int, optimizer, scheduler) -> None:
        iteration = stage.offset + step
        start = time.perf_counter()
        path = save_training_checkpoint(
            self.policy,
            self.ckpt_root,
            config=self.config,
            stage=stage,
            step=step,
            optimizer=optimizer,
            scheduler=scheduler,
            skipped_steps=self.bad_steps.total,
            before_commit=partial(self.faults.in_save, iteration),
        )
        seconds = time.perf_counter() - start  # ends in a barrier: the slowest rank's time
        self.stop.note_save(seconds)
        if torch.distributed.get_rank() == 0:
            write_save_seconds(self.ckpt_root, self.stop.save_s)
        self.log.info(f"saved checkpoint {path} in {seconds:.1f} s")

    def _eval_and_log(self, stage: Stage, step: int) -> dict[str, float]:
        metrics = self.evaluate(stage)
        if metrics:
            self.log.record(
                {
                    "stage": stage.name,
                    "split": "eval",
                    "step": step,
                    "iteration": stage.offset + step,
                    **metrics,
                }
            )
        return metrics

    def set_reference(self, *, resumed: bool) -> None:
        """The main stage's reference (``reference.mode``, :mod:`megatron_pwdpo.reference`):
        resident and offload references are saved as ``checkpoints/reference``, or, in a
        resumed stage, loaded from it; a cache is checked against this run."""
        self.reference = build_reference(
            self.config,
            policy=self.policy,
            data=self.data,
            ckpt_root=self.ckpt_root,
            resumed=resumed,
            forward_backward_func=self.fb,
            is_last_stage=self.layout.is_last_stage,
            info=self.log.info,
        )


def _start(config: RunConfig, data: PreparedData, resume: ResumePoint | None) -> Runner:
    """The run opened (:func:`~megatron_pwdpo.training.start.open_run`) and a runner whose
    policy holds the starting weights: the resume point's, else
    ``train.init_checkpoint``'s, else a fresh initialisation."""
    layout, log = open_run(config, data, resume)
    runner = Runner(config, data, layout, log)
    if resume is not None:
        checkpoint.load_checkpoint(runner.policy, resume.path)
        runner.bad_steps.total = resume.common.get("skipped_steps", 0)
    elif config.train.init_checkpoint:
        checkpoint.load_checkpoint(runner.policy, config.train.init_checkpoint)
        log.info(f"initial policy from {config.train.init_checkpoint}")
    return runner


def train(config: RunConfig) -> dict[str, float]:
    """Run (or resume) training as configured; returns the final held-out metrics.

    Everything that can refuse the run (config, data, initial checkpoint, ``run_dir``)
    is checked before any process group exists.

    Raises:
        ConfigError: the run cannot start as configured.
        Preempted: a checkpoint was saved on a signal or the time budget.
    """
    started = time.perf_counter()
    world = distributed.world_from_env()
    validate(config, world_size=world.world_size)
    RunLog.check_logging(config)  # a requested TensorBoard / W&B package is installed
    if config.train.init_checkpoint:
        check_init_checkpoint(config)
    # one run per run_dir, held by rank 0 until it exits (run_lock.py); a refused rank 0
    # exits 2 and srun --kill-on-bad-exit / torchrun stop the other ranks
    lock = RunDirLock(config.run_dir).acquire() if world.rank == 0 else None
    try:
        return _train(config, started=started)
    finally:
        if lock is not None:
            lock.release()


def _train(config: RunConfig, *, started: float) -> dict[str, float]:
    data = prepare_data(config.data, vocab_size=config.model.vocab_size)  # before any group
    stages = plan_stages(config, data)
    resume = resume_point(config)
    if resume is not None:
        config = follow_checkpoint_optimizer(config, resume.common, path=resume.path)
    runner = _start(config, data, resume)
    final: dict[str, float] = {}
    for stage, resume_from in stages_to_run(stages, resume):
        if stage.loss.name != "sft" and runner.reference is None:
            runner.set_reference(resumed=resume_from is not None)
        final = runner.run_stage(stage, resume_from=resume_from)
    if not final and resume is not None:
        run_dir = Path(config.run_dir)
        runner.log.info(f"{run_dir}: already complete at iteration {resume.iteration}")
    if sum(s.steps for s in stages) == 0 and resume is None:  # e.g. an initial checkpoint
        save_untrained(runner.policy, runner.ckpt_root, config=config, stage=stages[-1])
    summary = final_summary(
        stages=[(s.name, s.steps) for s in stages],
        wall_s=time.perf_counter() - started,
        held_out=final,
        checkpoint=checkpoint.latest_checkpoint(runner.ckpt_root),
        metrics=Path(config.run_dir) / "metrics.jsonl",
    )
    runner.log.info(summary)
    runner.log.close()
    distributed.shutdown()
    return final
