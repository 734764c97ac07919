"""``SDPAttention`` against a naive softmax formula and Megatron's local attention, the
attention choice of ``model.attention`` and its refusals (a gloo world of one)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
from conftest import world_of_one
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_pwdpo.config import ConfigError, load_config
from megatron_pwdpo.data.packing import block_causal_mask
from megatron_pwdpo.model.attention import SDPAttention, block_causal_runs
from megatron_pwdpo.model.build import (
    ModelConfig,
    ParallelConfig,
    layer_spec,
    resolve_attention,
    transformer_config,
)
from megatron_pwdpo.platform import cpu_bridge
from megatron_pwdpo.platform.decisions import CPU, plan_build

SQ, B, HEADS, GROUPS, HN = 12, 3, 4, 2, 16


@dataclass(frozen=True)
class _Run:
    """What the CPU platform's plan reads of a run: this model, default layout."""

    model: ModelConfig
    parallel: ParallelConfig = ParallelConfig()
    precision: None = None


@pytest.fixture(scope="module")
def world():
    """A gloo world of one with Megatron's parallel state (TP=1) around the tests."""
    with world_of_one():
        cpu_bridge.manual_seed(0)  # Megatron's RNG tracker (its local attention forks it)
        yield


def _config(**overrides):
    model = ModelConfig(hidden_size=HEADS * HN, num_attention_heads=HEADS, num_query_groups=GROUPS)
    config = transformer_config(model, ParallelConfig(), plan=plan_build(_Run(model), CPU))
    return dataclasses.replace(config, **overrides) if overrides else config


def _attention(cls, config=None, **kw):
    return cls(
        config or _config(),
        layer_number=3,
        attn_mask_type=AttnMaskType.causal,
        attention_type="self",
        **kw,
    )


def _qkv():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(SQ, B, HEADS, HN, generator=g)
    k = torch.randn(SQ, B, GROUPS, HN, generator=g)
    v = torch.randn(SQ, B, GROUPS, HN, generator=g)
    return [t.requires_grad_() for t in (q, k, v)]


def _packed_mask():
    """[B, 1, SQ, SQ] True = masked: rows of 5, 4 and 3 positions; 7 + 3 padding; 12."""
    segments = torch.tensor(
        [[0] * 5 + [1] * 4 + [2] * 3, [0] * 7 + [-1] * 5, [0] * 12], dtype=torch.int64
    )
    return block_causal_mask(segments)


