"""Hugging Face <-> Megatron-Core parameter names: a declarative table, then the special cases.

The table maps every Hugging Face tensor of a Llama-family (Llama 2/3, Mistral) or Qwen2
decoder onto the state dict of the full (TP=1, PP=1) ``GPTModel`` that
:func:`megatron_pwdpo.model.build.build_model` builds; ``torch_dist`` checkpoints then reshard
it to any tensor/pipeline layout on load. No arithmetic touches a value, so a round trip
reproduces every tensor bit for bit.

One-to-one renames (``{i}`` is the layer index). Two differ between the layer specs: the
local spec (CPU) keeps separate RMSNorm modules, Transformer Engine's spec (GPU) fuses
each norm into the linear layer that follows it::

    model.embed_tokens.weight                  embedding.word_embeddings.weight  (+ vocab pad)
    lm_head.weight                             output_layer.weight  (untied only, + vocab pad)
    model.norm.weight                          decoder.final_layernorm.weight
    model.layers.{i}.input_layernorm.weight    local: decoder.layers.{i}.input_layernorm.weight
                                               te:    ...self_attention.linear_qkv.layer_norm_weight
    ...post_attention_layernorm.weight         local: decoder.layers.{i}.pre_mlp_layernorm.weight
                                               te:    ...mlp.linear_fc1.layer_norm_weight
    ...self_attn.o_proj.weight                 ...self_attention.linear_proj.weight
    ...mlp.down_proj.weight                    ...mlp.linear_fc2.weight

Special cases, each one explicit function:

* **QKV** (:func:`interleave_qkv`): Megatron's ``linear_qkv`` stacks, per query group g,
  ``[the q heads of group g; k head g; v head g]`` (so that a tensor-parallel slice of
  rows is whole groups); Hugging Face has separate ``q_proj``/``k_proj``/``v_proj``. The
  Qwen2 biases are laid out the same way. Both use the same (non-interleaved,
  "rotate-half") RoPE convention, so no per-head permutation is needed.
* **Gated MLP** (:func:`fuse_gated`): ``linear_fc1 = [gate_proj; up_proj]`` (Megatron's
  GLU applies the activation to the first half).
* **Vocabulary padding** (:func:`pad_vocab`): the embedding and output layer have
  ``padded_vocab_size`` rows; the extra rows are zeros going in and are dropped coming out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import torch

from megatron_pwdpo.config import ConfigError
from megatron_pwdpo.model.build import ModelConfig

Spec = Literal["local", "te"]

_L = "model.layers.{i}."
_D = "decoder.layers.{i}."

# Hugging Face name -> Megatron-Core name (or one per layer spec where they differ).
RENAMES: dict[str, str | dict[str, str]] = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "lm_head.weight": "output_layer.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    _L + "input_layernorm.weight": {
        "local": _D + "input_layernorm.weight",
        "te": _D + "self_attention.linear_qkv.layer_norm_weight",
    },
    _L + "post_attention_layernorm.weight": {
        "local": _D + "pre_mlp_layernorm.weight",
        "te": _D + "mlp.linear_fc1.layer_norm_weight",
    },
    _L + "self_attn.o_proj.weight": _D + "self_attention.linear_proj.weight",
    _L + "mlp.down_proj.weight": _D + "mlp.linear_fc2.weight",
}

# Megatron-Core name <- several Hugging Face names, fused by a special case.
QKV: dict[str, tuple[str, str, str]] = {
    _D + f"self_attention.linear_qkv.{p}": tuple(
        _L + f"self_attn.{x}_proj.{p}" for x in ("q", "k", "v")
    )
    for p in ("weight", "bias")
}
GATED: dict[str, tuple[str, str]] = {
    _D + "mlp.linear_fc1.weight": (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
}
VOCAB_PADDED = frozenset({"embedding.word_embeddings.weight", "output_layer.weight"})

# Hugging Face entries that are buffers, not weights (older checkpoints store them).
_IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


class ConversionError(ConfigError):
    """A model, config or checkpoint this converter cannot map faithfully (the CLI reports
    it as bad input: one line, exit code 2)."""


# --------------------------------------------------------------------------- special cases


def interleave_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_groups: int, head_dim: int
) -> torch.Tensor:
    """``q [nq*d, ...]``, ``k``/``v [ng*d, ...]`` -> ``linear_qkv [ng*(nq/ng+2)*d, ...]``."""
    rest = q.shape[1:]
    parts = [t.reshape(num_groups, -1, head_dim, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(
    qkv: torch.Tensor, *, num_heads: int, num_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interleave_qkv`."""
    rest = qkv.shape[1:]
    per_group = num_heads // num_groups
    grouped = qkv.reshape(num_groups, per_group + 2, head_dim, *rest)
    q, k, v = grouped.split([per_group, 1, 1], dim=1)
    return tuple(t.reshape(-1, *rest) for t in (q, k, v))


