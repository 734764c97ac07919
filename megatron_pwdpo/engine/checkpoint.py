"""Distributed checkpoints in ``megatron.core.dist_checkpointing``'s torch_dist format.

Layout of ``<run_dir>/checkpoints``::

    iter_0000060/   a complete training checkpoint: model, optimizer, RNG, and in
                    ``common`` the config, stage, step, LR schedule (Megatron-LM and
                    NeMo read this format)
    latest.txt      the iteration of the newest complete training checkpoint
    latest_checkpointed_iteration.txt
                    the same, under the name Megatron-LM's ``--load`` reads
    reference/      the frozen reference of the running preference stage (model only),
                    so that a resumed run compares against the same reference

A save writes ``<name>.tmp`` then, once every rank has finished, renames it and then
updates ``latest.txt`` (temp file + ``os.replace``): a run killed during a save resumes
from the previous complete checkpoint. Only the newest ``keep`` training checkpoints
are kept. torch_dist reshards on load, so a checkpoint written at TP=2 loads at TP=1
or PP=2; the RNG states are restored only on the layout that wrote them.

Load only checkpoints you trust, as with any PyTorch checkpoint: tensors are read as
tensors, but torch_dist stores sharded objects (the RNG states, each layer's
``_extra_state``) as pickled bytes, and ``torch.distributed.checkpoint`` unpickles them
with ``weights_only=False``. (Weights from Hugging Face come in through safetensors only:
``convert hf-to-mcore`` refuses pickled ``*.bin`` files.)
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_pwdpo.platform import decisions as platform
from megatron_pwdpo.platform.resilience import usr1_kept_from_helpers

log = logging.getLogger(__name__)


# The tracker file of Megatron-LM's checkpoint folders (``pretrain()``'s --save / --load).
MEGATRON_LM_TRACKER = "latest_checkpointed_iteration.txt"
# Megatron-LM's checkpoint format version, which its load_checkpoint reads from the
# common state (0 when absent: it then applies the QKV re-ordering of the oldest
# checkpoints, which asserts a single model chunk under virtual pipelining)
MEGATRON_LM_CHECKPOINT_VERSION = 3.0


def _chunk_key(index: int, num_chunks: int) -> str:
    return "model" if num_chunks == 1 else f"model{index}"


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """The sharded state dict of every model chunk (``model`` or ``model0``, ``model1``...)."""
    return {
        _chunk_key(i, len(chunks)): _unwrap(c).sharded_state_dict(prefix="")
        for i, c in enumerate(chunks)
    }


def _rng_sharded_object(*, is_loading: bool):
    """This rank's RNG states (CPU and tensor-parallel tracker) as a ShardedObject."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = None
    if not is_loading:
        state = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if platform.detect().cuda else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        }
    return ShardedObject(
        "rng_state",
        state,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(),
    )


# How the distributed optimizer lays out its state in a checkpoint (megatron-core's
# ``DistributedOptimizer.sharded_state_dict(metadata=...)``; Megatron-LM passes the same
# keys). ``fully_reshardable``: the state is gathered per parameter, in the model's own
# shapes, so a checkpoint loads at any TP/PP/DP (and into the plain optimizer); the
# gather goes over gloo to data-parallel rank 0 (host memory, ``mem_efficient``), not to
# every GPU. Without the sharding type, megatron-core 0.16-0.19 fall back to the
# deprecated ``fully_sharded_model_space``, whose flattened ranges torch_dist refuses.
OPTIMIZER_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": True,
}


def _inner_optimizers(optimizer) -> list:
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [getattr(part, "optimizer", None) for part in parts]


def materialise_adam_state(optimizer) -> int:
    """Give torch's Adam/AdamW the state its first ``step()`` would create, where it has
    none yet; returns how many parameters got one.

    torch's Adam creates ``step`` (a 0-d fp32 0), ``exp_avg`` and ``exp_avg_sq`` (zeros)
    lazily, at the first ``step()``, and only for a parameter whose state is empty, so the
    update is unchanged by creating them earlier. Megatron's distributed optimizer reads
    ``step`` from that state whenever it builds a state dict without Transformer Engine's
    or apex's fused Adam (``distrib_optimizer.py``: ``assert len(steps) == 1``), so a save
    or a resume before the first step (a checkpoint of the initial weights, a preemption
    during the first step) failed. Fused Adams keep ``step`` in the param groups: left alone.
    """
    created = 0
    for inner in _inner_optimizers(optimizer):
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            if group.get("fused") or group.get("capturable"):
                continue  # their step lives on the device: let torch create it
            for param in group["params"]:
                state = inner.state[param]
                if state:
                    continue
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        param, memory_format=torch.preserve_format
                    )
                created += 1
    return created


