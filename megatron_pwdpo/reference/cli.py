"""``megatron-pwdpo precompute-ref``: the reference's log-probs of every row, once.

    megatron-pwdpo precompute-ref --config FILE [section.field=value ...] --out ref.npz
    torchrun --nproc-per-node 8 -m megatron_pwdpo.cli precompute-ref ... \\
        parallel.tensor_parallel=2 parallel.pipeline_parallel=2

The reference is the checkpoint a ``reference.mode=cache`` run of the same config would
compare against (``reference.checkpoint``, else ``train.init_checkpoint``); any TP/PP
layout and any number of data-parallel replicas may compute it. Every train and eval
row is run (for ``loss.name=ulma``, every row but the demonstrations; see ``row_logps``
for how they are split, batched and gathered); rank 0 writes one ``.npz`` (read without
pickle):

    ids          [n] str      row ids
    logps        [n] float32  reference log-probs (``loss.logp_reduction``)
    digests      [n] uint64   digest of each row's tokens (reference.cache.row_digests)
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
import torch.distributed as dist


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


def precompute(config, out: str | Path, *, micro_batch_size: int | None = None) -> int:
    """Run the reference over the config's rows and write the cache (see module doc).

    Returns:
        The number of rows written.
    """
    from megatron_pwdpo.config.validation import validate
    from megatron_pwdpo.data.prepare import prepare_data
    from megatron_pwdpo.engine import checkpoint
    from megatron_pwdpo.engine.setup import Layout, build_chunks
    from megatron_pwdpo.model.precision import reference_precision
    from megatron_pwdpo.platform import cpu_bridge, distributed
    from megatron_pwdpo.platform.decisions import config_token_multiple
    from megatron_pwdpo.reference.cache import (
        cache_fingerprint,
        cache_rows,
        reference_checkpoint,
        row_digests,
    )
    from megatron_pwdpo.reference.row_logps import rows_logps

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
        with reference_precision(config.precision, chunks):  # as the training run's
            everything = rows_logps(
                rows,
                chunks,
                layout,
                pad_id=data.tokenizer.pad_id,
                micro_batch_size=micro_batch_size or config.train.micro_batch_size,
                reduction=config.loss.logp_reduction,
                seq_length=config.data.seq_length,
                token_multiple=config_token_multiple(config),
            )
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


def _cmd_precompute(args: argparse.Namespace) -> int:
    from megatron_pwdpo.config import DEFAULT_CONFIG, load_config

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
        description=__doc__.split("\n")[0].replace("``", ""),
    )
    pre.add_argument("--config", type=Path, default=None, help="the training run's YAML config")
    pre.add_argument("--out", type=Path, required=True, help="cache file to write (.npz)")
    pre.add_argument(
        "--micro-batch-size", type=int, default=None, help="rows per forward pass on one rank"
    )
    pre.add_argument("overrides", nargs="*", help="section.field=value overrides")
    pre.set_defaults(func=_cmd_precompute)