def fuse_gated(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``linear_fc1 = [gate; up]``: Megatron's GLU is ``act(first half) * second half``."""
    return torch.cat([gate, up], dim=0)


def split_gated(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_gated`."""
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def pad_vocab(weight: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """Append zero rows up to ``padded_vocab`` (the padded ids are never produced)."""
    extra = padded_vocab - weight.shape[0]
    if extra < 0:
        raise ConversionError(f"vocabulary of {weight.shape[0]} rows exceeds {padded_vocab}")
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])]) if extra else weight


# --------------------------------------------------------------------------- the table


def head_dim(cfg: ModelConfig) -> int:
    return cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads


def num_groups(cfg: ModelConfig) -> int:
    return cfg.num_query_groups or cfg.num_attention_heads


def _pick(name: str | dict[str, str], spec: Spec) -> str:
    return name if isinstance(name, str) else name[spec]


def renames(cfg: ModelConfig, spec: Spec) -> list[tuple[str, str]]:
    """The one-to-one ``(hf, mcore)`` pairs of this model, expanded over its layers."""
    pairs = []
    for hf, mc in RENAMES.items():
        if hf == "lm_head.weight" and not cfg.untie_embeddings:
            continue
        layers = range(cfg.num_layers) if "{i}" in hf else [None]
        pairs += [(hf.format(i=i), _pick(mc, spec).format(i=i)) for i in layers]
    return pairs


def _fused(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """The ``(mcore, hf names)`` fusions of this model, expanded over its layers."""
    table = {**QKV, **GATED}
    if not cfg.qkv_bias:
        table = {mc: hf for mc, hf in table.items() if not mc.endswith("linear_qkv.bias")}
    return [
        (mc.format(i=i), tuple(h.format(i=i) for h in hf))
        for mc, hf in table.items()
        for i in range(cfg.num_layers)
    ]


def hf_names(cfg: ModelConfig) -> set[str]:
    """Every Hugging Face tensor name this model has."""
    names = {hf for hf, _ in renames(cfg, "local")}
    return names.union(*(hf for _, hf in _fused(cfg)))


def mcore_names(cfg: ModelConfig, spec: Spec) -> set[str]:
    """Every Megatron-Core weight name (``_extra_state`` entries aside) of the full model."""
    return {mc for _, mc in renames(cfg, spec)} | {mc for mc, _ in _fused(cfg)}


def _check_names(have: set[str], want: set[str], what: str) -> None:
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise ConversionError(
            f"{what} does not match the model config: missing {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
            f"{' ...' if len(unexpected) > 6 else ''}"
        )


def recipes(cfg: ModelConfig, spec: Spec) -> list[tuple[str, tuple[str, ...]]]:
    """``(mcore name, its Hugging Face sources)`` for every Megatron-Core weight: one
    source is a rename, three a q/k/v interleave, two a gate/up fusion. Streaming
    converters build each weight as soon as its sources have been read."""
    return [(mc, (hf,)) for hf, mc in renames(cfg, spec)] + _fused(cfg)


def build_mcore_tensor(
    mc: str, parts: list[torch.Tensor], cfg: ModelConfig, *, padded_vocab: int
) -> torch.Tensor:
    """The Megatron-Core weight ``mc`` from its Hugging Face ``parts`` (see
    :func:`recipes`): renamed, interleaved or fused, and vocabulary-padded."""
    if len(parts) == 3:
        return interleave_qkv(*parts, num_groups=num_groups(cfg), head_dim=head_dim(cfg))
    if len(parts) == 2:
        return fuse_gated(*parts)
    return pad_vocab(parts[0], padded_vocab) if mc in VOCAB_PADDED else parts[0]


def hf_parts_of(
    mc: str, tensor: torch.Tensor, cfg: ModelConfig, parts: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`build_mcore_tensor`: the Hugging Face tensors of one Megatron
    weight (views; the padded vocabulary rows dropped)."""
    if len(parts) == 3:
        split = split_qkv(
            tensor,
            num_heads=cfg.num_attention_heads,
            num_groups=num_groups(cfg),
            head_dim=head_dim(cfg),
        )
        return dict(zip(parts, split, strict=True))
    if len(parts) == 2:
        return dict(zip(parts, split_gated(tensor), strict=True))
    return {parts[0]: tensor[: cfg.vocab_size] if mc in VOCAB_PADDED else tensor}


def is_ignored_hf(name: str) -> bool:
    """Hugging Face entries that are buffers, not weights (``rotary_emb.inv_freq``)."""
    return bool(_IGNORED_HF.fullmatch(name))


def check_hf_names(names: set[str], cfg: ModelConfig) -> None:
    """Raise :class:`ConversionError` unless ``names`` (ignored buffers and a tied
    ``lm_head.weight`` aside) are exactly this model's Hugging Face tensors."""
    have = {n for n in names if not is_ignored_hf(n)}
    if not cfg.untie_embeddings:
        have.discard("lm_head.weight")
    _check_names(have, hf_names(cfg), "the Hugging Face checkpoint")


def hf_to_mcore_state(
    hf: Mapping[str, torch.Tensor], cfg: ModelConfig, *, spec: Spec, padded_vocab: int
) -> dict[str, torch.Tensor]:
    """Hugging Face state dict -> the full Megatron-Core state dict (TP=1, PP=1).

    Args:
        hf: Hugging Face tensors by name (``lm_head.weight`` may be present when the
            embeddings are tied; it must then equal the input embedding).
        cfg: the model's shape.
        spec: ``"local"`` or ``"te"`` layer spec names.
        padded_vocab: rows of the Megatron embedding and output layer.
    """
    hf = {k: v for k, v in hf.items() if not _IGNORED_HF.fullmatch(k)}
    if not cfg.untie_embeddings and "lm_head.weight" in hf:
        lm_head = hf.pop("lm_head.weight")
        if not torch.equal(lm_head, hf.get("model.embed_tokens.weight", lm_head)):
            raise ConversionError("tie_word_embeddings is set but lm_head.weight differs")
    _check_names(set(hf), hf_names(cfg), "the Hugging Face checkpoint")
    out = {mc: hf[name] for name, mc in renames(cfg, spec)}
    groups, dim = num_groups(cfg), head_dim(cfg)
    for mc, parts in _fused(cfg):
        tensors = [hf[p] for p in parts]
        if len(parts) == 3:
            out[mc] = interleave_qkv(*tensors, num_groups=groups, head_dim=dim)
        else:
            out[mc] = fuse_gated(*tensors)
    for name in VOCAB_PADDED & out.keys():
        out[name] = pad_vocab(out[name], padded_vocab)
    return out


def mcore_to_hf_state(
    mcore: Mapping[str, torch.Tensor], cfg: ModelConfig, *, spec: Spec
) -> dict[str, torch.Tensor]:
    """The full Megatron-Core state dict (TP=1, PP=1) -> Hugging Face tensors.

    ``_extra_state`` entries are skipped; the padded vocabulary rows are dropped. The
    returned tensors are fresh contiguous copies (safetensors refuses shared storage).
    """
    mcore = {k: v for k, v in mcore.items() if not k.endswith("_extra_state")}
    _check_names(set(mcore), mcore_names(cfg, spec), "the Megatron-Core state dict")
    out = {}
    for hf, mc in renames(cfg, spec):
        tensor = mcore[mc]
        out[hf] = tensor[: cfg.vocab_size] if mc in VOCAB_PADDED else tensor
    groups, dim = num_groups(cfg), head_dim(cfg)
    for mc, parts in _fused(cfg):
        if len(parts) == 3:
            split = split_qkv(
                mcore[mc], num_heads=cfg.num_attention_heads, num_groups=groups, head_dim=dim
            )
        else:
            split = split_gated(mcore[mc])
        out.update(zip(parts, split, strict=True))
    return {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in out.items()}


def spec_of(state_names: set[str] | list[str]) -> Spec:
    """Which layer spec a full-model state dict comes from (TE fuses the norms)."""
    te = any(n.endswith("linear_qkv.layer_norm_weight") for n in state_names)
    return "te" if te else "local"