def _naive(q, k, v, masked, scale):
    """softmax(scale * q k^T, masked -> -inf) v per head; head h reads group h // (n/g)."""
    rep = HEADS // GROUPS
    out = torch.empty(SQ, B, HEADS * HN)
    for b in range(B):
        for h in range(HEADS):
            qh, kh, vh = q[:, b, h], k[:, b, h // rep], v[:, b, h // rep]  # [s, hn]
            scores = scale * qh @ kh.T  # [sq, sk]
            scores = scores.masked_fill(masked[b], float("-inf"))
            out[:, b, h * HN : (h + 1) * HN] = torch.softmax(scores, dim=-1) @ vh
    return out


def _run(module, q, k, v, mask):
    out = module(q, k, v, mask)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("packed", [False, True])
def test_sdpa_attention_is_the_softmax_formula(world, packed):
    q, k, v = _qkv()
    mask = _packed_mask() if packed else None
    masked = mask[:, 0] if packed else ~torch.ones(B, SQ, SQ, dtype=torch.bool).tril()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # the fused CPU kernel, not math
        got, got_grads = _run(_attention(SDPAttention), q, k, v, mask)
    want, want_grads = _run(lambda *a: _naive(*a[:3], masked, 1 / math.sqrt(HN)), q, k, v, None)
    assert got.shape == (SQ, B, HEADS * HN)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_softmax_scale_and_layer_scaling_as_megatron(world):
    # An explicit softmax_scale, and query-key layer scaling (Megatron divides the scale
    # by the layer number, then multiplies the fp32 scores by it again): the same numbers.
    q, k, v = _qkv()
    mask = _packed_mask()
    config = _config(apply_query_key_layer_scaling=True)
    for kw in [{"softmax_scale": 0.05}, {}]:
        got, got_grads = _run(_attention(SDPAttention, config, **kw), q, k, v, mask)
        want, want_grads = _run(_attention(DotProductAttention, config, **kw), q, k, v, mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    wrong, _ = _run(_attention(SDPAttention, config, softmax_scale=0.051), q, k, v, mask)
    assert not torch.allclose(wrong, want, rtol=1e-5, atol=1e-5)  # the check can fail


def test_unsupported_features_are_refused(world):
    with pytest.raises(ValueError, match="sliding-window"):
        _attention(SDPAttention, _config(window_size=(4, 0)))
    attention = _attention(SDPAttention)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="packed_seq_params"):
        attention(q, k, v, None, packed_seq_params=object())
    with pytest.raises(ValueError, match="attention_bias"):
        attention(q, k, v, None, attention_bias=torch.zeros(1))


@pytest.mark.parametrize(
    ("requested", "use_te", "kind"),
    [
        ("auto", True, "te"),
        ("auto", False, "sdpa"),
        ("sdpa", True, "sdpa"),
        ("sdpa", False, "sdpa"),
        ("local", True, "local"),
        ("local", False, "local"),
    ],
)
def test_resolve_attention(requested, use_te, kind):
    assert resolve_attention(requested, use_te=use_te) == kind


def test_resolve_attention_refuses_unknown_names():
    with pytest.raises(ValueError, match="model.attention: 'flash'"):
        resolve_attention("flash", use_te=False)


def test_config_refuses_unknown_attention():
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(None, ["model.attention=flash"])


def _core(spec):
    return spec.submodules.self_attention.submodules.core_attention


def test_local_layer_spec_gets_the_chosen_core_attention():
    assert _core(layer_spec(use_te=False, attention="auto")) is SDPAttention
    assert _core(layer_spec(use_te=False, attention="sdpa")) is SDPAttention
    assert _core(layer_spec(use_te=False, attention="local")) is DotProductAttention


def test_te_layer_spec_keeps_te_attention_unless_asked(monkeypatch):
    # Transformer Engine is not installed here, so megatron-core cannot build its TE spec:
    # a local spec stands in for it (same structure), marked by a sentinel core attention.
    from megatron.core.models.gpt import gpt_layer_specs

    class TEAttentionStandIn:
        pass

    def te_spec():
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
        spec.submodules.self_attention.submodules.core_attention = TEAttentionStandIn
        return spec

    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec", te_spec)
    assert _core(layer_spec(use_te=True, attention="auto")) is TEAttentionStandIn
    assert _core(layer_spec(use_te=True, attention="sdpa")) is SDPAttention
    assert _core(layer_spec(use_te=True, attention="local")) is DotProductAttention


def test_block_causal_runs_cut_packed_rows_and_refuse_other_masks(world):
    assert block_causal_runs(_packed_mask()) == [
        [(0, 5, True), (5, 9, True), (9, 12, True)],
        [(0, 7, True), (7, 12, False)],  # the padding: each position sees itself
        [(0, 12, True)],
    ]
    # a sliding window (each position sees itself and the 2 before) is not block-causal:
    # no runs, and the module falls back to SDPA with the mask itself
    i = torch.arange(SQ)
    window = ~((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 3))
    mask = window.expand(B, 1, SQ, SQ).clone()
    assert block_causal_runs(mask) is None
    q, k, v = _qkv()
    got, got_grads = _run(_attention(SDPAttention), q, k, v, mask)
    want, want_grads = _run(lambda *a: _naive(*a[:3], mask[:, 0], 1 / math.sqrt(HN)), q, k, v, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
