"""The training loop: init, build, step, evaluate, checkpoint, log.

``train`` plans the run (``run_plan``: the SFT and main stages, and the checkpoint a
resumed run continues from), sets up the process groups and the log, then hands each
stage still to run to ``Runner.run_stage``. A ``Runner`` holds what the stages share
(policy, reference, log) and does the work of a step: micro-batches, reference
log-probs, Megatron's forward/backward schedule, the optimizer step, periodic
evaluation and checkpoints. A resumed stage reloads its optimizer and LR-schedule
state; the data order needs nothing more (the sampler's only state is the step).
"""

from __future__ import annotations

import functools
import math
import time
from functools import partial
from pathlib import Path

import torch

from megatron_pwdpo import checkpoint, distributed, platform
from megatron_pwdpo.batches import (
    Example,
    global_weights,
    mismatched,
    packing_options,
    rank_micro_batches,
)
from megatron_pwdpo.config import LossConfig, RunConfig, dump_yaml
from megatron_pwdpo.data.prepare import PreparedData, prepare_data
from megatron_pwdpo.data.sampler import GlobalBatchSampler
from megatron_pwdpo.kto import kto_reference_point
from megatron_pwdpo.observe import RunLog, final_summary
from megatron_pwdpo.precision import reference_precision
from megatron_pwdpo.reference import Reference, build_reference, skipped_rows
from megatron_pwdpo.resilience import BadStepCounter, FaultInjector, StopRequest
from megatron_pwdpo.run_lock import RunDirLock
from megatron_pwdpo.run_plan import (
    ResumePoint,
    Stage,
    check_init_checkpoint,
    follow_checkpoint_optimizer,
    plan_stages,
    resume_point,
    stages_to_run,
    trim_metrics,
)
from megatron_pwdpo.step import (
    forward_step,
    make_objective,
    megatron_grad_scale,
    metric_names,
    run_logps,
    sum_reports,
)
from megatron_pwdpo.training_setup import (
    Layout,
    build_chunks,
    build_optimizer,
    build_plan,
    optimizer_step,
)
from megatron_pwdpo.validation import validate

Batches = list[dict[str, torch.Tensor]]


@functools.lru_cache(maxsize=8)
def _objective(loss: LossConfig):
    """The loss function of a stage and its metric names (a dry run), built once."""
    objective = make_objective(loss)
    return objective, metric_names(objective)


class Preempted(Exception):
    """A checkpoint was saved because of a signal or the time budget; exit and requeue."""


