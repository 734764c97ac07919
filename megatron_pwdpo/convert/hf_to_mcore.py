"""``convert hf-to-mcore``: a Hugging Face model folder -> a Megatron-Core torch_dist checkpoint.

The Hugging Face side is read as data only: ``config.json`` with :mod:`json`, weights
from ``*.safetensors`` (pickled ``*.bin`` files are refused), so no remote code and no
unpickling can run, and ``transformers`` is not needed. The output folder::

    OUT/latest.txt, OUT/iter_0000000/   torch_dist checkpoint of the full model (loads at
                                        any TP/PP: checkpoint.load_checkpoint(chunks,
                                        checkpoint.latest_checkpoint(OUT)))
    OUT/model_config.json               the ModelConfig (also in the checkpoint's common state)
    OUT/hf/                             the source's config.json, generation_config.json
                                        and tokenizer files, for `mcore-to-hf`

The checkpoint is written from the full model (TP=1, PP=1, built with this project's
:func:`~megatron_pwdpo.model.build.build_model`); ``torch_dist`` reshards on load, so the
target layout only has to divide the architecture (checked up front).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_pwdpo.convert.table import (
    ConversionError,
    build_mcore_tensor,
    check_hf_names,
    is_ignored_hf,
    recipes,
    spec_of,
)
from megatron_pwdpo.model.build import ModelConfig, ParallelConfig, padded_vocab_size

log = logging.getLogger(__name__)

HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# Copied verbatim (never executed): tokenizer and generation files of a Hugging Face model.
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
MODEL_CONFIG_FILE = "model_config.json"
HF_SIDE_DIR = "hf"
# Megatron-Core 0.16's "llama3" RoPE scaling hard-codes these (the Llama 3.1/3.2 values).
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
_LLAMA3_ORIGINAL_CONTEXT = 8192


def read_hf_config(hf_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise ConversionError(f"{path}: cannot read ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: invalid JSON ({err})") from None


def _rope(hf: Mapping[str, Any]) -> tuple[int, str, float]:
    """``(rotary_base, rope_scaling, factor)`` from transformers 4 (``rope_theta`` +
    ``rope_scaling``) or transformers 5 (``rope_parameters``) configs."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if theta != int(theta):
        raise ConversionError(f"rope_theta {theta} is not an integer (ModelConfig.rotary_base)")
    kind = params.get("rope_type") or params.get("type") or "default"
    factor = float(params.get("factor", 1.0))
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError("partial_rotary_factor != 1 is not supported")
    if kind == "default":
        return int(theta), "none", 1.0
    if kind == "linear":
        return int(theta), "linear", factor
    if kind == "llama3":
        got = {k: float(params.get(k, v)) for k, v in _LLAMA3_FIXED.items()}
        original = params.get("original_max_position_embeddings")
        if got != _LLAMA3_FIXED or original != _LLAMA3_ORIGINAL_CONTEXT:
            raise ConversionError(
                "llama3 RoPE scaling: Megatron-Core fixes low_freq_factor=1, "
                "high_freq_factor=4, original_max_position_embeddings=8192; got "
                f"{got} and {original}"
            )
        return int(theta), "llama3", factor
    raise ConversionError(f"RoPE scaling type '{kind}' is not supported (default, linear, llama3)")