def _state(chunks, optimizer, *, is_loading: bool) -> dict[str, Any]:
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        materialise_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sharded_state_dict(chunks),
            is_loading=is_loading,
            metadata=dict(OPTIMIZER_METADATA),
        )
        state["rng_state"] = _rng_sharded_object(is_loading=is_loading)
    return state


def iteration_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def save_checkpoint(
    chunks: list[torch.nn.Module],
    root: Path,
    *,
    common: dict[str, Any],
    iteration: int | None = None,
    name: str | None = None,
    optimizer=None,
    keep: int | None = None,
    before_commit=None,
    model_state: dict[str, Any] | None = None,
) -> Path:
    """Save (every rank calls this) and return ``root / name``.

    Args:
        chunks: this rank's model chunks.
        root: ``<run_dir>/checkpoints``.
        iteration: a training checkpoint ``iter_N`` (updates ``latest.txt``, rotated).
        name: else, the folder of a side checkpoint (e.g. ``reference``).
        common: small rank-independent state (config, counters), written by rank 0.
        optimizer: include its state and the RNG states (training checkpoints).
        keep: keep only the newest ``keep`` ``iter_*`` checkpoints.
        before_commit: called after the data is written, before the rename (tests).
        model_state: the sharded state to write instead of the chunks' (the converter's,
            see ``convert.hf_to_mcore.unfused_state``); no optimizer then.
    """
    from megatron.core import dist_checkpointing

    if (iteration is None) == (name is None):
        raise ValueError("give exactly one of iteration and name")
    name = iteration_name(iteration) if iteration is not None else name
    final, tmp = root / name, root / f"{name}.tmp"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    state = _state(chunks, optimizer, is_loading=False) if model_state is None else model_state
    state["common"] = common
    state["checkpoint_version"] = MEGATRON_LM_CHECKPOINT_VERSION
    with usr1_kept_from_helpers():  # Slurm signals the writer's helper processes too
        dist_checkpointing.save(state, str(tmp))
    if before_commit is not None:
        before_commit()
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if iteration is not None:
            for tracker in ("latest.txt", MEGATRON_LM_TRACKER):
                marker = root / f"{tracker}.tmp"
                marker.write_text(f"{iteration}\n")
                os.replace(marker, root / tracker)
            if keep is not None:
                _rotate(root, keep)
    dist.barrier()
    return final


def _rotate(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete training checkpoint under ``root``, or None."""
    marker = root / "latest.txt"
    if not marker.exists():
        return None
    path = root / iteration_name(int(marker.read_text().strip()))
    return path if path.is_dir() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder: ``path`` itself (``iter_N``) or the latest one under it
    (``latest.txt``, else Megatron-LM's tracker: a ``pretrain()`` --save folder)."""
    path = Path(path)
    if (path / "latest.txt").exists():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path}: latest.txt names a missing checkpoint")
        return latest
    if (path / MEGATRON_LM_TRACKER).exists():
        text = (path / MEGATRON_LM_TRACKER).read_text().strip()
        found = path / (iteration_name(int(text)) if text.isdigit() else text)
        if not (found / "metadata.json").exists():
            raise FileNotFoundError(
                f"{path}: {MEGATRON_LM_TRACKER} names {found.name}, not a torch_dist checkpoint"
            )
        return found
    if not (path / "metadata.json").exists():
        raise FileNotFoundError(f"{path}: not a torch_dist checkpoint (no metadata.json)")
    return path


def read_common(path: str | Path) -> dict[str, Any]:
    """The ``common`` state of a checkpoint (no process group needed)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(resolve_checkpoint(path))).get(
        "common", {}
    )


def load_checkpoint(
    chunks: list[torch.nn.Module], path: str | Path, *, optimizer=None
) -> dict[str, Any]:
    """Load weights (and optimizer + RNG states) into this rank's objects, any layout.

    Returns:
        The checkpoint's ``common`` state.
    """
    from megatron.core import dist_checkpointing, tensor_parallel

    path = resolve_checkpoint(path)
    state = _state(chunks, optimizer, is_loading=True)
    same_layout = True
    if optimizer is not None:
        written = read_common(path).get("layout")
        same_layout = written == _layout()
        if not same_layout:
            del state["rng_state"]
            log.info(f"{path}: written with layout {written}, now {_layout()}: RNG not restored")
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(chunks):
        _unwrap(chunk).load_state_dict(loaded[_chunk_key(i, len(chunks))], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        if same_layout:
            rng = loaded["rng_state"]
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] is not None and platform.detect().cuda:
                torch.cuda.set_rng_state(rng["cuda"])
            tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    return read_common(path)


def _layout() -> list[int]:
    """``[pp, tp]``: store it as ``common["layout"]`` (the RNG states belong to it)."""
    from megatron.core import parallel_state as ps

    return [ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()]


layout = _layout
