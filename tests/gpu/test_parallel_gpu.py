"""GPU-only parallel paths: sequence parallelism (Transformer Engine layer spec) and the
distributed optimizer, each against the single-GPU run of the same config and weights.
They need 2 GPUs; the CPU tests cover the same comparisons with the local spec."""

import pytest
import torch
from conftest import TINY, assert_same_curves, run_cli, save_initial_weights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

ARGS = ["train", *TINY, "train.sft_steps=2", "train.steps=2"]


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    return save_initial_weights(TINY, tmp_path_factory.mktemp("init"))


@pytest.fixture(scope="module")
def single(initial, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    run_cli([*ARGS, f"train.init_checkpoint={initial}", f"run_dir={run_dir}"])
    return run_dir


def test_sequence_parallel_tp2_matches_one_gpu(initial, single, tmp_path):
    run_cli(
        [
            *ARGS,
            "parallel.tensor_parallel=2",
            "parallel.sequence_parallel=true",
            f"train.init_checkpoint={initial}",
            f"run_dir={tmp_path}",
        ],
        nproc=2,
    )
    assert_same_curves(single, tmp_path, steps=2, rtol=1e-4)


def test_distributed_optimizer_dp2_matches_one_gpu(initial, single, tmp_path):
    # parallel.distributed_optimizer=auto: on at DP=2
    run_cli([*ARGS, f"train.init_checkpoint={initial}", f"run_dir={tmp_path}"], nproc=2)
    assert_same_curves(single, tmp_path, steps=2, rtol=1e-4)
