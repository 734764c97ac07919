"""The distributed optimizer and bf16 on CPU over gloo: the production paths of the
cluster configs, executed here.

The distributed optimizer (DP=2) gives the plain optimizer's curve; a run interrupted
mid-stage resumes to the uninterrupted curve, at the same layout and resharded (DP=2 ->
DP=1, TP=2 x DP=2 -> TP=1 x DP=2). bf16 (``Float16Module`` + fp32 master weights):
step 0 of point-wise DPO has loss ln 2 and rewards 0 exactly; 20 steps stay within a
stated tolerance of the fp32 curve from the same initial checkpoint, and differ from it
(bf16 really ran).
"""

import shutil

import numpy as np
import pytest
from conftest import TINY, read_metrics, run_cli, save_initial_weights

pytestmark = pytest.mark.dist

# 3 SFT steps then 3 point-wise DPO steps = iterations 1..6; checkpoints at iterations 2,
# 3 (SFT end), 5 (mid-stage: Adam state) and 6.
ARGS = ["train", *TINY, "train.sft_steps=3", "train.steps=3", "train.save_interval=2"]
DISTOPT = "parallel.distributed_optimizer=true"


def _curve(run_dir):
    train = [m for m in read_metrics(run_dir) if m.get("split", "train") == "train"]
    return {m["iteration"]: m for m in train}


def _evals(run_dir):
    return {(m["stage"], m["step"]): m for m in read_metrics(run_dir) if m.get("split") == "eval"}


def _assert_same_curve(want, got, *, rtol):
    """Per-step loss and gradient norm, and the held-out loss after each stage's last
    update (the only logged number that sees the update after a resume at iteration 5)."""
    a, b = _curve(want), _curve(got)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for it in a:
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(b[it][key], a[it][key], rtol=rtol, err_msg=f"{it} {key}")
    ea, eb = _evals(want), _evals(got)
    assert set(ea) == set(eb) and ("pointwise_dpo", 3) in ea
    for key in ea:
        np.testing.assert_allclose(eb[key]["loss"], ea[key]["loss"], rtol=rtol, err_msg=str(key))


def _crash_at_6(run_dir, *, nproc, extra=()):
    """Train until iteration 6 fails; the newest checkpoint is the mid-stage one (5)."""
    crashed = run_cli(
        [*ARGS, f"run_dir={run_dir}", *extra],
        nproc=nproc,
        check=False,
        env={"PWDPO_FAULT": "exit@6"},
    )
    assert crashed.returncode != 0
    assert (run_dir / "checkpoints" / "latest.txt").read_text().strip() == "5"


@pytest.fixture(scope="module")
def distopt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("distopt")
    run_cli([*ARGS, f"run_dir={run_dir}", DISTOPT], nproc=2)
    return run_dir


def test_distributed_optimizer_gives_the_plain_optimizers_curve(distopt, tmp_path):
    run_cli([*ARGS, f"run_dir={tmp_path}", "parallel.distributed_optimizer=false"], nproc=2)
    _assert_same_curve(tmp_path, distopt, rtol=1e-6)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """A DP=2 distributed-optimizer run that failed at iteration 6 (copied per test)."""
    run_dir = tmp_path_factory.mktemp("crashed")
    _crash_at_6(run_dir, nproc=2, extra=[DISTOPT])
    return run_dir


def _copy(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_interrupted_and_resumed_equals_uninterrupted(distopt, crashed, tmp_path):
    _copy(crashed, tmp_path)
    run_cli([*ARGS, f"run_dir={tmp_path}", DISTOPT], nproc=2)
    _assert_same_curve(distopt, tmp_path, rtol=1e-6)


def test_resharded_dp2_to_dp1_continues_the_curve(distopt, crashed, tmp_path):
    _copy(crashed, tmp_path)
    # auto follows the checkpoint: the distributed optimizer at DP=1 loads its state
    run_cli([*ARGS, f"run_dir={tmp_path}"], nproc=1)
    _assert_same_curve(distopt, tmp_path, rtol=2e-5)
    # an explicit plain optimizer cannot load it: refused in one line, nothing written
    before = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "checkpoints" / "latest.txt").write_text("5\n")
    proc = run_cli(
        [*ARGS, f"run_dir={tmp_path}", "parallel.distributed_optimizer=false"], check=False
    )
    assert proc.returncode == 2
    assert "holds optimizer state of the distributed optimizer" in proc.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_resharded_tp2_dp2_to_tp1_dp2_continues_the_curve(distopt, tmp_path):
    _crash_at_6(tmp_path, nproc=4, extra=[DISTOPT, "parallel.tensor_parallel=2"])
    run_cli([*ARGS, f"run_dir={tmp_path}", DISTOPT], nproc=2)
    _assert_same_curve(distopt, tmp_path, rtol=2e-5)


