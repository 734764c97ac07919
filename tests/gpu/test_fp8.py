"""FP8 (Transformer Engine) against bf16: the training loss stays close, step by step.

The same run (the tiny default model, SFT then point-wise DPO, same seed and data) in
bf16 and with each FP8 recipe this GPU supports; every per-step training loss of the
FP8 run must be within the stated tolerance of the bf16 run's:

* SFT stage (token-mean NLL, about 7.6 nats at the start): relative difference <= 2%;
* point-wise DPO stage (about ln 2 = 0.69): absolute difference <= 0.02.

FP8 rounds every GEMM input to 3 (E4M3) or 2 (E5M2) mantissa bits with a per-tensor
(or per-block) scale, so per-step losses differ by well under 1% on a healthy setup;
a wrong scale (an amax never updated, a recipe silently ignored, a reference forward
in the wrong precision) shows as a loss that drifts away over the steps.

FP8 must really be on: the FP8 curve differs from the bf16 one (a run with FP8 silently
off would pass the closeness bounds), the run's log names the recipe, and with
``tensorwise`` (the examples' recipe; the reference runs in FP8 too by default) the first
point-wise DPO step has rewards exactly 0 and loss ln 2. With two or more GPUs the same
runs at TP=2 with sequence parallelism, with THD packing, and at DP=2.

Needs CUDA (compute capability >= 8.9; ``mxfp8``: >= 10) and Transformer Engine;
skipped otherwise (the CPU suite checks the configuration these runs build:
``tests/unit/platform/test_platform.py``).
"""

import pytest
import torch
from conftest import run_cli, train_curve

from megatron_pwdpo.model.precision import have_transformer_engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(
        torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
        reason="FP8 needs compute capability >= 8.9 (Ada, Hopper, Blackwell)",
    ),
    pytest.mark.skipif(not have_transformer_engine(), reason="needs Transformer Engine"),
]

SFT_RTOL, DPO_ATOL = 0.02, 0.02
STEPS = 20

ARGS = [
    "train",
    # the tiny default model (examples/tiny_cpu.yaml): every width a multiple of 32
    "model.num_layers=4",
    "model.hidden_size=128",
    "model.ffn_hidden_size=352",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.max_seq_length=256",
    "data.seq_length=256",
    "data.eval_rows=16",
    "train.micro_batch_size=4",
    "train.global_batch_size=16",
    "train.eval_interval=1000",
    "train.progress=false",
    f"train.sft_steps={STEPS}",
    f"train.steps={STEPS}",
    "precision.dtype=bf16",
]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("bf16")
    run_cli([*ARGS, f"run_dir={run_dir}"], timeout=900)
    return run_dir


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "mxfp8"])
def test_fp8_loss_stays_close_to_bf16(recipe, bf16_run, tmp_path):
    if recipe == "mxfp8" and torch.cuda.get_device_capability() < (10, 0):
        pytest.skip("MXFP8 needs Blackwell (compute capability >= 10)")
    proc = run_cli([*ARGS, f"precision.fp8={recipe}", f"run_dir={tmp_path}"], timeout=900)
    assert f"fp8 {recipe}" in proc.stdout + proc.stderr  # the plan the run logged
    sft, sft_bf16 = train_curve(tmp_path, "sft"), train_curve(bf16_run, "sft")
    dpo, dpo_bf16 = train_curve(tmp_path, "pointwise_dpo"), train_curve(bf16_run, "pointwise_dpo")
    assert len(sft) == len(sft_bf16) == STEPS and len(dpo) == len(dpo_bf16) == STEPS
    for step, (a, b) in enumerate(zip(sft, sft_bf16, strict=True), 1):
        assert abs(a - b) <= SFT_RTOL * abs(b), f"SFT step {step}: fp8 {a:.4f} vs bf16 {b:.4f}"
    for step, (a, b) in enumerate(zip(dpo, dpo_bf16, strict=True), 1):
        assert abs(a - b) <= DPO_ATOL, f"DPO step {step}: fp8 {a:.4f} vs bf16 {b:.4f}"
    # both learn: the SFT loss falls over the stage
    assert sft[-1] < sft[0] and sft_bf16[-1] < sft_bf16[0]
    # FP8 really ran: its numbers are not bf16's
    assert max(abs(a - b) for a, b in zip(sft, sft_bf16, strict=True)) > 0
    if recipe == "tensorwise":  # the reference in FP8 too: no quantisation bias at step 0
        first = train_curve(tmp_path, "pointwise_dpo", "reward_desirable")[0]
        assert first == 0 and dpo[0] == pytest.approx(0.6931471805599453, abs=1e-6)


@pytest.mark.parametrize(
    ("layout", "nproc"),
    [
        (["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"], 2),
        (["data.packing=thd"], 1),
        ([], 2),  # DP=2, the distributed optimizer
        (["data.packing=thd", "precision.fp8=delayed"], 2),  # TP-only amax reduction
    ],
    ids=["tp2-sp", "thd", "dp2", "thd-dp2-delayed"],
)
def test_fp8_layouts_train(layout, nproc, tmp_path):
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs, this machine has {torch.cuda.device_count()}")
    short = [a for a in ARGS if not a.startswith(("train.sft_steps", "train.steps"))]
    args = [*short, "train.sft_steps=2", "train.steps=3", "precision.fp8=tensorwise", *layout]
    run_cli([*args, f"run_dir={tmp_path}"], nproc=nproc, timeout=900)
    dpo = train_curve(tmp_path, "pointwise_dpo")
    assert len(dpo) == 3 and all(0 < x < 2 for x in dpo)
