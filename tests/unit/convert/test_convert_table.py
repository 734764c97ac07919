"""The Hugging Face <-> Megatron name table, its special cases and the config mapping (pure)."""

import dataclasses

import pytest
import torch

from megatron_pwdpo.convert.hf_to_mcore import check_layout, load_hf_state, model_config_from_hf
from megatron_pwdpo.convert.mcore_to_hf import hf_config_from_model
from megatron_pwdpo.convert.table import (
    ConversionError,
    fuse_gated,
    hf_names,
    hf_to_mcore_state,
    interleave_qkv,
    mcore_names,
    mcore_to_hf_state,
    pad_vocab,
    spec_of,
    split_gated,
    split_qkv,
)
from megatron_pwdpo.model.build import ModelConfig, ParallelConfig, padded_vocab_size

LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "max_position_embeddings": 16384,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
MISTRAL = {
    **LLAMA,
    "model_type": "mistral",
    "head_dim": 32,
    "sliding_window": 4096,
    "max_position_embeddings": 32768,
    "rope_scaling": None,
}
# transformers 5 style: rope_parameters instead of rope_theta / rope_scaling
QWEN2 = {
    **{k: v for k, v in LLAMA.items() if k not in ("rope_theta", "rope_scaling")},
    "model_type": "qwen2",
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "use_sliding_window": False,
}
CONFIGS = {"llama": LLAMA, "mistral": MISTRAL, "qwen2": QWEN2}


def _random_hf_state(cfg: ModelConfig, *, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h, d = cfg.hidden_size, cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    q, kv, f = cfg.num_attention_heads * d, cfg.num_query_groups * d, cfg.ffn_hidden_size
    shapes = {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (cfg.vocab_size, h),
    }
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
        if cfg.qkv_bias:
            for x, n in (("q", q), ("k", kv), ("v", kv)):
                shapes[p + f"self_attn.{x}_proj.bias"] = (n,)
    if not cfg.untie_embeddings:
        del shapes["lm_head.weight"]
    return {k: torch.randn(*s, generator=gen) for k, s in shapes.items()}


def test_qkv_interleave_puts_each_groups_q_heads_then_k_then_v():
    d, heads, groups = 2, 4, 2
    q = torch.arange(heads * d).float()[:, None] + 100  # rows 100.. (head h = rows 2h, 2h+1)
    k = torch.arange(groups * d).float()[:, None] + 200
    v = torch.arange(groups * d).float()[:, None] + 300
    qkv = interleave_qkv(q, k, v, num_groups=groups, head_dim=d)
    rows = qkv[:, 0].tolist()
    # group 0: q heads 0, 1; k head 0; v head 0 -- then group 1
    assert rows == [100, 101, 102, 103, 200, 201, 300, 301, 104, 105, 106, 107, 202, 203, 302, 303]
    for got, want in zip(
        split_qkv(qkv, num_heads=heads, num_groups=groups, head_dim=d), (q, k, v), strict=True
    ):
        assert torch.equal(got, want)


def test_qkv_interleave_of_biases_and_gated_concat():
    q, k, v = torch.randn(8), torch.randn(4), torch.randn(4)
    fused = interleave_qkv(q, k, v, num_groups=2, head_dim=2)
    assert fused.shape == (16,)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            split_qkv(fused, num_heads=4, num_groups=2, head_dim=2), (q, k, v), strict=True
        )
    )
    gate, up = torch.randn(6, 3), torch.randn(6, 3)
    fc1 = fuse_gated(gate, up)
    assert torch.equal(fc1[:6], gate) and torch.equal(fc1[6:], up)  # act(first half) * second
    assert all(torch.equal(a, b) for a, b in zip(split_gated(fc1), (gate, up), strict=True))


def test_vocab_padding_adds_zero_rows_and_refuses_shrinking():
    w = torch.randn(300, 4)
    padded = pad_vocab(w, 320)
    assert padded.shape == (320, 4) and torch.equal(padded[:300], w) and not padded[300:].any()
    with pytest.raises(ConversionError):
        pad_vocab(w, 256)


def test_padded_vocab_is_the_same_at_every_power_of_two_tp():
    assert {padded_vocab_size(300, multiple=64, tensor_parallel=t) for t in (1, 2, 4, 8)} == {320}
    assert padded_vocab_size(2048, multiple=64, tensor_parallel=2) == 2048
    assert padded_vocab_size(300, multiple=64, tensor_parallel=3) == 384  # divisible by 3