def test_bf16_distributed_optimizer_resumes_exactly(tmp_path):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    bf16 = [DISTOPT, "precision.dtype=bf16"]
    run_cli([*ARGS, f"run_dir={full}", *bf16], nproc=2)
    _crash_at_6(crashed, nproc=2, extra=bf16)
    run_cli([*ARGS, f"run_dir={crashed}", *bf16], nproc=2)
    _assert_same_curve(full, crashed, rtol=1e-6)
    dpo = [m for m in read_metrics(full) if m.get("stage") == "pointwise_dpo"]
    first = next(m for m in dpo if m.get("split", "train") == "train")
    assert first["loss"] == pytest.approx(np.log(2.0), abs=1e-7)  # policy == reference
    assert first["reward_desirable"] == 0 and first["reward_undesirable"] == 0


# bf16 against fp32 from one initial checkpoint. bf16 keeps 8 significant bits (unit
# roundoff 2^-8 = 3.9e-3) in the weights and activations; the log-probs and losses are
# fp32 (Float16Module returns fp32, the cross-entropy upcasts) and the master weights and
# Adam are fp32, so the error does not compound through the optimizer. Measured over 20
# point-wise DPO steps of the tiny model: loss within 1.7e-4 relative, gradient norm
# within 1.2e-3. The bounds below leave ~5x headroom, well under one roundoff unit.
BF16_LOSS_RTOL, BF16_GRAD_NORM_RTOL = 1e-3, 5e-3


def test_bf16_curve_is_within_tolerance_of_fp32(tmp_path):
    init = save_initial_weights(TINY, tmp_path / "init")
    curves = {}
    for dtype in ("fp32", "bf16"):
        run_dir = tmp_path / dtype
        run_cli(
            [
                "train",
                *TINY,
                "train.sft_steps=0",
                "train.steps=20",
                f"train.init_checkpoint={init}",
                f"precision.dtype={dtype}",
                f"run_dir={run_dir}",
            ]
        )
        curves[dtype] = [m for m in read_metrics(run_dir) if m.get("split", "train") == "train"]
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert len(fp32) == len(bf16) == 20
    assert bf16[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-7)
    assert bf16[0]["reward_desirable"] == 0 and bf16[0]["reward_undesirable"] == 0
    loss = np.array([[m["loss"] for m in c] for c in (fp32, bf16)])
    norm = np.array([[m["grad_norm"] for m in c] for c in (fp32, bf16)])
    np.testing.assert_allclose(loss[1], loss[0], rtol=BF16_LOSS_RTOL)
    np.testing.assert_allclose(norm[1], norm[0], rtol=BF16_GRAD_NORM_RTOL)
    assert np.abs(norm[1] - norm[0]).max() > 0  # bf16 really ran: not the fp32 numbers


def test_a_save_and_a_resume_before_the_first_update(tmp_path):
    """The first step is skipped (NaN gradients) and checkpointed: torch's Adam has no
    state yet, which megatron's distributed optimizer cannot save or load without TE or
    apex (``checkpoint.materialise_adam_state``). Resuming from that checkpoint gives
    the uninterrupted curve."""
    args = [*ARGS, DISTOPT, "train.save_interval=1", "train.keep_checkpoints=10"]
    full = tmp_path / "full"
    run_cli([*args, f"run_dir={full}"], nproc=2, env={"PWDPO_FAULT": "nan@1"})
    first = _curve(full)[1]
    assert first["skipped_steps"] == 1 and (full / "checkpoints" / "iter_0000001").is_dir()
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    (resumed / "checkpoints" / "latest.txt").write_text("1\n")  # as if it stopped there
    run_cli([*args, f"run_dir={resumed}"], nproc=2)
    a, b = _curve(full), _curve(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for it in range(2, 7):
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(b[it][key], a[it][key], rtol=1e-6, err_msg=f"{it} {key}")
