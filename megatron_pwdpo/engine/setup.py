"""Building the pieces the loop uses: model chunks (+ DDP), optimizer and LR schedule,
and this rank's place in the parallel layout."""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_pwdpo.engine.step import reduce_metrics
from megatron_pwdpo.model.build import build_model
from megatron_pwdpo.platform import decisions as platform
from megatron_pwdpo.platform import distributed
from megatron_pwdpo.platform.decisions import BuildPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """This rank's coordinates in Megatron's process groups."""

    dp_rank: int
    dp_size: int
    is_last_stage: bool
    dp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    pp_last_rank: int

    @classmethod
    def current(cls) -> Layout:
        from megatron.core import parallel_state as ps

        return cls(
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            is_last_stage=ps.is_pipeline_last_stage(ignore_virtual=True),
            dp_group=ps.get_data_parallel_group(),
            pp_group=ps.get_pipeline_model_parallel_group(),
            pp_last_rank=ps.get_pipeline_model_parallel_last_rank(),
        )

    @staticmethod
    def forward_backward_func():
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()

    def reduce(self, summed: dict[str, torch.Tensor], names: list[str]) -> dict[str, float]:
        """Global metrics of one step (see :func:`megatron_pwdpo.engine.step.reduce_metrics`)."""
        return reduce_metrics(
            summed,
            names,
            dp_group=self.dp_group,
            pp_group=self.pp_group,
            pp_last_rank=self.pp_last_rank,
            is_last_stage=self.is_last_stage,
            device=distributed.device(),
        )


def build_plan(config) -> BuildPlan:
    """This rank's :class:`~megatron_pwdpo.platform.decisions.BuildPlan` (parallel state must be
    initialised: the distributed optimizer's ``auto`` reads the data-parallel size)."""
    from megatron.core import parallel_state as ps

    return platform.plan_build(
        config, platform.detect(), data_parallel=ps.get_data_parallel_world_size()
    )


