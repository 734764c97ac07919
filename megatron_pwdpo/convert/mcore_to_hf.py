"""``convert mcore-to-hf``: a torch_dist checkpoint -> a Hugging Face model folder.

Works on what ``convert hf-to-mcore`` writes and on training checkpoints
(``<run_dir>/checkpoints``): the architecture is the :class:`ModelConfig` stored in the
checkpoint's common state (``model_config`` from the converter, the run's ``config``
YAML from ``megatron-pwdpo train``). The Hugging Face side (the source ``config.json``
to start from, tokenizer and generation files, copied verbatim) comes from, in order:
``--hf-like DIR``; the converter's ``hf/`` folder next to the checkpoint; the ``hf/``
folder of the converted checkpoint the run started from (an ``init_checkpoint`` entry in
its config). Without any, ``config.json`` is written from the ModelConfig alone (Llama,
or Qwen2 when the model has q/k/v biases) and no tokenizer is copied.

Output: ``config.json``, ``model.safetensors`` (or, above one shard's size, 5 GB by
default, ``model-0000K-of-0000N.safetensors`` and ``model.safetensors.index.json``, as
``save_pretrained`` writes them), tokenizer files. The model is loaded on the CPU in the
dtype the checkpoint stores and written one shard at a time: peak host memory is the
model once plus one shard.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from megatron_pwdpo.convert.hf_to_mcore import (
    HF_ARCHITECTURES,
    HF_SIDE_DIR,
    HF_SIDE_FILES,
    MODEL_CONFIG_FILE,
    read_hf_config,
    unfused_state,
)
from megatron_pwdpo.convert.table import ConversionError, hf_parts_of, recipes, spec_of
from megatron_pwdpo.model.build import ModelConfig, ParallelConfig

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(iteration folder, checkpoint root)`` of a root, a run dir or an ``iter_N`` folder."""
    from megatron_pwdpo.engine.checkpoint import latest_checkpoint

    path = Path(path)
    for root in (path, path / "checkpoints"):
        if (root / "latest.txt").is_file():
            found = latest_checkpoint(root)
            if found is None:
                raise ConversionError(f"{root}/latest.txt names a missing checkpoint")
            return found, root
    if (path / "metadata.json").is_file():
        return path, path.parent
    raise ConversionError(f"{path}: not a checkpoint (no latest.txt, no metadata.json)")


def _common(iter_dir: Path) -> dict[str, Any]:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(iter_dir)).get("common", {})


def _model_config(data: dict[str, Any], where: str) -> ModelConfig:
    try:
        return ModelConfig(**data)
    except TypeError as err:
        raise ConversionError(f"{where}: not a ModelConfig ({err})") from None


def read_model_config(ckpt: str | os.PathLike[str]) -> ModelConfig:
    """The :class:`ModelConfig` a checkpoint (converted or trained) was written with."""
    iter_dir, root = resolve_checkpoint(ckpt)
    common = _common(iter_dir)
    if "model_config" in common:
        return _model_config(common["model_config"], str(iter_dir))
    if "config" in common:
        return _model_config(yaml.safe_load(common["config"]).get("model", {}), str(iter_dir))
    if (root / MODEL_CONFIG_FILE).is_file():
        return _model_config(json.loads((root / MODEL_CONFIG_FILE).read_text()), str(root))
    raise ConversionError(f"{iter_dir}: the checkpoint records no model config")


# ModelConfig fields that do not change what the weights compute.
_FREE_FIELDS = frozenset({"max_seq_length", "init_method_std"})


def check_model_config(model: ModelConfig, ckpt: str | os.PathLike[str]) -> None:
    """Raise :class:`ConversionError` if ``model`` is not the model ``ckpt`` was written
    for (shapes, RoPE, norm epsilon, biases, tying, vocabulary padding); a checkpoint
    that records no model config passes. Loading would catch a shape mismatch, not a
    wrong RoPE base or scaling."""
    try:
        saved = read_model_config(ckpt)
    except ConversionError:
        return
    wrong = [
        f"model.{f.name}={getattr(saved, f.name)} (not {getattr(model, f.name)})"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in _FREE_FIELDS and getattr(saved, f.name) != getattr(model, f.name)
    ]
    if wrong:
        raise ConversionError(f"{ckpt} was written for another model: " + ", ".join(wrong))


