"""The reference strategies end to end: ``resident``, ``offload`` and ``cache`` give the
same per-step losses and gradient norms (to float32 rounding) in one process and under
TP=2 and PP=2; at step 1 every reward is 0 and the point-wise DPO loss is ln 2; a cache
precomputed at DP=2 or PP=2 holds the same log-probs; ULMA runs no reference on
demonstrations, and its cache (which lacks them) is refused by a run that needs them; an
offload pass leaves the policy's weights and gradients bitwise unchanged. (Stale caches:
tests/unit/reference/test_reference.py.)

Every run starts from one saved initial checkpoint (the reference of the cache) on a
60-pair slice of the bundled data, so that precomputing stays fast.
"""

import gzip
import math
import textwrap

import numpy as np
import pytest
from conftest import TINY, read_metrics, run_cli, run_python, save_initial_weights, train_curve

pytestmark = pytest.mark.dist

BUNDLED = "examples/data/hh_rlhf_harmless_base_test.jsonl.gz"
STEPS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("reference")
    data = root / "hh.jsonl.gz"
    with gzip.open(request.config.rootpath / BUNDLED, "rt") as f:
        head = [next(f) for _ in range(60)]
    with gzip.open(data, "wt") as f:
        f.writelines(head)
    common = [*TINY, f"data.path={data}"]
    initial = save_initial_weights(common, root / "init")
    return root, [*common, "train.sft_steps=0", f"train.init_checkpoint={initial}"]


def _train(args, run_dir, *extra, nproc=1, check=True, env=None):
    return run_cli(
        ["train", *args, f"train.steps={STEPS}", f"run_dir={run_dir}", *extra],
        nproc=nproc,
        check=check,
        env=env,
    )


def _cache(args, path, *extra, nproc=1):
    run_cli(["precompute-ref", *args, "--out", str(path), *extra], nproc=nproc)
    with np.load(path, allow_pickle=False) as f:
        return list(f["ids"]), f["logps"].copy()


@pytest.fixture(scope="module")
def resident(setup):
    root, args = setup
    _train(args, root / "resident", "reference.mode=resident")
    return root / "resident"


@pytest.fixture(scope="module")
def dp2_cache(setup):
    """The cache, precomputed by two data-parallel replicas."""
    root, args = setup
    path = root / "ref_dp2.npz"
    return path, _cache(args, path, nproc=2)


def _assert_same(a, b, stage="pointwise_dpo", rtol=1e-5):
    for key in ("loss", "grad_norm"):
        want, got = train_curve(a, stage, key), train_curve(b, stage, key)
        assert len(want) == STEPS and all(np.isfinite(want))
        np.testing.assert_allclose(got, want, rtol=rtol, err_msg=key)
    evals = [[m for m in read_metrics(d) if m.get("split") == "eval"] for d in (a, b)]
    assert len(evals[0]) == len(evals[1]) == 2
    for want, got in zip(*evals, strict=True):
        for name, value in want.items():
            # accuracy is sign(reward): at step 0 rewards are ~0 and rounding picks the sign
            if isinstance(value, float) and name != "accuracy":
                # log-ratios are differences of summed log-probs of ~-500 (float32: ~3e-5
                # per row), rewards beta = 0.05 times them
                atol = {"logratio": 1e-4}.get(name, 1e-5 if name.startswith("reward") else 2e-6)
                np.testing.assert_allclose(got[name], value, rtol=rtol, atol=atol, err_msg=name)


