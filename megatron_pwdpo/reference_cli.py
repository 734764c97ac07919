"""``megatron-pwdpo precompute-ref``: the reference's log-probs of every row, once.

    megatron-pwdpo precompute-ref --config FILE [section.field=value ...] --out ref.npz
    torchrun --nproc-per-node 8 -m megatron_pwdpo.cli precompute-ref ... \\
        parallel.tensor_parallel=2 parallel.pipeline_parallel=2

The reference is the checkpoint a ``reference.mode=cache`` run of the same config would
compare against (``reference.checkpoint``, else ``train.init_checkpoint``); any TP/PP
layout and any number of data-parallel replicas may compute it. Every train and eval
row is run (for ``loss.name=ulma``, every row but the demonstrations), sorted by length
to waste little padding; rank 0 gathers the log-probs over the data-parallel group and
writes one ``.npz`` (read without pickle):

    ids          [n] str      row ids
    logps        [n] float32  reference log-probs (``loss.logp_reduction``)
    digests      [n] uint64   digest of each row's tokens (reference_cache.row_digests)
    fingerprint  str          JSON: reference checkpoint digest, model section,
                              tokenizer, seq_length, logp_reduction
    source       str          the checkpoint path (informative)

The file is written under a temporary name and renamed: an interrupted run leaves no
file a training run would take for valid. ``train.sft_steps`` is ignored here (set it
to 0 in the run that uses the cache).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

GROUP = 64  # micro-batches per schedule call


def write_cache(
    path: str | Path,
    *,
    ids: list[str],
    logps: np.ndarray,
    digests: np.ndarray,
    fingerprint: dict,
    source: str,
) -> None:
    """Write a cache file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(
            f,
            ids=np.array(ids, dtype=np.str_),
            logps=np.asarray(logps, dtype=np.float32),
            digests=np.asarray(digests, dtype=np.uint64),
            fingerprint=np.array(json.dumps(fingerprint, sort_keys=True)),
            source=np.array(source),
        )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _local_logps(
    rows, chunks, *, fb, pad_id: int, micro_batch_size: int, reduction: str, seq_length: int
) -> torch.Tensor:
    """``[len(rows)]`` log-probs of this rank's rows (meaningful on the last stage)."""
    from megatron_pwdpo.batches import rank_micro_batches
    from megatron_pwdpo.step import run_logps

    order = sorted(range(len(rows)), key=lambda i: -rows[i].input_ids.size)
    out = torch.zeros(len(rows), dtype=torch.float32, device=_device())
    step = micro_batch_size * GROUP
    for start in range(0, len(order), step):
        part = order[start : start + step]
        batches = rank_micro_batches(
            [rows[i] for i in part],
            dp_rank=0,
            dp_size=1,
            micro_batch_size=micro_batch_size,
            pad_id=pad_id,
        )
        logps = run_logps(fb, chunks, batches, reduction=reduction, seq_length=seq_length)
        if logps:
            out[torch.tensor(part, device=out.device)] = torch.cat(logps).float()
    return out


def _device() -> torch.device:
    from megatron_pwdpo.distributed import device

    return device()