def build_chunks(config, *, wrap_ddp: bool) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage), as Megatron-LM's
    ``get_model`` builds them: in ``Float16Module`` for bf16 (every weight in bf16,
    first-stage inputs cast to bf16, last-stage outputs back to fp32), then optionally
    in Megatron's DDP (fp32 gradient buffers; sharded for the distributed optimizer)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.module import Float16Module

    plan = build_plan(config)
    vp = config.parallel.virtual_pipeline
    chunks = []
    for vp_stage in range(vp or 1):
        stage = vp_stage if vp else None
        model = build_model(
            config.model,
            config.parallel,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
            precision=getattr(config, "precision", None),
            plan=plan,
        )
        if model.config.bf16:
            model = Float16Module(model.config, model)
        chunks.append(model)
    if not wrap_ddp:
        return chunks
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=plan.distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(
            config=c.config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0
        )
        for i, c in enumerate(chunks)
    ]
    for c in wrapped:
        c.config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def build_optimizer(chunks: list[torch.nn.Module], t, *, lr: float, steps: int):
    """Megatron's Adam (the distributed optimizer when the chunks' DDP shards for it) with
    fp32 master weights for bf16 chunks, and a warm-up + cosine schedule."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        clip_grad=t.clip_grad,
        use_distributed_optimizer=chunks[0].ddp_config.use_distributed_optimizer,
        # bf16 params (precision.dtype=bf16, FP8 included): fp32 master weights in the optimizer
        bf16=bool(chunks[0].config.bf16),
        params_dtype=chunks[0].config.params_dtype,
        fp16=False,
    )
    optimizer = get_megatron_optimizer(opt_config, chunks)
    for c in chunks:
        c.config.grad_scale_func = optimizer.scale_loss
    # Megatron's scheduler gives lr(num_steps); step k (1-based) should use lr(k), so the
    # scheduler is advanced once up front, and decays over steps + 1 so the last step
    # still learns.
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=lr,
        min_lr=t.min_lr,
        lr_warmup_steps=min(t.warmup_steps, steps),
        lr_decay_steps=steps + 1,
        lr_decay_style="cosine",
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=steps + 1,
        wd_incr_style="constant",
        # a resumed stage keeps the saved position (num_steps) but takes lr, warm-up,
        # length and weight decay from the config (resume_check allows changing them)
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )
    scheduler.step(increment=1)
    return optimizer, scheduler


def _stock_step_module():
    """``megatron.core.optimizer.optimizer``, looked up at call time: its module-level
    ``clip_grad_by_total_norm_fp32`` is what the stock ``step()`` calls, and what the CPU
    bridge replaces there."""
    return importlib.import_module("megatron.core.optimizer.optimizer")


@torch.no_grad()
def optimizer_step(optimizer, *, loss_is_finite: bool) -> tuple[bool, float]:
    """Update unless the loss or the global gradient norm is not finite.

    Megatron's fp32 path would otherwise apply NaN gradients (its found-inf check is
    the fp16 loss scaler's), so the decision needs the norm before the update. This is
    Megatron's own ``step()`` taken apart so nothing is computed twice:

    1. ``prepare_grads()`` once (fp32: ``param.grad = param.main_grad``; bf16 and the
       distributed optimizer: copy the model grads into the fp32 main grads);
    2. ``get_grad_norm()`` once: one scalar, the L2 norm over every main gradient
       (tensor-parallel duplicates and shared weights counted once), all-reduced over
       the optimizer's grad-stats group, returned as a Python float;
    3. if the loss, the norm or prepare_grads' found-inf flag says non-finite: return
       before clipping, leaving the weights and the Adam state untouched;
    4. otherwise clip every sub-optimizer whose ``config.clip_grad > 0`` with that same
       norm (factor ``clip_grad / (norm + 1e-6)`` when below 1), through the
       ``clip_grad_by_total_norm_fp32`` that ``megatron.core.optimizer.optimizer``
       holds, so on CPU it is the bridge's (:mod:`megatron_pwdpo.platform.cpu_bridge`);
    5. ``step_with_ready_grads()``: the inner Adam step, the copy back to bf16 model
       weights, the distributed optimizer's parameter all-gather.

    This is what ``ChainedOptimizer.step()`` does (``get_megatron_optimizer`` returns
    one, over a single ``FP32Optimizer`` on CPU and a ``DistributedOptimizer`` on GPU),
    and what ``FP32Optimizer.step()`` / ``MixedPrecisionOptimizer.step()`` do for a bare
    optimizer: the same calls with the same arguments in the same order, so the update
    is the same to the bit (``tests/unit/engine/test_optimizer_step.py`` checks it against
    ``step()`` on CPU, fp32; the bf16 and distributed-optimizer paths share these calls
    but are not compared on a GPU there). Left out: ``count_zeros`` (only with
    ``log_num_zeros_in_grad``, which build_optimizer leaves off) and the optional
    timers. An optimizer class that overrides ``step()`` with anything else is refused
    (``TypeError``) rather than silently stepped differently.

    Returns:
        ``(updated, grad_norm)``: whether the weights were updated, and the global
        gradient norm before clipping (also when the step is skipped; then it may be
        NaN or inf). ``ChainedOptimizer.step()`` returns the same norm; a bare
        optimizer's ``step()`` returns ``None`` (fp32) or ``0.0`` (bf16) for it when
        ``clip_grad`` is 0, this the norm all the same.
    """
    mopt = _stock_step_module()
    stock_steps = (
        mopt.ChainedOptimizer.step,
        mopt.FP32Optimizer.step,
        mopt.MixedPrecisionOptimizer.step,
    )
    if type(optimizer).step not in stock_steps:
        raise TypeError(
            f"optimizer_step reproduces Megatron's stock step(); {type(optimizer).__name__} "
            "overrides it"
        )
    found_inf = optimizer.prepare_grads()
    norm = optimizer.get_grad_norm()  # passed on to the clip as the stock step() does
    grad_norm = float(norm)
    if found_inf or not loss_is_finite or not math.isfinite(grad_norm):
        return False, grad_norm
    if isinstance(optimizer, mopt.ChainedOptimizer):
        parts = optimizer.chained_optimizers
    else:
        parts = [optimizer]
    for part in parts:
        if getattr(part, "is_stub_optimizer", False) or part.config.clip_grad <= 0.0:
            continue
        params = part.get_parameters()
        if params:
            mopt.clip_grad_by_total_norm_fp32(
                params,
                max_norm=part.config.clip_grad,
                total_norm=norm,
                # (a property of 0.16's OptimizerConfig; False for build_optimizer's config)
                use_decoupled_grad=getattr(
                    part.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False
                ),
            )
    return bool(optimizer.step_with_ready_grads()), grad_norm
