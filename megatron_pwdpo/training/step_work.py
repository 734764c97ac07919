"""The work of one training step or evaluation on a global batch.

:class:`StepWork` holds the policy (Megatron-Core model chunks in DDP), the reference (set
by the loop before the first stage that needs it) and Megatron's forward/backward
schedule. For a global batch it makes this rank's micro-batches, attaches the reference's
log-probs (and KTO's KL reference point), runs the schedule and, in training, the
optimizer step. Stages, evaluation cadence and checkpoints are the loop's
(:mod:`megatron_pwdpo.training.loop`).
"""

from __future__ import annotations

import functools
import math
from functools import partial

import torch

from megatron_pwdpo.config import LossConfig, RunConfig
from megatron_pwdpo.data.prepare import PreparedData
from megatron_pwdpo.engine.batches import (
    Example,
    global_weights,
    mismatched,
    packing_options,
    rank_micro_batches,
)
from megatron_pwdpo.engine.setup import Layout, build_chunks, optimizer_step
from megatron_pwdpo.engine.step import (
    forward_step,
    kto_reference_point,
    make_objective,
    megatron_grad_scale,
    metric_names,
    run_logps,
    sum_reports,
)
from megatron_pwdpo.model.precision import reference_precision
from megatron_pwdpo.platform.resilience import FaultInjector
from megatron_pwdpo.reference.cache import skipped_rows
from megatron_pwdpo.reference.strategies import Reference
from megatron_pwdpo.training.plan import Stage

Batches = list[dict[str, torch.Tensor]]


@functools.lru_cache(maxsize=8)
def _objective(loss: LossConfig):
    """The loss function of a stage and its metric names (a dry run), built once."""
    objective = make_objective(loss)
    return objective, metric_names(objective)


class StepWork:
    """The policy and reference at work on global batches (see the module docstring).

    Args:
        config: the run's configuration.
        data: the prepared rows and tokenizer (its ``pad_id`` pads micro-batches).
        layout: this rank's place in the process groups.
    """

    def __init__(self, config: RunConfig, data: PreparedData, layout: Layout):
        self.config, self.data, self.layout = config, data, layout
        self.policy = build_chunks(config, wrap_ddp=True)
        self.reference: Reference | None = None
        self.reference_stats: dict[str, int] = {}  # ULMA: reference rows skipped
        self.fb = layout.forward_backward_func()
        self.faults = FaultInjector(torch.distributed.get_rank())

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
