"""Every platform decision, built on CPU for the three platforms: the plan, the Megatron
configs a GPU run builds (TransformerConfig, DDP config, optimizer config) for each
example YAML, and the refusals, each one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_pwdpo.config import ConfigError, load_config
from megatron_pwdpo.config.validation import validate
from megatron_pwdpo.model.build import transformer_config
from megatron_pwdpo.model.precision import params_dtype
from megatron_pwdpo.platform import decisions as platform
from megatron_pwdpo.platform.decisions import (
    CPU,
    GPU_WITH_TE,
    GPU_WITHOUT_TE,
    Platform,
    plan_build,
    refusal,
    token_multiple,
)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
ALL_CONFIGS = sorted(EXAMPLES.glob("*.yaml"))
PLATFORMS = {"cpu": CPU, "gpu": GPU_WITHOUT_TE, "gpu-te": GPU_WITH_TE}


def test_detect_reports_this_machine():
    here = platform.detect()
    if torch.cuda.is_available():
        assert here.cuda and here.compute_capability == torch.cuda.get_device_capability()
    else:
        assert here == CPU


def test_cpu_plan():
    plan = plan_build(load_config(None, []), CPU)
    assert (plan.layer_spec, plan.attention, plan.backend) == ("local", "sdpa", "gloo")
    assert plan.packing == {"masked"}
    tc = plan.transformer_config
    assert tc["use_cpu_initialization"] and not tc["batch_p2p_comm"]
    assert not any(v for k, v in tc.items() if k.endswith("fusion"))
    assert "layer spec local" in plan.describe()


def test_gpu_without_te_plan_uses_no_kernel_it_lacks():
    plan = plan_build(load_config(None, [], on=GPU_WITHOUT_TE), GPU_WITHOUT_TE)
    assert (plan.layer_spec, plan.attention, plan.backend) == ("local", "sdpa", "nccl")
    assert plan.packing == {"masked"}  # SDPA honours the block-diagonal mask (fused kernel)
    # Megatron's unfused attention on request: still the local spec, still masked packing
    local = load_config(None, ["model.attention=local"], on=GPU_WITHOUT_TE)
    assert plan_build(local, GPU_WITHOUT_TE).attention == "local"
    tc = plan.transformer_config
    # no apex: megatron's linear layers raise with gradient_accumulation_fusion; no TE: no
    # fused RoPE
    assert not tc["gradient_accumulation_fusion"] and not tc["apply_rope_fusion"]
    assert tc["batch_p2p_comm"] and tc["use_cpu_initialization"]


def test_gpu_with_te_plan_uses_te_kernels():
    plan = plan_build(load_config(None, [], on=GPU_WITH_TE), GPU_WITH_TE)
    assert (plan.layer_spec, plan.attention, plan.backend) == ("te", "te", "nccl")
    assert plan.packing == {"thd"}
    # SDPA inside TE's spec: the block-diagonal mask is honoured again, THD is not
    sdpa = load_config(None, ["model.attention=sdpa"], on=GPU_WITH_TE)
    assert plan_build(sdpa, GPU_WITH_TE).packing == {"masked"}
    tc = plan.transformer_config
    assert tc["gradient_accumulation_fusion"] and tc["apply_rope_fusion"]
    # TE without apex: no gradient-accumulation fusion (megatron's output layer needs apex)
    no_apex = Platform(name="TE, no apex", cuda=True, transformer_engine=True, te_version=(2, 8))
    assert not plan_build(load_config(None, [], on=no_apex), no_apex).transformer_config[
        "gradient_accumulation_fusion"
    ]


@pytest.mark.parametrize("name", PLATFORMS)
def test_fresh_weights_and_dispatcher_do_not_depend_on_the_platform(name):
    # one initialisation everywhere (CPU RNG, sliced per TP rank); the dispatcher that
    # variable sequence lengths need (allgather is refused with them, TE or not)
    tc = plan_build(load_config(None, [], on=PLATFORMS[name]), PLATFORMS[name]).transformer_config
    assert tc["use_cpu_initialization"] and tc["moe_token_dispatcher_type"] == "alltoall"


@pytest.mark.parametrize(
    ("setting", "dp", "want"),
    [("auto", 1, False), ("auto", 2, True), (True, 1, True), (False, 8, False)],
)
def test_distributed_optimizer_switch(setting, dp, want):
    config = load_config(None, [f"parallel.distributed_optimizer={str(setting).lower()}"])
    for p in PLATFORMS.values():  # the same on every platform: it runs on CPU too
        assert plan_build(config, p, data_parallel=dp).distributed_optimizer is want


@pytest.mark.parametrize("name", PLATFORMS)
@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.stem)
def test_megatron_configs_build_for_each_example_and_platform(path, name, te_answers):
    """The TransformerConfig, DDP config and optimizer config a run of ``path`` builds on
    ``name``; the example's TE-only parts (FP8, sequence parallel) are refused with one
    line where TE is missing, and build once they are switched off."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    on = PLATFORMS[name]
    overrides = []
    try:
        config = load_config(path, on=on)
    except ConfigError as err:
        assert name != "gpu-te", err  # an H100 with TE runs every example
        message = str(err)
        assert "\n" not in message and ("Transformer Engine" in message), message
        overrides = ["precision.fp8=null", "parallel.sequence_parallel=false"]
        config = load_config(path, overrides, on=on)
    plan = plan_build(config, on, data_parallel=2)
    tc = transformer_config(
        config.model,
        config.parallel,
        precision=config.precision,
        params_dtype=params_dtype(config.precision),
        plan=plan,
    )
    assert tc.params_dtype == params_dtype(config.precision)
    assert tc.bf16 == (config.precision.dtype == "bf16")
    assert bool(tc.fp8) == (config.precision.fp8 is not None)
    assert tc.sequence_parallel == config.parallel.sequence_parallel
    assert tc.use_cpu_initialization and tc.variable_seq_lengths
    ddp = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=plan.distributed_optimizer
    )
    opt = OptimizerConfig(
        optimizer="adam",
        lr=1e-5,
        bf16=tc.bf16,
        params_dtype=tc.params_dtype,
        use_distributed_optimizer=ddp.use_distributed_optimizer,
    )
    assert opt.use_distributed_optimizer  # auto, at DP=2