@pytest.mark.parametrize("arch", CONFIGS)
@pytest.mark.parametrize("spec", ["local", "te"])
def test_state_round_trip_is_exact(arch, spec):
    cfg = model_config_from_hf(CONFIGS[arch])
    hf = _random_hf_state(cfg)
    mc = hf_to_mcore_state(hf, cfg, spec=spec, padded_vocab=320)
    assert set(mc) == mcore_names(cfg, spec) and spec_of(list(mc)) == spec
    assert mc["embedding.word_embeddings.weight"].shape[0] == 320
    layer_norm = "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"
    assert (layer_norm in mc) == (spec == "te")
    assert ("output_layer.weight" in mc) == cfg.untie_embeddings
    assert ("decoder.layers.0.self_attention.linear_qkv.bias" in mc) == (arch == "qwen2")
    back = mcore_to_hf_state({**mc, "output_layer._extra_state": None}, cfg, spec=spec)
    assert set(back) == set(hf) == hf_names(cfg)
    assert all(torch.equal(back[k], v) and back[k].is_contiguous() for k, v in hf.items())


def test_unknown_missing_and_untied_lm_head_are_refused():
    cfg = model_config_from_hf(QWEN2)  # tied
    hf = _random_hf_state(cfg)
    ok = hf_to_mcore_state(
        {
            **hf,
            "lm_head.weight": hf["model.embed_tokens.weight"].clone(),
            "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
        },
        cfg,
        spec="local",
        padded_vocab=320,
    )
    assert "output_layer.weight" not in ok
    with pytest.raises(ConversionError, match="lm_head.weight differs"):
        hf_to_mcore_state(
            {**hf, "lm_head.weight": torch.zeros(300, 64)}, cfg, spec="local", padded_vocab=320
        )
    with pytest.raises(ConversionError, match="unexpected"):
        hf_to_mcore_state(
            {**hf, "model.extra.weight": torch.ones(1)}, cfg, spec="local", padded_vocab=320
        )
    del hf["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ConversionError, match="missing"):
        hf_to_mcore_state(hf, cfg, spec="local", padded_vocab=320)


def test_config_mapping_per_architecture():
    llama = model_config_from_hf(LLAMA)
    assert (llama.rope_scaling, llama.rope_scaling_factor, llama.rotary_base) == (
        "llama3",
        8.0,
        500000,
    )
    assert llama.untie_embeddings and not llama.qkv_bias and llama.kv_channels is None
    assert (llama.num_query_groups, llama.norm_epsilon, llama.max_seq_length) == (2, 1e-5, 16384)
    mistral = model_config_from_hf(MISTRAL)
    assert mistral.kv_channels == 32 and mistral.max_seq_length == 4096  # capped at the window
    qwen = model_config_from_hf(QWEN2)
    assert qwen.qkv_bias and not qwen.untie_embeddings and qwen.rotary_base == 1000000
    linear = model_config_from_hf({**LLAMA, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (linear.rope_scaling, linear.rope_scaling_factor) == ("linear", 2.0)


@pytest.mark.parametrize("arch", CONFIGS)
def test_written_hf_config_maps_back_to_the_same_model_config(arch):
    cfg = model_config_from_hf(CONFIGS[arch])
    for base in (CONFIGS[arch], None):
        written = hf_config_from_model(cfg, base=base, dtype="bfloat16")
        assert written["torch_dtype"] == "bfloat16"
        again = model_config_from_hf(written)
        if base is None and arch == "mistral":  # written as Llama: no window cap
            again = dataclasses.replace(again, max_seq_length=cfg.max_seq_length)
        assert again == cfg
    assert hf_config_from_model(cfg)["architectures"] == [
        "Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gemma"}, "model_type 'gemma'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
        (
            {"rope_scaling": {**LLAMA["rope_scaling"], "high_freq_factor": 2.0}},
            "high_freq_factor=4",
        ),
        ({"rope_theta": 10000.5}, "not an integer"),
        ({"use_sliding_window": True}, "use_sliding_window"),
    ],
)
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ConversionError, match=message):
        model_config_from_hf({**LLAMA, **change})


def test_layout_check():
    cfg = model_config_from_hf(LLAMA)
    check_layout(cfg, ParallelConfig(tensor_parallel=2, pipeline_parallel=2))
    with pytest.raises(ConversionError, match="tensor_parallel=4"):
        check_layout(cfg, ParallelConfig(tensor_parallel=4))  # 2 query groups
    with pytest.raises(ConversionError, match="pipeline_parallel=4"):
        check_layout(cfg, ParallelConfig(pipeline_parallel=4))