def model_config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face ``config.json`` (refusing what does not map).

    Raises:
        ConversionError: an unsupported architecture or option.
    """
    model_type = hf.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise ConversionError(
            f"model_type '{model_type}' is not supported ({', '.join(HF_ARCHITECTURES)})"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act '{hf['hidden_act']}' is not supported (silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConversionError("attention_bias / mlp_bias (biases beyond q/k/v) are not supported")
    if hf.get("use_sliding_window"):
        raise ConversionError("use_sliding_window is not supported (Megatron's local attention)")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    rotary_base, rope_scaling, factor = _rope(hf)
    max_len = hf.get("max_position_embeddings", 4096)
    if model_type == "mistral" and hf.get("sliding_window"):
        # Full causal attention equals Mistral's windowed attention up to the window;
        # capping the length makes longer training sequences fail config validation.
        max_len = min(max_len, hf["sliding_window"])
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_seq_length=max_len,
        rotary_base=rotary_base,
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        untie_embeddings=not hf.get("tie_word_embeddings", False),
        kv_channels=None if head_dim == hidden // heads else head_dim,
        qkv_bias=model_type == "qwen2",
        rope_scaling=rope_scaling,
        rope_scaling_factor=factor,
    )


def check_layout(cfg: ModelConfig, parallel: ParallelConfig) -> None:
    """Raise :class:`ConversionError` unless ``parallel`` divides the architecture."""
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    groups = cfg.num_query_groups or cfg.num_attention_heads
    checks = [
        (cfg.num_attention_heads % tp == 0, f"{cfg.num_attention_heads} attention heads"),
        (groups % tp == 0, f"{groups} query groups"),
        (cfg.ffn_hidden_size % tp == 0, f"ffn_hidden_size {cfg.ffn_hidden_size}"),
    ]
    for ok, what in checks:
        if not ok:
            raise ConversionError(f"tensor_parallel={tp} does not divide {what}")
    if cfg.num_layers % pp:
        raise ConversionError(f"pipeline_parallel={pp} does not divide {cfg.num_layers} layers")
    pad = {
        t: padded_vocab_size(cfg.vocab_size, multiple=cfg.vocab_pad_multiple, tensor_parallel=t)
        for t in (1, tp)
    }
    if pad[1] != pad[tp]:
        raise ConversionError(
            f"tensor_parallel={tp} pads the vocabulary to {pad[tp]} rows, not {pad[1]}: "
            f"the checkpoint would not load (use a TP that divides {cfg.vocab_pad_multiple})"
        )


def model_overrides(cfg: ModelConfig) -> list[str]:
    """``model.field=value`` arguments that make ``megatron-pwdpo train`` build ``cfg``."""

    def text(value: Any) -> str:
        return (
            "null"
            if value is None
            else str(value).lower()
            if isinstance(value, bool)
            else str(value)
        )

    return [f"model.{k}={text(v)}" for k, v in dataclasses.asdict(cfg).items()]


def hf_weight_files(hf_dir: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a Hugging Face folder (``model.safetensors`` or the
    shards its index names), refusing pickled ``*.bin`` weights."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [hf_dir / name for name in names]
    if (hf_dir / "model.safetensors").exists():
        return [hf_dir / "model.safetensors"]
    if any(hf_dir.glob("*.bin")):
        raise ConversionError(
            f"{hf_dir} has only pickled *.bin weights; they are not loaded (unpickling can run "
            "code). Re-save the model as safetensors (transformers' save_pretrained) on a "
            "machine where loading it is trusted."
        )
    raise ConversionError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")


def load_hf_state(hf_dir: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards its index names (the whole
    model in memory: for tests and small models; the converter streams instead)."""
    from safetensors import safe_open

    state = {}
    for path in hf_weight_files(hf_dir):
        with safe_open(path, framework="pt") as f:
            state.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118
    return state


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def hf_names_and_dtype(files: list[Path]) -> tuple[set[str], torch.dtype]:
    """Every tensor name in ``files`` and the embedding's dtype, from the headers only."""
    from safetensors import safe_open

    names, dtype = set(), None
    for path in files:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            names |= keys
            if "model.embed_tokens.weight" in keys:
                dtype = f.get_slice("model.embed_tokens.weight").get_dtype()
    if dtype not in _SAFETENSORS_DTYPES:
        raise ConversionError(
            f"model.embed_tokens.weight: dtype {dtype} is not one of "
            f"{', '.join(_SAFETENSORS_DTYPES)} (or the tensor is missing)"
        )
    return names, _SAFETENSORS_DTYPES[dtype]


def _check_tied(read: dict[str, torch.Tensor]) -> None:
    if not torch.equal(read.pop("lm_head.weight"), read["model.embed_tokens.weight"]):
        raise ConversionError("tie_word_embeddings is set but lm_head.weight differs")