def precompute(config, out: str | Path, *, micro_batch_size: int | None = None) -> int:
    """Run the reference over the config's rows and write the cache (see module doc).

    Returns:
        The number of rows written.
    """
    from megatron_pwdpo import checkpoint, cpu_bridge, distributed
    from megatron_pwdpo.data.prepare import prepare_data
    from megatron_pwdpo.reference_cache import (
        cache_fingerprint,
        cache_rows,
        reference_checkpoint,
        row_digests,
    )
    from megatron_pwdpo.training_setup import Layout, build_chunks
    from megatron_pwdpo.validation import validate

    start = time.perf_counter()
    p = config.parallel
    validate(config, world_size=distributed.world_from_env().world_size)
    data = prepare_data(config.data, vocab_size=config.model.vocab_size)
    rows = cache_rows(data.train + data.eval, loss_name=config.loss.name)
    fingerprint = cache_fingerprint(config, data.tokenizer)  # checks the checkpoint
    source = reference_checkpoint(config)
    world = distributed.init_distributed(
        tensor_parallel=p.tensor_parallel,
        pipeline_parallel=p.pipeline_parallel,
        virtual_pipeline=p.virtual_pipeline,
        timeout_s=config.timeout_s,
    )
    try:
        cpu_bridge.manual_seed(config.train.seed)
        layout = Layout.current()
        chunks = build_chunks(config, wrap_ddp=False)
        checkpoint.load_checkpoint(chunks, source)
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        parts = np.array_split(np.arange(len(rows)), layout.dp_size)
        mine = [rows[i] for i in parts[layout.dp_rank]]
        logps = _local_logps(
            mine,
            chunks,
            fb=layout.forward_backward_func(),
            pad_id=data.tokenizer.pad_id,
            micro_batch_size=micro_batch_size or config.train.micro_batch_size,
            reduction=config.loss.logp_reduction,
            seq_length=config.data.seq_length,
        )
        everything = _gather(logps, layout, sizes=[len(p) for p in parts])
        if world.rank == 0:
            write_cache(
                out,
                ids=[r.id for r in rows],
                logps=everything.cpu().numpy(),
                digests=row_digests(rows),
                fingerprint=fingerprint,
                source=str(source),
            )
            print(
                f"wrote {len(rows)} reference log-probs ({config.loss.logp_reduction}) of "
                f"{source} to {out} in {time.perf_counter() - start:.1f}s",
                flush=True,
            )
        dist.barrier()
    finally:
        distributed.shutdown()
    return len(rows)


def _gather(local: torch.Tensor, layout, *, sizes: list[int]) -> torch.Tensor:
    """This rank's log-probs from the last pipeline stage to the first, then every data-
    parallel rank's to data-parallel rank 0 (padded to one length), in row order."""
    if dist.get_world_size(layout.pp_group) > 1:
        dist.broadcast(local, src=layout.pp_last_rank, group=layout.pp_group)
    if layout.dp_size == 1:
        return local
    longest = max(sizes)
    padded = torch.zeros(longest, dtype=local.dtype, device=local.device)
    padded[: local.numel()] = local
    first = layout.dp_rank == 0
    bucket = [torch.zeros_like(padded) for _ in sizes] if first else None
    dist.gather(padded, bucket, dst=dist.get_global_rank(layout.dp_group, 0), group=layout.dp_group)
    if not first:
        return local
    return torch.cat([b[:n] for b, n in zip(bucket, sizes, strict=True)])


def _cmd_precompute(args: argparse.Namespace) -> int:
    from megatron_pwdpo.cli import DEFAULT_CONFIG
    from megatron_pwdpo.config import load_config

    # the reference is a fixed checkpoint: no SFT stage here, whatever the config says
    config = load_config(args.config or DEFAULT_CONFIG, [*args.overrides, "train.sft_steps=0"])
    reference = replace(config.reference, mode="cache", cache_path=str(args.out))
    config = replace(config, reference=reference)
    precompute(config, args.out, micro_batch_size=args.micro_batch_size)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``precompute-ref`` to the ``megatron-pwdpo`` command line."""
    pre = subparsers.add_parser(
        "precompute-ref",
        help="write the reference's per-row log-probs once (for reference.mode=cache)",
        description=__doc__.split("\n")[0],
    )
    pre.add_argument("--config", type=Path, default=None, help="the training run's YAML config")
    pre.add_argument("--out", type=Path, required=True, help="cache file to write (.npz)")
    pre.add_argument(
        "--micro-batch-size", type=int, default=None, help="rows per forward pass on one rank"
    )
    pre.add_argument("overrides", nargs="*", help="section.field=value overrides")
    pre.set_defaults(func=_cmd_precompute)