def test_pickled_weights_are_refused_without_loading(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(ConversionError, match="not loaded"):
        load_hf_state(tmp_path)
    with pytest.raises(ConversionError, match="no model.safetensors"):
        load_hf_state(tmp_path / "missing")


def test_checkpoint_paths_resolve_from_root_run_dir_or_iteration(tmp_path):
    from megatron_pwdpo.convert.mcore_to_hf import resolve_checkpoint

    root = tmp_path / "run" / "checkpoints"
    (root / "iter_0000003").mkdir(parents=True)
    (root / "iter_0000003" / "metadata.json").write_text("{}")
    (root / "latest.txt").write_text("3\n")
    want = (root / "iter_0000003", root)
    assert resolve_checkpoint(root) == want
    assert resolve_checkpoint(tmp_path / "run") == want
    assert resolve_checkpoint(root / "iter_0000003") == want
    with pytest.raises(ConversionError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)


# ------------------------------------------------------------ streaming, file by file


def _save_in_files(hf: dict, folder, groups: list[list[str]]) -> list:
    from safetensors.torch import save_file

    files = []
    for k, names in enumerate(groups):
        path = folder / f"model-{k}.safetensors"
        save_file({n: hf[n].contiguous() for n in names}, str(path))
        files.append(path)
    return files


@pytest.mark.parametrize("arch", CONFIGS)
def test_streaming_file_by_file_builds_the_whole_state_dict(arch, tmp_path):
    from megatron_pwdpo.convert.hf_to_mcore import stream_into

    cfg = model_config_from_hf(CONFIGS[arch])
    hf = {k: v.to(torch.bfloat16) for k, v in _random_hf_state(cfg).items()}
    names = sorted(hf, reverse=True)  # final norm, head ... layer 0, embedding: worst order
    if not cfg.untie_embeddings:  # a tied model saved with its lm_head, in the first file
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"].clone()
        names.insert(0, "lm_head.weight")
    # q in one file, k and v in the next: a layer split across files
    groups = [names[i : i + 3] for i in range(0, len(names), 3)]
    files = _save_in_files(hf, tmp_path, groups)
    whole = hf_to_mcore_state(hf, cfg, spec="te", padded_vocab=320)
    params = {k: torch.full_like(v, float("nan")) for k, v in whole.items()}
    stream_into(params, files, cfg, spec="te", padded_vocab=320)
    for name, tensor in whole.items():
        assert params[name].dtype == torch.bfloat16  # the checkpoint's dtype, no fp32 copy
        assert torch.equal(params[name], tensor), name


def test_streaming_refuses_a_differing_tied_head_and_a_model_it_cannot_fill(tmp_path):
    from megatron_pwdpo.convert.hf_to_mcore import stream_into

    cfg = model_config_from_hf(QWEN2)  # tied
    hf = {**_random_hf_state(cfg), "lm_head.weight": torch.zeros(300, 64)}
    files = _save_in_files(hf, tmp_path, [sorted(hf)])
    whole = hf_to_mcore_state(
        {k: v for k, v in hf.items() if k != "lm_head.weight"}, cfg, spec="local", padded_vocab=320
    )
    params = {k: torch.empty_like(v) for k, v in whole.items()}
    with pytest.raises(ConversionError, match="lm_head.weight differs"):
        stream_into(params, files, cfg, spec="local", padded_vocab=320)
    with pytest.raises(ConversionError, match="nothing fills"):
        stream_into(
            {**params, "extra.weight": torch.ones(1)}, files, cfg, spec="local", padded_vocab=320
        )


def test_hf_shards_are_written_one_at_a_time_with_an_index(tmp_path):
    import json

    from safetensors.torch import load_file

    from megatron_pwdpo.convert.mcore_to_hf import write_hf_shards

    cfg = model_config_from_hf(LLAMA)
    hf = _random_hf_state(cfg)
    mc = hf_to_mcore_state(hf, cfg, spec="local", padded_vocab=320)
    total = sum(v.numel() for v in hf.values()) * 2
    files = write_hf_shards(mc, cfg, tmp_path, dtype=torch.bfloat16, max_shard_bytes=total // 4)
    assert len(files) >= 4 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(hf) and set(index["weight_map"].values()) == set(files)
    back = {}
    for file in files:
        back |= load_file(str(tmp_path / file))
    assert all(torch.equal(back[k], v.to(torch.bfloat16)) for k, v in hf.items())
    # a model that fits in one shard is one model.safetensors, as before
    one = tmp_path / "one"
    one.mkdir()
    assert write_hf_shards(mc, cfg, one, dtype=torch.float32, max_shard_bytes=2**40) == [
        "model.safetensors"
    ]