def _assert_step_one_is_neutral(run_dir):
    first = [m for m in read_metrics(run_dir) if m.get("split", "train") == "train"][0]
    assert first["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    for name in ("reward_desirable", "reward_undesirable", "logratio"):
        assert first[name] == pytest.approx(0.0, abs=1e-6), name


def test_modes_agree_in_one_process(setup, resident, dp2_cache, tmp_path):
    root, args = setup
    cache_path, _ = dp2_cache
    _train(args, tmp_path / "cache", "reference.mode=cache", f"reference.cache_path={cache_path}")
    # offload, interrupted after step 2 and resumed: the reference comes back from
    # checkpoints/reference, swapped in through the policy's own parameters
    offload = [*args, "reference.mode=offload", "train.save_interval=1"]
    crash = _train(offload, tmp_path / "offload", check=False, env={"PWDPO_FAULT": "raise@3"})
    assert crash.returncode != 0
    _train(offload, tmp_path / "offload")
    for run in (resident, tmp_path / "offload", tmp_path / "cache"):
        _assert_step_one_is_neutral(run)
    _assert_same(resident, tmp_path / "offload")
    _assert_same(resident, tmp_path / "cache")


@pytest.mark.parametrize(
    "layout", [["parallel.tensor_parallel=2"], ["parallel.pipeline_parallel=2"]], ids=["tp2", "pp2"]
)
def test_modes_agree_under_model_parallelism(setup, resident, dp2_cache, tmp_path, layout):
    root, args = setup
    cache_path = dp2_cache[0]  # a cache does not depend on the layout that computed it
    if "parallel.pipeline_parallel=2" in layout:  # the log-probs leave the last stage
        cache_path = tmp_path / "ref.npz"
        ids, logps = _cache([*args, *layout], cache_path, nproc=2)
        assert ids == dp2_cache[1][0]
        np.testing.assert_allclose(logps, dp2_cache[1][1], rtol=1e-5)
    for mode in ("offload", "cache"):
        extra = [f"reference.mode={mode}", f"reference.cache_path={cache_path}"]
        _train([*args, *layout], tmp_path / mode, *extra, nproc=2)
        _assert_same(resident, tmp_path / mode, rtol=2e-5)


def test_ulma_runs_no_reference_on_demonstrations(setup, tmp_path):
    root, args = setup
    ulma = [*args, "loss.name=ulma"]
    ids, _ = _cache(ulma, tmp_path / "ref.npz")
    assert not any(i.endswith("-c") for i in ids)  # the chosen rows are demonstrations
    for mode in ("resident", "cache"):  # (offload shares the skipping with resident)
        extra = [f"reference.mode={mode}", f"reference.cache_path={tmp_path / 'ref.npz'}"]
        _train(ulma, tmp_path / mode, *extra)
        steps = [m for m in read_metrics(tmp_path / mode) if m.get("split", "train") == "train"]
        assert all(m["ref_rows_skipped"] > 0 for m in steps)
        assert steps[0]["reward_undesirable"] == pytest.approx(0.0, abs=1e-6)
    _assert_same(tmp_path / "resident", tmp_path / "cache", stage="ulma")
    # the demonstration-free cache cannot serve point-wise DPO, which needs every row
    proc = _train(
        args,
        tmp_path / "incomplete",
        "reference.mode=cache",
        f"reference.cache_path={tmp_path / 'ref.npz'}",
        check=False,
    )
    assert proc.returncode == 2
    assert "lacks" in proc.stderr and "rows this run needs" in proc.stderr


OFFLOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from megatron_pwdpo.platform import cpu_bridge
    from megatron_pwdpo.platform import distributed
    from megatron_pwdpo.engine.batches import rank_micro_batches
    from megatron_pwdpo.cli import DEFAULT_CONFIG
    from megatron_pwdpo.config import load_config
    from megatron_pwdpo.data.prepare import prepare_data
    from megatron_pwdpo.reference.strategies import OffloadReference, ResidentReference
    from megatron_pwdpo.engine.step import run_logps
    from megatron_pwdpo.engine.setup import Layout, build_chunks

    def main():
        config = load_config(DEFAULT_CONFIG, sys.argv[1:])
        data = prepare_data(config.data, vocab_size=config.model.vocab_size)
        distributed.init_distributed(
            tensor_parallel=1, pipeline_parallel=1, virtual_pipeline=None, timeout_s=60
        )
        cpu_bridge.manual_seed(0)
        policy = build_chunks(config, wrap_ddp=True)
        frozen = build_chunks(config, wrap_ddp=False)
        frozen[0].load_state_dict(policy[0].module.state_dict())
        fb = Layout.forward_backward_func()
        seq = config.data.seq_length
        run = dict(forward_backward_func=fb, seq_length=seq, rebatch=None, is_last_stage=True)
        resident = ResidentReference(frozen, **run)
        offload = OffloadReference(policy, **run)
        params = list(policy[0].parameters())
        with torch.no_grad():  # as after some training: other weights, gradients in DDP
            for p in params:
                p.add_(torch.randn_like(p) * 0.01)
                p.main_grad.normal_()
        bits = [p.detach().clone().view(torch.int32) for p in params]
        grads = [p.main_grad.clone() for p in params]
        batches = rank_micro_batches(
            data.train[:8], dp_rank=0, dp_size=1, micro_batch_size=2, pad_id=data.tokenizer.pad_id
        )
        want = torch.cat(resident.logps(batches, reduction="sum"))
        got = torch.cat(offload.logps(batches, reduction="sum"))
        own = torch.cat(run_logps(fb, policy, batches, reduction="sum", seq_length=seq))
        assert torch.allclose(got, want, rtol=1e-6), (got - want).abs().max()
        assert not torch.allclose(own, want, rtol=1e-4)  # the policy did move
        for p, b, g in zip(params, bits, grads, strict=True):
            assert torch.equal(p.detach().view(torch.int32), b), "policy weights drifted"
            assert torch.equal(p.main_grad, g), "gradients touched"
        distributed.shutdown()
        print("offload ok", float((got - want).abs().max()))

    if __name__ == "__main__":
        main()
    """
)


def test_offload_pass_on_a_megatron_model_is_bitwise_neutral(setup, tmp_path):
    root, args = setup
    script = tmp_path / "offload_check.py"
    script.write_text(OFFLOAD_SCRIPT)
    overrides = [a for a in args if a.startswith(("model.", "data."))]
    proc = run_python([str(script), *overrides], timeout=180)
    assert "offload ok" in proc.stdout
