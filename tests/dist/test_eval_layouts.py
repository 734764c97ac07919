"""``megatron-pwdpo eval`` at TP=2, PP=2 and DP=2 gives the one-process metrics: the
held-out rows are split over replicas, run through the pipeline and gathered back in row
order on rank 0, which alone writes the JSON."""

import json

import numpy as np
import pytest
from conftest import TINY, run_cli

from megatron_pwdpo.cli import DEFAULT_CONFIG
from megatron_pwdpo.config import ConfigError, load_config
from megatron_pwdpo.evaluation.evaluate import _check_checkpoints

pytestmark = pytest.mark.dist

EVAL_DATA = ["data.hh_mode=paired", "data.eval_rows=24"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained")
    args = ["train", *TINY, *EVAL_DATA, "train.sft_steps=1", "train.steps=2"]
    run_cli([*args, "train.lr=1e-3", f"run_dir={run_dir}"])
    return run_dir / "checkpoints"


def _eval(ckpts, out, *layout, nproc=1):
    args = ["eval", "--config", str(DEFAULT_CONFIG), "--reference", str(ckpts / "reference")]
    args += ["--policy", f"dpo={ckpts}", "--policy", f"ref={ckpts / 'reference'}"]
    run_cli([*args, "--out", str(out), *TINY, *EVAL_DATA, *layout], nproc=nproc)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one_process(trained, tmp_path_factory):
    return _eval(trained, tmp_path_factory.mktemp("eval") / "one.json")


def test_one_process_metrics_are_real(one_process):
    dpo, ref = one_process["dpo"], one_process["ref"]
    assert one_process["length_baselines"]["pairs"] == dpo["pairs"]
    assert set(one_process["paired_differences"]) >= {"dpo - ref", "dpo - shorter_wins"}
    assert 16 <= dpo["rows"] <= 24 and 8 <= dpo["pairs"] <= dpo["rows"] // 2  # long rows drop
    # the reference against itself: every reward is 0 (log_z 0), a tie everywhere
    assert ref["reward_desirable"] == ref["reward_undesirable"] == 0.0
    assert ref["pair_accuracy"] == ref["accuracy"] == 0.5
    assert dpo["reward_desirable"] != 0.0 and dpo["pair_margin"] != 0.0
    assert dpo["nll"] > 0 and np.isclose(dpo["ppl"], np.exp(dpo["nll"]))


@pytest.mark.parametrize(
    "layout",
    [["parallel.tensor_parallel=2"], ["parallel.pipeline_parallel=2"], []],
    ids=["tp2", "pp2", "dp2"],
)
def test_layouts_give_the_one_process_metrics(layout, trained, one_process, tmp_path):
    out = tmp_path / "metrics.json"
    got = _eval(trained, out, *layout, nproc=2)
    _assert_close(got, one_process, where=())


def _assert_close(got, want, *, where):
    """Equal structure; floats to 1e-5 (intervals to 1e-4 / 1e-5 absolute)."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _assert_close(got[key], want[key], where=(*where, key))
    elif isinstance(want, list):  # an interval: percentiles of resampled float32 margins
        assert len(got) == len(want), where
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5), where
    elif want is None or isinstance(want, (int, str, bool)):
        assert got == want, where
    else:
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), where


def test_a_missing_checkpoint_is_named_before_any_work(trained, tmp_path):
    config = load_config(DEFAULT_CONFIG, TINY)
    with pytest.raises(ConfigError, match=r"--policy late: .*no metadata.json"):
        _check_checkpoints(config, reference=str(trained), policies={"late": str(tmp_path)})
