"""Pipeline parallelism (1F1B and interleaved), TP x PP, and loading an initial checkpoint.

Pipeline stages build their layers from a different point of the RNG stream than a
single process does, so every run here starts from the same saved initial weights
(``train.init_checkpoint``, a torch_dist checkpoint resharded on load). The per-step
losses and gradient norms of the SFT and point-wise DPO stages must then match the
single-process run.
"""

import pytest
from conftest import (
    TINY,
    assert_same_curves,
    read_metrics,
    run_cli,
    save_initial_weights,
)

pytestmark = pytest.mark.dist

FOUR_LAYERS = [*TINY, "model.num_layers=4"]
ARGS = ["train", *FOUR_LAYERS, "train.sft_steps=2", "train.steps=2"]


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    return save_initial_weights(FOUR_LAYERS, tmp_path_factory.mktemp("init"))


@pytest.fixture(scope="module")
def single(initial, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    run_cli([*ARGS, f"train.init_checkpoint={initial}", f"run_dir={run_dir}"])
    return run_dir


def test_init_checkpoint_is_the_starting_point(initial, single, tmp_path):
    # another seed draws other random weights, but the checkpoint replaces them: the
    # held-out loss before any update is the same (the seed still changes the data order)
    run_cli([*ARGS, f"train.init_checkpoint={initial}", "train.seed=99", f"run_dir={tmp_path}"])
    first_eval = [m for m in read_metrics(tmp_path) if m.get("split") == "eval"][0]
    want = [m for m in read_metrics(single) if m.get("split") == "eval"][0]
    assert first_eval["step"] == want["step"] == 0
    assert first_eval["loss"] == pytest.approx(want["loss"], rel=1e-6)


@pytest.mark.parametrize(
    ("nproc", "layout"),
    [
        (2, ["parallel.pipeline_parallel=2"]),
        (2, ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2"]),
        (4, ["parallel.pipeline_parallel=2", "parallel.tensor_parallel=2"]),
    ],
    ids=["pp2", "pp2-vp2", "tp2-pp2"],
)
def test_pipeline_layouts_match_single_process(initial, single, tmp_path, nproc, layout):
    run_cli(
        [*ARGS, *layout, f"train.init_checkpoint={initial}", f"run_dir={tmp_path}"],
        nproc=nproc,
        timeout=600,
    )
    # interleaved 1F1B evaluates a multiple of micro_batch x PP rows (12 of 14 here)
    vp = "parallel.virtual_pipeline=2" in layout
    assert_same_curves(single, tmp_path, steps=2, evals=not vp)
