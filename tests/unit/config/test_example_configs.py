"""Every example config loads and validates for the world its name encodes
(``llama3-8b-2n8g-tp4pp2-bf16``: 2 nodes x 8 GPUs, TP=4, PP=2), and the H100 ones fit in
80 GB per GPU by the estimate of README's "Sizing" section (:func:`memory_per_gpu`).
The experiment configs under ``examples/reproduce`` are valid for every run they start, at
the world size they run at (``experiment.nproc``)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from megatron_pwdpo.config import ConfigError, load_config
from megatron_pwdpo.config.validation import validate
from megatron_pwdpo.evaluation.experiment import check_runs, load_experiment
from megatron_pwdpo.model.sizing import memory_per_gpu
from megatron_pwdpo.platform.decisions import GPU_WITH_TE

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
CLUSTER_CONFIGS = sorted(p for p in EXAMPLES.glob("*.yaml") if p.name != "tiny_cpu.yaml")
TOPOLOGY = re.compile(r"-(\d+)n(\d+)g-tp(\d+)pp(\d+)-")
H100_GB = 80.0


@pytest.fixture
def on_an_h100_node():
    """Validation checks the platform (FP8 and sequence parallelism need Transformer
    Engine, FP8 a Hopper GPU): the platform of an H100 node with TE and apex."""
    return GPU_WITH_TE


def test_the_tiny_default_validates_on_cpu():
    validate(load_config(EXAMPLES / "tiny_cpu.yaml"), world_size=1)


def test_there_are_8b_and_70b_configs_in_bf16_and_fp8():
    names = {p.stem for p in CLUSTER_CONFIGS}
    for model, topology in [("8b", "2n8g-tp4pp2"), ("70b", "8n8g-tp8pp4")]:
        assert {f"llama3-{model}-{topology}-{dtype}" for dtype in ("bf16", "fp8")} <= names


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: p.stem)
def test_cluster_config_matches_its_name_and_fits(path, on_an_h100_node):
    match = TOPOLOGY.search(path.stem)
    assert match, f"{path.name}: the name should encode NODESnGPUSg-tpTPppPP"
    nodes, gpus, tp, pp = map(int, match.groups())
    config = load_config(path, on=on_an_h100_node)
    assert (config.parallel.tensor_parallel, config.parallel.pipeline_parallel) == (tp, pp)
    assert tp <= gpus, "tensor parallelism stays within a node"
    validate(config, world_size=nodes * gpus, on=on_an_h100_node)
    assert Path(config.run_dir).name == path.stem
    assert Path(config.run_dir).is_absolute() and config.run_dir.startswith("/shared/")
    assert config.precision.dtype == "bf16"
    assert (config.precision.fp8 is not None) == path.stem.endswith("-fp8")
    # the command in the header asks for the nodes the name says
    assert f"sbatch --nodes={nodes} slurm/train.sbatch examples/{path.name}" in path.read_text()
    memory = memory_per_gpu(config, nodes * gpus)
    assert memory["total"] < 0.75 * H100_GB, memory  # room for buffers and fragmentation


@pytest.mark.parametrize("bf16", [p for p in CLUSTER_CONFIGS if p.stem.endswith("-bf16")])
def test_fp8_config_differs_from_bf16_only_in_precision(bf16, on_an_h100_node):
    a = load_config(bf16, on=on_an_h100_node)
    b = load_config(bf16.with_name(bf16.name.replace("-bf16", "-fp8")), on=on_an_h100_node)
    assert dataclasses.replace(b, run_dir=a.run_dir, precision=a.precision) == a


def _check_experiment(path: Path, tmp_path: Path, overrides=()) -> tuple[dict, dict]:
    exp, tree = load_experiment(path, list(overrides))
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tree, sort_keys=False))
    check_runs(exp, tree, base, tmp_path / "red_team_fixture.jsonl")
    return exp, tree


def test_every_run_of_the_tiny_experiment_validates_on_cpu(tmp_path):
    exp, _ = _check_experiment(EXAMPLES / "reproduce" / "tiny.yaml", tmp_path)
    assert exp["red_team"]["steps"] > 0 and {"sft", "dpo", "ulma"} <= set(exp["methods"])


def test_every_run_of_the_paper_experiment_validates_on_8_gpus(tmp_path, on_an_h100_node):
    paper = EXAMPLES / "reproduce" / "paper.yaml"
    exp, tree = _check_experiment(paper, tmp_path, ["experiment.red_team.steps=1"])
    assert exp["nproc"] == 8 and tree["precision"]["dtype"] == "bf16"
    with pytest.raises(ConfigError, match="world size 4"):  # TP=8 cannot run on 4 ranks
        _check_experiment(paper, tmp_path, ["experiment.nproc=4"])


def test_70b_estimate_matches_the_hand_count(on_an_h100_node):
    """CLUSTER_REVIEW item 18, counted by hand for TP8 PP4 DP2 stage 0: ~32 GB static
    (bf16 weights, fp32 gradients, Adam over DP=2, the resident bf16 reference) and ~11 GB
    of activations."""
    config = load_config(EXAMPLES / "llama3-70b-8n8g-tp8pp4-bf16.yaml", on=on_an_h100_node)
    gb = memory_per_gpu(config, 64)
    static = gb["weights"] + gb["gradients"] + gb["optimizer"] + gb["reference"]
    assert static == pytest.approx(32, abs=2)
    assert gb["activations"] == pytest.approx(11.4, abs=1)


def test_train_dry_run_prints_the_plan_and_the_estimate(capsys):
    from megatron_pwdpo.cli import main

    path = EXAMPLES / "llama3-70b-8n8g-tp8pp4-fp8.yaml"
    assert (
        main(
            [
                "train",
                "--config",
                str(path),
                "--dry-run",
                "--world-size",
                "64",
                "--platform",
                "gpu-te",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "valid for a world of 64" in out and "layer spec te" in out
    assert "distributed optimizer on" in out and "total" in out
    # on this CPU machine the same file is refused in one line (FP8 needs TE)
    assert main(["train", "--config", str(path), "--dry-run", "--world-size", "64"]) == 2
    assert "Transformer Engine" in capsys.readouterr().err


def test_the_official_preset_is_the_experiments_official_ulma():
    """examples/reproduce/official.yaml (the ULMA authors' recipe) validates on CPU and
    holds exactly the loss that the experiment's official_ulma row trains with."""
    from megatron_pwdpo.evaluation.experiment import OFFICIAL_LOSS

    path = EXAMPLES / "reproduce" / "official.yaml"
    config = load_config(path)
    validate(config, world_size=1)
    loss = yaml.safe_load(path.read_text())["loss"]
    assert loss == OFFICIAL_LOSS["official_ulma"]
    assert config.data.hh_mode == "paired" and config.data.demo_chosen
    assert config.train.sft_steps == 0  # from the base model, no SFT stage
    # the file's DPO line gives the experiment's official_dpo
    dpo = load_config(
        path, ["loss.name=dpo", "loss.logp_reduction=sum", "loss.normalization=global_mean"]
    )
    for key, value in OFFICIAL_LOSS["official_dpo"].items():
        assert getattr(dpo.loss, key) == value