class Runner:
    """Holds what the stages share: config, layout, data, policy, reference, log."""

    def __init__(self, config: RunConfig, data: PreparedData, layout: Layout, log: RunLog):
        self.config, self.data, self.layout, self.log = config, data, layout, log
        self.policy = build_chunks(config, wrap_ddp=True)
        self.reference: Reference | None = None
        self.reference_stats: dict[str, int] = {}  # ULMA: reference rows skipped
        self.fb = layout.forward_backward_func()
        self.ckpt_root = Path(config.run_dir) / "checkpoints"
        self.stop = StopRequest(
            time_budget_s=config.train.time_budget_s,
            job_end=StopRequest.job_end_from_env(),
            known_save_s=_read_save_seconds(self.ckpt_root),
        )
        if self.stop.deadline is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.stop.deadline))
            log.info(
                f"time limit {when}: stops at the last step from which a step and a save "
                f"fit (save time so far {self.stop.save_s:.1f} s)"
            )
        self.faults = FaultInjector(torch.distributed.get_rank())
        self.bad_steps = BadStepCounter(config.train.max_bad_steps_in_a_row)

    # ------------------------------------------------------------------ batches
    def _micro_batches(self, examples: list[Example], weights=None) -> Batches:
        return rank_micro_batches(
            examples,
            dp_rank=self.layout.dp_rank,
            dp_size=self.layout.dp_size,
            micro_batch_size=self.config.train.micro_batch_size,
            pad_id=self.data.tokenizer.pad_id,
            weights=weights,
            **packing_options(self.config),
            # the interleaved schedule exchanges activations of one fixed shape
            fixed_width=self.config.data.seq_length
            if self.config.parallel.virtual_pipeline
            else None,
        )

    def _logps(self, chunks, batches: Batches, loss: LossConfig) -> list[torch.Tensor]:
        return run_logps(
            self.fb,
            chunks,
            batches,
            reduction=loss.logp_reduction,
            seq_length=self.config.data.seq_length,
        )

    def _reference_precision(self):
        """Reference forwards run in bf16 under FP8 training unless
        ``precision.fp8_reference`` (the policy's chunks too: ``offload`` runs them)."""
        chunks = [*self.policy, *getattr(self.reference, "chunks", [])]
        return reference_precision(self.config.precision, chunks)

    def _attach_inputs(self, stage: Stage, examples: list[Example], batches: Batches) -> None:
        """Reference log-probs and (KTO) the KL reference point, on the last stage."""
        if stage.loss.name == "sft":
            return
        shifted = []
        if stage.loss.name == "kto":
            shifted = self._micro_batches(
                mismatched(examples, seq_length=self.config.data.seq_length)
            )
        # one reference pass per global batch (offload swaps its weights in once); ULMA
        # runs no reference on demonstrations (their ref_logps are NaN, unused)
        ulma = stage.loss.name == "ulma"
        with self._reference_precision():
            refs = self.reference.logps(
                batches + shifted,
                reduction=stage.loss.logp_reduction,
                rows={r.row_index: r for r in examples} if ulma else None,
            )
        self.reference_stats = {"ref_rows_skipped": skipped_rows(examples)} if ulma else {}
        for batch, ref in zip(batches, refs, strict=False):
            batch["ref_logps"] = ref
        if shifted:
            # every pipeline stage takes part in both passes; the last one holds the logps
            policy_logps = self._logps(self.policy, shifted, stage.loss)
            if self.layout.is_last_stage:
                ref_logps = refs[len(batches) :]
                kl = kto_reference_point(policy_logps, ref_logps, dp_group=self.layout.dp_group)
                for batch in batches:
                    batch["kl"] = kl

    # ------------------------------------------------------------------ passes
    def _forward_backward(self, stage: Stage, batches: Batches, *, forward_only: bool):
        objective, names = _objective(stage.loss)
        scale = megatron_grad_scale(
            num_microbatches=len(batches), data_parallel_size=self.layout.dp_size
        )
        for chunk in self.policy:
            chunk.train(not forward_only)
        reports = []
        if batches:
            reports = self.fb(
                forward_step_func=partial(
                    forward_step,
                    objective=objective,
                    reduction=stage.loss.logp_reduction,
                    grad_scale=scale,
                ),
                data_iterator=[iter(batches) for _ in self.policy]
                if len(self.policy) > 1
                else iter(batches),
                model=self.policy,
                num_microbatches=len(batches),
                seq_length=self.config.data.seq_length,
                micro_batch_size=batches[0]["tokens"].shape[0],
                forward_only=forward_only,
            )
        summed = sum_reports(reports) if self.layout.is_last_stage else {}
        return self.layout.reduce(summed, names)

    def evaluate(self, stage: Stage) -> dict[str, float]:
        """Loss and metrics of the policy on the held-out examples (forward only)."""
        examples = stage.eval_examples
        if self.config.parallel.virtual_pipeline:
            # interleaved 1F1B wants a multiple of PP micro-batches per rank
            unit = (
                self.config.train.micro_batch_size
                * self.layout.dp_size
                * self.config.parallel.pipeline_parallel
            )
            examples = examples[: len(examples) // unit * unit]
        if not examples:
            return {}
        batches = self._micro_batches(examples)
        self._attach_inputs(stage, examples, batches)
        with torch.no_grad():
            return self._forward_backward(stage, batches, forward_only=True)

    def train_step(self, stage: Stage, examples: list[Example], iteration: int, optimizer):
        """One optimizer step on a global batch; skips it if anything is not finite."""
        weights = global_weights(examples, normalization=stage.loss.normalization)
        batches = self._micro_batches(examples, weights)
        self._attach_inputs(stage, examples, batches)
        for chunk in self.policy:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        metrics = self._forward_backward(stage, batches, forward_only=False)
        self.faults.before_update(iteration, self.policy)
        ok, grad_norm = optimizer_step(optimizer, loss_is_finite=math.isfinite(metrics["loss"]))
        tokens = sum(int(b["num_tokens"]) for b in batches) * self.layout.dp_size
        return metrics, ok, grad_norm, tokens

    # ------------------------------------------------------------------ stages
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
        common = {
            "config": dump_yaml(self.config),
            "stage": stage.index,
            "stage_name": stage.name,
            "stage_step": step,
            "iteration": iteration,
            "scheduler": scheduler.state_dict(),
            "layout": checkpoint.layout(),
            "skipped_steps": self.bad_steps.total,
            # the optimizer state's format: a resume builds the same optimizer
            "distributed_optimizer": self.policy[0].ddp_config.use_distributed_optimizer,
        }
        start = time.perf_counter()
        path = checkpoint.save_checkpoint(
            self.policy,
            self.ckpt_root,
            iteration=iteration,
            common=common,
            optimizer=optimizer,
            keep=self.config.train.keep_checkpoints,
            before_commit=partial(self.faults.in_save, iteration),
        )
        seconds = time.perf_counter() - start  # ends in a barrier: the slowest rank's time
        self.stop.note_save(seconds)
        if torch.distributed.get_rank() == 0:
            _write_save_seconds(self.ckpt_root, self.stop.save_s)
        self.log.info(f"saved checkpoint {path} in {seconds:.1f} s")

    def save_untrained(self, stage: Stage) -> None:
        """A run of zero steps saves its starting policy as iteration 0 (e.g. to turn
        an initial checkpoint into a run directory), with no optimizer state."""
        checkpoint.save_checkpoint(
            self.policy,
            self.ckpt_root,
            iteration=0,
            common={
                "config": dump_yaml(self.config),
                "stage": stage.index,
                "stage_step": 0,
                "iteration": 0,
                "layout": checkpoint.layout(),
            },
        )

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
        """The main stage's reference (``reference.mode``, see reference.py): resident and
        offload references are saved as ``checkpoints/reference``, or, in a resumed stage,
        loaded from it; a cache is checked against this run."""
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


SAVE_SECONDS_FILE = "save_seconds.txt"  # the longest save so far, kept over requeues


def _read_save_seconds(ckpt_root: Path) -> float:
    try:
        return float((ckpt_root / SAVE_SECONDS_FILE).read_text())
    except (OSError, ValueError):
        return 0.0


def _write_save_seconds(ckpt_root: Path, seconds: float) -> None:
    tmp = ckpt_root / f"{SAVE_SECONDS_FILE}.tmp"
    tmp.write_text(f"{seconds:.3f}\n")
    tmp.replace(ckpt_root / SAVE_SECONDS_FILE)


def _start(config: RunConfig, data: PreparedData, resume: ResumePoint | None) -> Runner:
    """Process groups, seed, run directory (config.yaml; metrics.jsonl trimmed to the
    resume point) and log, then a runner whose policy holds the starting weights: the
    resume point's, else ``train.init_checkpoint``'s, else a fresh initialisation."""
    p = config.parallel
    world = distributed.init_distributed(
        tensor_parallel=p.tensor_parallel,
        pipeline_parallel=p.pipeline_parallel,
        virtual_pipeline=p.virtual_pipeline,
        timeout_s=config.timeout_s,
    )
    from megatron_pwdpo import cpu_bridge

    cpu_bridge.manual_seed(config.train.seed)
    run_dir, layout = Path(config.run_dir), Layout.current()
    if world.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(config))
        if resume is not None:
            trim_metrics(run_dir, resume.iteration)
    torch.distributed.barrier()
    log = RunLog(
        run_dir, enabled=world.rank == 0, progress=config.train.progress, logging=config.logging
    )
    log.info(
        f"world {world.world_size}: tp {p.tensor_parallel} pp {p.pipeline_parallel} "
        f"dp {layout.dp_size}; backend {torch.distributed.get_backend()}"
    )
    # which kernels the model is built from, on which platform (a GPU without Transformer
    # Engine says so here rather than running slower unseen)
    log.info(f"platform {platform.detect().name}: {build_plan(config).describe()}")
    log.info(data.summary())
    if resume is not None and resume.changes:
        log.info(f"resuming with config changes: {'; '.join(resume.changes)}")
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
        runner.save_untrained(stages[-1])
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
