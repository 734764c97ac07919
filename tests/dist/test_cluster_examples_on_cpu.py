"""The cluster examples (``examples/llama3-*.yaml``) start on CPU at a tiny shape.

Only the model shape and the data are overridden to tiny, the layout is scaled down to
what the CPU holds (TP=2 x PP=2 x DP=2 = 8 processes), and what needs Transformer Engine
(sequence parallelism, FP8) is refused in one line on CPU and then switched off; the
precision (bf16), the optimizer (the distributed optimizer, ``auto`` at DP=2) and the
reference mode stay the examples' own. After these overrides the four examples run the
same code paths (they differ in shape, layout, FP8 and the schedule's numbers), so one of
them trains.
"""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest import read_metrics, run_cli

from megatron_pwdpo.config import ConfigError, load_config
from megatron_pwdpo.platform.decisions import CPU

pytestmark = pytest.mark.dist

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CLUSTER = sorted(EXAMPLES.glob("llama3-*.yaml"))
TINY_SHAPE = [
    "model.num_layers=4",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.vocab_size=2048",
    "model.max_seq_length=128",
]
TINY_DATA = [
    "data.source=hh-rlhf",
    f"data.path={EXAMPLES / 'data' / 'hh_rlhf_harmless_base_test.jsonl.gz'}",
    f"data.tokenizer={EXAMPLES / 'data' / 'tokenizer.model'}",
    "data.tokenizer_type=sentencepiece",
    "data.seq_length=128",
    "data.eval_rows=16",
]
CPU_LAYOUT = [
    "parallel.tensor_parallel=2",
    "parallel.pipeline_parallel=2",
    "train.micro_batch_size=1",
    "train.global_batch_size=4",  # 2 micro-batches per data-parallel rank (PP=2)
]
NO_TE = ["parallel.sequence_parallel=false", "precision.fp8=null"]
RUN = ["train.init_checkpoint=null", "train.steps=2", "train.eval_interval=1000"]


def _tiny(path: Path, run_dir: Path):
    return [*TINY_SHAPE, *TINY_DATA, *CPU_LAYOUT, *NO_TE, *RUN, f"run_dir={run_dir}"]


@pytest.mark.parametrize("path", CLUSTER, ids=lambda p: p.stem)
def test_te_only_parts_are_refused_on_cpu_in_one_line(path):
    with pytest.raises(ConfigError) as err:
        load_config(path, [*TINY_SHAPE, *TINY_DATA, *CPU_LAYOUT, *RUN], on=CPU)
    assert "Transformer Engine" in str(err.value) and "\n" not in str(err.value)


def test_the_four_examples_are_one_run_at_tiny_shape(tmp_path):
    configs = [load_config(p, _tiny(p, tmp_path), on=CPU) for p in CLUSTER]
    assert len(configs) == 4
    for config in configs:
        assert config.precision.dtype == "bf16"
        assert config.parallel.distributed_optimizer == "auto"
        # the same code paths: layout, precision, optimizer, reference, loss, data (the
        # schedule's numbers and timeouts differ, not what runs)
        for section in ("parallel", "precision", "reference", "loss", "data"):
            assert getattr(config, section) == getattr(configs[0], section), section
        # the shape differs only in what a Llama 3.1 keeps at every size
        assert dataclasses.replace(config.model, rope_scaling_factor=1.0) == dataclasses.replace(
            configs[0].model, rope_scaling_factor=1.0
        )


def test_a_cluster_example_trains_two_steps_on_cpu(tmp_path):
    path = EXAMPLES / "llama3-8b-2n8g-tp4pp2-bf16.yaml"
    proc = run_cli(["train", "--config", str(path), *_tiny(path, tmp_path)], nproc=8, timeout=600)
    assert "distributed optimizer on" in proc.stdout + proc.stderr  # auto at DP=2
    train = [m for m in read_metrics(tmp_path) if m.get("split", "train") == "train"]
    assert [m["step"] for m in train] == [1, 2] and {m["stage"] for m in train} == {"pointwise_dpo"}
    # a fresh policy is its own reference: step 1 is ln 2 with rewards 0, in bf16
    assert train[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-7)
    assert train[0]["reward_desirable"] == 0 and train[0]["reward_undesirable"] == 0
    assert all(np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in train)
    assert (tmp_path / "checkpoints" / "latest.txt").read_text().strip() == "2"
