"""Opening a run: process groups, seed, the run directory and its log.

Everything here happens after the run was checked (config, data, initial checkpoint,
``run_dir`` lock: :func:`megatron_pwdpo.training.loop.train`) and before the policy is built.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_pwdpo.config import RunConfig, dump_yaml
from megatron_pwdpo.data.prepare import PreparedData
from megatron_pwdpo.engine.setup import Layout, build_plan
from megatron_pwdpo.platform import cpu_bridge, distributed
from megatron_pwdpo.platform import decisions as platform
from megatron_pwdpo.training.observe import RunLog
from megatron_pwdpo.training.plan import ResumePoint, trim_metrics


def open_run(
    config: RunConfig, data: PreparedData, resume: ResumePoint | None
) -> tuple[Layout, RunLog]:
    """Process groups and seed; on rank 0 the run directory (``config.yaml``;
    ``metrics.jsonl`` trimmed to the resume point); the log, which opens with the world,
    the platform's build plan and the data. Returns this rank's layout and the log."""
    p = config.parallel
    world = distributed.init_distributed(
        tensor_parallel=p.tensor_parallel,
        pipeline_parallel=p.pipeline_parallel,
        virtual_pipeline=p.virtual_pipeline,
        timeout_s=config.timeout_s,
    )
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
    return layout, log