@pytest.mark.parametrize(
    ("overrides", "refused_on", "needle"),
    [
        (
            ["parallel.sequence_parallel=true", "parallel.tensor_parallel=2"],
            {"cpu", "gpu"},
            "parallel.sequence_parallel needs Transformer Engine's layers",
        ),
        (["data.packing=masked"], {"gpu-te"}, "fused attention ignores a block-diagonal mask"),
        (["data.packing=thd"], {"cpu", "gpu"}, "need Transformer Engine's attention"),
        (
            ["precision.dtype=bf16", "precision.fp8=tensorwise"],
            {"cpu", "gpu"},
            "needs CUDA and Transformer Engine",
        ),
        (["precision.dtype=bf16", "precision.fp8=mxfp8"], {"cpu", "gpu", "gpu-te"}, "mxfp8"),
        (["precision.dtype=bf16"], set(), ""),
    ],
)
def test_refusals_follow_the_platform(overrides, refused_on, needle):
    for name, on in PLATFORMS.items():
        if name in refused_on:
            with pytest.raises(ConfigError) as err:
                load_config(None, overrides, on=on)
            assert needle in str(err.value) and "\n" not in str(err.value), (name, err.value)
        else:
            load_config(None, overrides, on=on)


def test_current_scaling_needs_te_2_2():
    old_te = Platform(
        name="TE 2.1",
        cuda=True,
        transformer_engine=True,
        te_version=(2, 1),
        compute_capability=(9, 0),
    )
    config = load_config(None, ["precision.dtype=bf16", "precision.fp8=tensorwise"], on=GPU_WITH_TE)
    assert "needs Transformer Engine >= 2.2" in refusal(config, old_te)
    assert refusal(config, GPU_WITH_TE) is None
    with pytest.raises(ConfigError, match="Transformer Engine >= 2.2"):
        validate(config, on=old_te)


@pytest.mark.parametrize(
    ("tp", "sp", "fp8", "want"),
    [
        (1, False, None, 16),
        (4, True, None, 16),
        (4, True, "tensorwise", 32),  # 8 tokens per rank x TP 4
        (8, True, "delayed", 64),
        (8, True, "mxfp8", 256),  # MXFP8 blocks of 32 per rank
        (8, False, "mxfp8", 32),
        (3, True, None, 48),
    ],
)
def test_token_multiple(tp, sp, fp8, want):
    multiple = token_multiple(tensor_parallel=tp, sequence_parallel=sp, fp8=fp8)
    assert multiple == want
    if sp:  # every width it gives splits into whole, FP8-aligned pieces per rank
        per_rank = multiple // tp
        assert multiple % tp == 0 and (fp8 is None or per_rank % (32 if fp8 == "mxfp8" else 8) == 0)


def test_delayed_fp8_with_packing_reduces_the_amax_over_tensor_parallel_only(te_answers):
    """Packed data-parallel ranks run different numbers of micro-batches: delayed scaling's
    amax all-reduce must not span data parallel (it would wait for ranks that never join)."""
    for packing, tp_only in (("thd", True), ("none", False)):
        config = load_config(
            None,
            ["precision.dtype=bf16", "precision.fp8=delayed", f"data.packing={packing}"],
            on=GPU_WITH_TE,
        )
        plan = plan_build(config, GPU_WITH_TE, data_parallel=2)
        assert plan.transformer_config["tp_only_amax_red"] is tp_only
        tc = transformer_config(
            config.model, config.parallel, precision=config.precision, plan=plan
        )
        assert tc.tp_only_amax_red is tp_only and tc.fp8_recipe == "delayed"


def test_the_reference_runs_in_the_policys_precision_by_default():
    from megatron_pwdpo.model.precision import (
        PrecisionConfig,
        reference_numerics,
        reference_runs_fp8,
    )

    assert reference_runs_fp8(PrecisionConfig(dtype="bf16", fp8="tensorwise"))
    assert reference_runs_fp8(PrecisionConfig(dtype="bf16", fp8="mxfp8"))
    assert not reference_runs_fp8(PrecisionConfig(dtype="bf16", fp8="delayed"))
    assert not reference_runs_fp8(
        PrecisionConfig(dtype="bf16", fp8="tensorwise", fp8_reference=False)
    )
    assert reference_numerics(PrecisionConfig(dtype="bf16", fp8="tensorwise")) == (
        "bf16+fp8:tensorwise/hybrid"
    )
    assert reference_numerics(PrecisionConfig(dtype="bf16", fp8="delayed")) == "bf16"
    with pytest.raises(ConfigError, match="delayed scales come from an amax history"):
        load_config(
            None,
            ["precision.dtype=bf16", "precision.fp8=delayed", "precision.fp8_reference=true"],
            on=GPU_WITH_TE,
        )
