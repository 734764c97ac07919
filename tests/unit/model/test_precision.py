"""Precision settings: TransformerConfig fields, refusal on CPU, the reference's bf16 switch."""

from types import SimpleNamespace

import pytest
import torch

from megatron_pwdpo.config import ConfigError, load_config
from megatron_pwdpo.model.build import ModelConfig, ParallelConfig, transformer_config
from megatron_pwdpo.model.precision import (
    PrecisionConfig,
    check_supported,
    reference_precision,
    transformer_config_kwargs,
)
from megatron_pwdpo.platform.decisions import CPU, GPU_WITH_TE, GPU_WITHOUT_TE, plan_build


def test_default_is_fp32_and_unchanged():
    assert transformer_config_kwargs(None) == transformer_config_kwargs(PrecisionConfig())
    kwargs = transformer_config_kwargs(PrecisionConfig())
    assert kwargs == {"params_dtype": torch.float32, "pipeline_dtype": torch.float32, "bf16": False}
    assert check_supported(PrecisionConfig()) is None


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "mxfp8"])
def test_fp8_fields(recipe, te_answers):
    kwargs = transformer_config_kwargs(PrecisionConfig(dtype="bf16", fp8=recipe))
    assert kwargs["bf16"] and kwargs["params_dtype"] == torch.bfloat16
    assert kwargs["fp8"] == "hybrid" and kwargs["fp8_recipe"] == recipe
    assert ("fp8_amax_history_len" in kwargs) == (recipe == "delayed")
    # megatron-core accepts the names (a TransformerConfig is built, on CPU too)
    tc = transformer_config(
        ModelConfig(),
        ParallelConfig(),
        plan=plan_build(load_config(None, [], on=GPU_WITH_TE), GPU_WITH_TE),
        precision=PrecisionConfig(dtype="bf16", fp8=recipe, fp8_format="e4m3"),
    )
    assert (tc.fp8, tc.fp8_recipe, tc.bf16) == ("e4m3", recipe, True)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["precision.fp8=delayed"], "precision.fp8=delayed needs precision.dtype=bf16"),
        (["precision.dtype=bf16", "precision.fp8=tensorwise"], "needs CUDA and Transformer"),
        (["precision.fp8=fp4"], "precision.fp8: 'fp4' is not one of"),
    ],
)
def test_refused_on_cpu_with_one_line(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, on=CPU)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bf16_is_accepted_on_every_platform():
    for platform in (CPU, GPU_WITHOUT_TE, GPU_WITH_TE):
        assert load_config(None, ["precision.dtype=bf16"], on=platform).precision.dtype == "bf16"


def test_reference_precision_switches_fp8_off_and_back():
    config = SimpleNamespace(fp8="hybrid")
    policy = SimpleNamespace(module=SimpleNamespace(config=config))  # a DDP-like wrapper
    fp8 = PrecisionConfig(dtype="bf16", fp8="delayed")
    with reference_precision(fp8, [policy]):
        assert config.fp8 is None
    assert config.fp8 == "hybrid"
    with pytest.raises(RuntimeError), reference_precision(fp8, [policy]):
        raise RuntimeError("a failing forward")
    assert config.fp8 == "hybrid"
    with reference_precision(
        PrecisionConfig(dtype="bf16", fp8="delayed", fp8_reference=True), [policy]
    ):
        assert config.fp8 == "hybrid"
