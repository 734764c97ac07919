"""The training loop: init, build, step, evaluate, checkpoint, log.

A run has up to two stages. With ``train.sft_steps > 0`` and a preference loss, an
SFT stage on the demonstrations comes first; its weights are the starting policy
and the frozen reference of the main stage (the usual SFT -> preference recipe, and
the paper's). The main stage optimises ``loss.name`` for ``train.steps`` steps.

Iterations count over the whole run (SFT steps, then main steps). With
``resume=auto`` a run continues from the newest complete checkpoint in
``run_dir/checkpoints``: the same data order (the sampler's only state is the step),
the same optimizer and LR-schedule state, the same reference.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from megatron_pwdpo import checkpoint, distributed
from megatron_pwdpo.batches import (
    Example,
    global_weights,
    mismatched,
    packing_options,
    pair_up,
    rank_micro_batches,
)
from megatron_pwdpo.config import ConfigError, LossConfig, RunConfig, dump_yaml
from megatron_pwdpo.data.prepare import PreparedData, prepare_data
from megatron_pwdpo.data.sampler import GlobalBatchSampler
from megatron_pwdpo.kto import kto_reference_point
from megatron_pwdpo.observe import RunLog
from megatron_pwdpo.precision import reference_precision
from megatron_pwdpo.reference import Reference, build_reference, skipped_rows
from megatron_pwdpo.resilience import BadStepCounter, FaultInjector, StopRequest
from megatron_pwdpo.step import (
    forward_step,
    make_objective,
    megatron_grad_scale,
    metric_names,
    run_logps,
    sum_reports,
)
from megatron_pwdpo.training_setup import Layout, build_chunks, build_optimizer, optimizer_step
from megatron_pwdpo.validation import validate

Batches = list[dict[str, torch.Tensor]]


@functools.lru_cache(maxsize=8)
def _objective(loss: LossConfig):
    """The loss function of a stage and its metric names (a dry run), built once."""
    objective = make_objective(loss)
    return objective, metric_names(objective)


class Preempted(Exception):
    """A checkpoint was saved because of a signal or the time budget; exit and requeue."""


@dataclass
class Stage:
    """One optimisation stage: a loss, its examples (rows or pairs), length and LR."""

    index: int
    name: str
    loss: LossConfig
    examples: list[Example]
    eval_examples: list[Example]
    steps: int
    lr: float
    offset: int  # iterations of the stages before this one


class Runner:
    """Holds what the stages share: config, layout, data, policy, reference, log."""

    def __init__(self, config: RunConfig, data: PreparedData, layout: Layout, log: RunLog):
        self.config, self.data, self.layout, self.log = config, data, layout, log
        self.policy = build_chunks(config, wrap_ddp=True)
        self.reference: Reference | None = None
        self.reference_stats: dict[str, int] = {}  # ULMA: reference rows skipped
        self.fb = layout.forward_backward_func()
        self.ckpt_root = Path(config.run_dir) / "checkpoints"
        self.stop = StopRequest(time_budget_s=config.train.time_budget_s)
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
            **packing_options(self.config.data),
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
        }
        path = checkpoint.save_checkpoint(
            self.policy,
            self.ckpt_root,
            iteration=iteration,
            common=common,
            optimizer=optimizer,
            keep=self.config.train.keep_checkpoints,
            before_commit=partial(self.faults.in_save, iteration),
        )
        self.log.info(f"saved checkpoint {path}")

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


def plan_stages(config: RunConfig, data: PreparedData) -> list[Stage]:
    """The SFT stage (if any) and the main stage, with their training examples."""
    t, loss = config.train, config.loss

    def demos(rows):
        return [r for r in rows if r.is_demo]

    plan = []
    if loss.name != "sft" and t.sft_steps > 0:
        if not demos(data.train):
            raise ConfigError(
                "train.sft_steps > 0 but the data has no demonstrations "
                "(set data.demo_chosen=true or train.sft_steps=0)"
            )
        sft = replace(loss, name="sft", logp_reduction="mean", normalization="global_mean")
        plan.append(("sft", sft, demos(data.train), demos(data.eval), t.sft_steps, t.sft_lr))
    if loss.name == "sft":
        loss = replace(loss, logp_reduction="mean")
        train, held_out = demos(data.train) or data.train, demos(data.eval) or data.eval
    elif loss.name in ("dpo", "ipo"):
        train, held_out = pair_up(data.train), pair_up(data.eval)
    else:
        train, held_out = data.train, data.eval
    plan.append((loss.name, loss, train, held_out, t.steps, t.lr))
    stages, offset = [], 0
    for index, (name, stage_loss, examples, evals, steps, lr) in enumerate(plan):
        if not examples:
            raise ConfigError(f"stage '{name}' has no training examples")
        stages.append(Stage(index, name, stage_loss, examples, evals, steps, lr, offset))
        offset += steps
    return stages


def _check_init_checkpoint(config: RunConfig) -> None:
    """The initial checkpoint exists and was written for this model (RoPE, shapes...)."""
    from megatron_pwdpo.convert import check_model_config

    try:
        checkpoint.resolve_checkpoint(config.train.init_checkpoint)
    except FileNotFoundError as err:
        raise ConfigError(f"train.init_checkpoint: {err}") from None
    check_model_config(config.model, config.train.init_checkpoint)


def _resume_point(config: RunConfig) -> tuple[Path | None, dict]:
    root = Path(config.run_dir) / "checkpoints"
    latest = checkpoint.latest_checkpoint(root)
    if latest is None:
        return None, {}
    if config.resume == "never":
        raise ConfigError(f"{root} holds checkpoints and resume=never: use a new run_dir")
    return latest, checkpoint.read_common(latest)


def _trim_metrics(run_dir: Path, iteration: int) -> None:
    """Drop metrics.jsonl lines written after the checkpoint a run resumes from."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if json.loads(line).get("iteration", 0) <= iteration
    ]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def train(config: RunConfig) -> dict[str, float]:
    """Run (or resume) training as configured; returns the final held-out metrics.

    Raises:
        Preempted: a checkpoint was saved on a signal or the time budget.
    """
    p = config.parallel
    validate(config, world_size=distributed.world_from_env().world_size)
    RunLog.check_logging(config)  # a requested TensorBoard / W&B package is installed
    if config.train.init_checkpoint:
        _check_init_checkpoint(config)
    data = prepare_data(config.data, vocab_size=config.model.vocab_size)  # before any group
    stages = plan_stages(config, data)
    resume_from, common = _resume_point(config)
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
        if resume_from is not None:
            _trim_metrics(run_dir, common["iteration"])
    torch.distributed.barrier()
    log = RunLog(
        run_dir, enabled=world.rank == 0, progress=config.train.progress, logging=config.logging
    )
    log.info(
        f"world {world.world_size}: tp {p.tensor_parallel} pp {p.pipeline_parallel} "
        f"dp {layout.dp_size}; backend {torch.distributed.get_backend()}"
    )
    log.info(data.summary())
    runner = Runner(config, data, layout, log)
    if resume_from is not None:
        checkpoint.load_checkpoint(runner.policy, resume_from)
        runner.bad_steps.total = common.get("skipped_steps", 0)
    elif config.train.init_checkpoint:
        checkpoint.load_checkpoint(runner.policy, config.train.init_checkpoint)
        log.info(f"initial policy from {config.train.init_checkpoint}")
    final: dict[str, float] = {}
    for stage in stages:
        done = resume_from is not None and (
            stage.index < common["stage"]
            or (stage.index == common["stage"] and common["stage_step"] >= stage.steps)
        )
        if done:
            continue
        within = resume_from is not None and stage.index == common["stage"]
        if stage.loss.name != "sft" and runner.reference is None:
            runner.set_reference(resumed=within)
        final = runner.run_stage(stage, resume_from=resume_from if within else None)
    if not final and resume_from is not None:
        log.info(f"{run_dir}: already complete at iteration {common['iteration']}")
    if sum(s.steps for s in stages) == 0 and resume_from is None:  # e.g. an initial checkpoint
        checkpoint.save_checkpoint(
            runner.policy,
            runner.ckpt_root,
            iteration=0,
            common={
                "config": dump_yaml(config),
                "stage": stages[-1].index,
                "stage_step": 0,
                "iteration": 0,
                "layout": checkpoint.layout(),
            },
        )
    log.close()
    distributed.shutdown()
    return final