def stream_into(
    params: dict[str, torch.Tensor],
    files: list[Path],
    cfg: ModelConfig,
    *,
    spec: str,
    padded_vocab: int,
    gated: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """Copy the Hugging Face weights in ``files`` into ``params`` (Megatron names, the
    full model), one file at a time: a file's tensors are read, every Megatron weight
    whose sources are all read is built and copied in, and its sources are dropped. At
    most one file (plus the few tensors of a layer split across two files) is in memory
    beside ``params``. With ``gated``, the SwiGLU ``linear_fc1`` weights are not fused
    into ``params`` but kept there as their ``(gate, up)`` tensors (see
    :func:`save_unfused`)."""
    from safetensors import safe_open

    todo = dict(recipes(cfg, spec))  # type: ignore[arg-type]
    if set(todo) != set(params):
        raise ConversionError(
            f"state dict mismatch: the model has {sorted(set(params) - set(todo))[:4]} that "
            f"nothing fills, and not {sorted(set(todo) - set(params))[:4]}"
        )
    tied_head = not cfg.untie_embeddings
    read: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            read.update({k: f.get_tensor(k) for k in f.keys() if not is_ignored_hf(k)})  # noqa: SIM118
        if tied_head and "lm_head.weight" in read and "model.embed_tokens.weight" in read:
            _check_tied(read)
            tied_head = False
        for mc, parts in list(todo.items()):
            if all(p in read for p in parts):
                if mc == "embedding.word_embeddings.weight" and tied_head:
                    continue  # kept until lm_head.weight (if any) is compared with it
                if gated is not None and len(parts) == 2:
                    dtype = params[mc].dtype
                    gated[mc] = tuple(read.pop(p).to(dtype).contiguous() for p in parts)
                    del todo[mc]
                    continue
                tensor = build_mcore_tensor(
                    mc, [read[p] for p in parts], cfg, padded_vocab=padded_vocab
                )
                params[mc].copy_(tensor)
                del tensor, todo[mc]
                for part in parts:
                    del read[part]
    for mc, parts in list(todo.items()):  # tied embeddings without an lm_head.weight
        params[mc].copy_(
            build_mcore_tensor(mc, [read.pop(p) for p in parts], cfg, padded_vocab=padded_vocab)
        )


def unfused_state(model, gated: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """The model's sharded state dict for torch_dist (``{"model": ...}``) with each SwiGLU
    ``linear_fc1`` weight given as its two halves, ``gated[name] = (gate, up)``: the
    same keys and offsets Megatron's SwiGLU factory writes, but over tensors that own
    their storage. Megatron's factory hands torch_dist two views of the fused weight,
    which torch_dist copies before writing (a view does not own its storage): all
    ``linear_fc1`` weights at once, about half of a Llama model. With ``gated`` empty,
    the factories are left as they are. Also the load target of ``mcore-to-hf``: the
    halves are then empty tensors that the load fills."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    state = model.sharded_state_dict(prefix="")
    for name, (gate, up) in gated.items():
        factory = state[name]
        if not isinstance(factory, ShardedTensorFactory):
            raise ConversionError(f"{name}: expected Megatron's SwiGLU factory")
        halves = factory.build_fn(
            factory.key, factory.data, factory.replica_id, factory.flattened_range
        )
        for half, tensor in zip(halves, (gate, up), strict=True):
            if half.data.shape != tensor.shape or half.data.dtype != tensor.dtype:
                raise ConversionError(f"{name}: half {tuple(tensor.shape)} does not fit")
            half.data = tensor
        state[name] = halves
    return {"model": state}


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def hf_to_mcore(
    hf_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    parallel: ParallelConfig | None = None,
) -> Path:
    """Convert a Hugging Face model folder; every rank of the world calls this.

    Megatron's parallel state must be initialised with TP=1 and PP=1 (any number of
    data-parallel ranks: each builds the full model and the save is deduplicated).

    Args:
        hf_dir: a folder with ``config.json`` and safetensors weights.
        out_dir: the checkpoint root to write.
        parallel: the layout the checkpoint will be trained at (only checked).

    Returns:
        The checkpoint folder (``out_dir/iter_0000000``).
    """
    from megatron.core import parallel_state as ps

    from megatron_pwdpo.engine import checkpoint
    from megatron_pwdpo.model.build import build_model

    if (
        ps.get_tensor_model_parallel_world_size() != 1
        or ps.get_pipeline_model_parallel_world_size() != 1
    ):
        raise ConversionError("hf_to_mcore builds the full model: initialise TP=1, PP=1")
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf_config = read_hf_config(hf_dir)
    cfg = model_config_from_hf(hf_config)
    check_layout(cfg, parallel or ParallelConfig())
    files = hf_weight_files(hf_dir)
    names, dtype = hf_names_and_dtype(files)
    check_hf_names(names, cfg)
    # the full model on the CPU in the checkpoint's dtype, left uninitialised: every
    # weight is overwritten from the files, one file at a time
    model = build_model(cfg, ParallelConfig(), params_dtype=dtype, on_cpu=True, initialize=False)
    params = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    padded = padded_vocab_size(cfg.vocab_size, multiple=cfg.vocab_pad_multiple, tensor_parallel=1)
    gated: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        stream_into(
            params, files, cfg, spec=spec_of(list(params)), padded_vocab=padded, gated=gated
        )
    hf_dtype = str(dtype).removeprefix("torch.")
    del params
    common = {
        "model_config": dataclasses.asdict(cfg),
        "hf_config": hf_config,
        "hf_dtype": hf_dtype,
        "source": str(hf_dir.resolve()),
    }
    path = checkpoint.save_checkpoint(
        [model], out_dir, iteration=0, common=common, model_state=unfused_state(model, gated)
    )
    if torch.distributed.get_rank() == 0:
        _write_json(out_dir / MODEL_CONFIG_FILE, dataclasses.asdict(cfg))
        side = out_dir / HF_SIDE_DIR
        side.mkdir(exist_ok=True)
        for name in HF_SIDE_FILES:
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, side / name)
    torch.distributed.barrier()
    log.info(
        f"converted {hf_config['model_type']} {hf_dir} -> {path} "
        f"({cfg.num_layers} layers, vocab {cfg.vocab_size} padded to {padded}); train it with\n  "
        + " ".join([*model_overrides(cfg), f"train.init_checkpoint={out_dir}"])
    )
    return path