def _find_key(tree: Any, key: str) -> Any:
    if isinstance(tree, dict):
        if tree.get(key):
            return tree[key]
        for value in tree.values():
            found = _find_key(value, key)
            if found:
                return found
    return None


def hf_side_dir(ckpt: str | os.PathLike[str], hf_like: str | None = None) -> Path | None:
    """Where the Hugging Face config and tokenizer files for ``ckpt`` are (see module doc)."""
    if hf_like:
        return Path(hf_like)
    iter_dir, root = resolve_checkpoint(ckpt)
    if (root / HF_SIDE_DIR).is_dir():
        return root / HF_SIDE_DIR
    config = _common(iter_dir).get("config")
    init = _find_key(yaml.safe_load(config), "init_checkpoint") if config else None
    if isinstance(init, str):
        return hf_side_dir(init)
    return None


def _rope_fields(cfg: ModelConfig) -> dict[str, Any] | None:
    if cfg.rope_scaling == "linear":
        return {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
    if cfg.rope_scaling == "llama3":
        return {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    return None


def hf_config_from_model(
    cfg: ModelConfig, *, base: dict[str, Any] | None = None, dtype: str = "float32"
) -> dict[str, Any]:
    """A Hugging Face ``config.json`` for ``cfg``: ``base`` (the source's) updated with
    every field the ModelConfig determines, or a fresh Llama/Qwen2 config."""
    base = dict(base or {})
    model_type = base.get("model_type") or ("qwen2" if cfg.qkv_bias else "llama")
    if model_type not in HF_ARCHITECTURES or (model_type == "qwen2") != cfg.qkv_bias:
        raise ConversionError(f"model_type '{model_type}' does not fit qkv_bias={cfg.qkv_bias}")
    heads = cfg.num_attention_heads
    rope = _rope_fields(cfg)
    for stale in ("rope_scaling", "rope_parameters", "rope_theta", "torch_dtype", "dtype"):
        base.pop(stale, None)
    out = {
        **base,
        "architectures": [HF_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": cfg.num_query_groups or heads,
        "head_dim": cfg.kv_channels or cfg.hidden_size // heads,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_epsilon,
        "initializer_range": cfg.init_method_std,
        "tie_word_embeddings": not cfg.untie_embeddings,
        "max_position_embeddings": base.get("max_position_embeddings", cfg.max_seq_length),
        # transformers 4 names; transformers 5 reads them too.
        "rope_theta": float(cfg.rotary_base),
        "rope_scaling": rope,
        "torch_dtype": dtype,
    }
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if model_type == "qwen2":
        out["use_sliding_window"] = False
    return out


def mcore_to_hf(
    ckpt: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    hf_like: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Convert a checkpoint to a Hugging Face folder; every rank of the world calls this.

    Megatron's parallel state must be initialised with TP=1 and PP=1; rank 0 writes.

    Args:
        ckpt: a checkpoint root, a run dir, or an ``iter_N`` folder.
        out_dir: the Hugging Face folder to write.
        hf_like: a Hugging Face folder to take ``config.json`` and tokenizer files from.
        dtype: ``float32``, ``bfloat16`` or ``float16``; default: the source's dtype
            recorded by ``hf-to-mcore``, else the base config's, else float32.
        max_shard_bytes: the size of one output safetensors file (Hugging Face's 5 GB
            by default); a model that fits in one is written as ``model.safetensors``.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_pwdpo.model.build import build_model

    if (
        ps.get_tensor_model_parallel_world_size() != 1
        or ps.get_pipeline_model_parallel_world_size() != 1
    ):
        raise ConversionError("mcore_to_hf builds the full model: initialise TP=1, PP=1")
    iter_dir, _ = resolve_checkpoint(ckpt)
    cfg = read_model_config(ckpt)
    side = hf_side_dir(ckpt, hf_like)
    base = read_hf_config(side) if side and (side / "config.json").is_file() else None
    dtype = (
        dtype
        or _common(iter_dir).get("hf_dtype")
        or (base or {}).get("torch_dtype")
        or (base or {}).get("dtype")
        or "float32"
    )
    if dtype not in _DTYPES:
        raise ConversionError(f"dtype '{dtype}' is not one of {', '.join(_DTYPES)}")
    # the full model on the CPU in the dtype the checkpoint stores, uninitialised (the
    # load overwrites every weight); each output shard is cast and written in turn
    stored = stored_dtype(iter_dir)
    model = build_model(cfg, ParallelConfig(), params_dtype=stored, on_cpu=True, initialize=False)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    # the SwiGLU halves are loaded into tensors of their own and written from there: no
    # fused copy (Megatron's factory would load both halves, then concatenate them)
    gated = {
        mc: tuple(torch.empty_like(half) for half in own[mc].chunk(2))
        for mc in own
        if mc.endswith("mlp.linear_fc1.weight")
    }
    state = unfused_state(model, gated)
    loaded = dist_checkpointing.load(state, str(iter_dir))["model"]
    with torch.no_grad():
        for name, tensor in loaded.items():
            if name in own and name not in gated and tensor.data_ptr() != own[name].data_ptr():
                own[name].copy_(tensor)  # torch_dist loads in place; copy what it did not
    out_dir = Path(out_dir)
    if torch.distributed.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            write_hf_shards(
                own,
                gated=gated,
                cfg=cfg,
                out_dir=out_dir,
                dtype=_DTYPES[dtype],
                max_shard_bytes=max_shard_bytes,
            )
        config = hf_config_from_model(cfg, base=base, dtype=dtype)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied = []
        for name in HF_SIDE_FILES[1:]:
            if side and (side / name).is_file():
                shutil.copyfile(side / name, out_dir / name)
                copied.append(name)
        if not any(n.startswith("tokenizer") for n in copied):
            log.warning(f"no tokenizer files copied to {out_dir} (pass --hf-like HF_DIR)")
    torch.distributed.barrier()
    log.info(f"converted {iter_dir} -> {out_dir} ({config_name(cfg, base)}, {dtype})")
    return out_dir


def stored_dtype(iter_dir: Path) -> torch.dtype:
    """The dtype of the model weights in a torch_dist checkpoint (from its metadata)."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(iter_dir))
    for key in ("embedding.word_embeddings.weight", "model.embedding.word_embeddings.weight"):
        found = meta.get(key) if isinstance(meta, dict) else None
        if found is not None:
            return found.dtype
    return torch.float32


def _file_order(name: str) -> tuple[int, str]:
    """Embedding, layers 0, 1, ..., final norm and head (the order HF shards follow)."""
    if name.startswith("model.layers."):
        return 1 + int(name.split(".")[2]), name
    return (0 if name == "model.embed_tokens.weight" else 10**9), name


def write_hf_shards(
    own: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: Path,
    *,
    dtype: torch.dtype,
    max_shard_bytes: int,
    gated: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[str]:
    """Write the Hugging Face tensors of the full Megatron state ``own`` as safetensors
    files of at most ``max_shard_bytes`` (one tensor bigger than that gets its own):
    only one shard's tensors are materialised (cast, contiguous) at a time. ``gated``
    gives SwiGLU ``linear_fc1`` weights as their ``(gate, up)`` halves instead.

    Returns:
        the file names written.
    """
    from safetensors.torch import save_file

    spec = spec_of(list(own))
    views: dict[str, torch.Tensor] = {}
    for mc, parts in recipes(cfg, spec):
        if gated and mc in gated:  # (gate, up) held apart (see hf_to_mcore.unfused_state)
            views.update(zip(parts, gated[mc], strict=True))
        else:
            views.update(hf_parts_of(mc, own[mc], cfg, parts))
    order = sorted(views, key=_file_order)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name in order:
        nbytes = views[name].numel() * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    total = sum(views[n].numel() for n in order) * itemsize
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map = {}
    for file, names in zip(files, shards, strict=True):
        tensors = {
            n: views[n].to(dtype=dtype, copy=True, memory_format=torch.contiguous_format)
            for n in names
        }
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, file))
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def config_name(cfg: ModelConfig, base: dict[str, Any] | None) -> str:
    model_type = (base or {}).get("model_type") or ("qwen2" if cfg.qkv_bias else "llama")
    return HF_ARCHITECTURES.get(model_type, model_type)
