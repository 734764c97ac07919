"""Config loading: YAML + dotted overrides, and one-line errors naming the key."""

from pathlib import Path

import pytest

from megatron_pwdpo.cli import DEFAULT_CONFIG, main
from megatron_pwdpo.config import ConfigError, RunConfig, load_config, parse_overrides
from megatron_pwdpo.config.validation import validate


def test_default_example_loads_and_resolves_paths():
    config = load_config(DEFAULT_CONFIG)
    assert Path(config.data.path).is_file()
    assert Path(config.data.tokenizer).is_file()
    assert config.loss.name == "pointwise_dpo"


def test_overrides_are_typed_and_nested():
    config = load_config(
        DEFAULT_CONFIG, ["train.steps=7", "loss.beta=0.5", "loss.mode=mse", "train.progress=false"]
    )
    assert config.train.steps == 7
    assert config.loss.beta == 0.5 and isinstance(config.loss.beta, float)
    assert config.loss.mode == "mse"
    assert config.train.progress is False


def test_int_widens_to_float_and_exponents_without_a_dot_parse():
    assert load_config(None, ["loss.beta=1"]).loss.beta == 1.0
    assert load_config(None, ["train.lr=1e-4"]).train.lr == 1e-4  # YAML 1.1 gives a str


def test_parse_overrides():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.stepz=3"], "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
        (["loss.name=foo"], "loss.name: 'foo' is not one of"),
        (["loss.beta=abc"], "loss.beta: expected a number, got 'abc'"),
        (["loss.beta=0"], "loss.beta: must be positive"),
        (["train.steps=2.5"], "train.steps: expected an integer"),
        (["train.progress=maybe"], "train.progress: expected true or false"),
        (["model.hidden_size=130"], "must be divisible by model.num_attention_heads"),
        (["parallel.tensor_parallel=4"], "num_query_groups (2) must be divisible by"),
        (["model.num_layers=3", "parallel.pipeline_parallel=2"], "must be divisible by pipeline"),
        (["train.steps"], "is not of the form section.field=value"),
        (["loss=3"], "loss: expected a section"),
        (["reference.mode=none"], "reference.mode: 'none' is only valid with loss.name=sft"),
        (["loss.name=ipo"], "loss.name=ipo regresses the margin onto 1/(2 beta)"),  # sum here
        (["data.seq_length=4096"], "exceeds model.max_seq_length"),
        (["data.packing=bshd"], "data.packing: 'bshd' is not one of"),
        (["parallel.logprob_chunk_size=-1"], "parallel.logprob_chunk_size: must be >= 0"),
        pytest.param(
            [
                "data.packing=masked",
                "model.num_layers=4",
                "parallel.pipeline_parallel=2",
                "parallel.virtual_pipeline=2",
            ],
            "data.packing=masked with parallel.virtual_pipeline is not supported",
        ),
    ],
)
def test_bad_values_give_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT_CONFIG, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_world_size_checks():
    config = load_config(None, ["train.global_batch_size=8", "train.micro_batch_size=4"])
    validate(config, world_size=2)
    with pytest.raises(ConfigError, match="must be divisible by micro_batch_size x data-parallel"):
        validate(config, world_size=4)
    vp = load_config(
        None,
        [
            "model.num_layers=4",
            "parallel.pipeline_parallel=2",
            "parallel.virtual_pipeline=2",
            "train.micro_batch_size=4",
            "train.global_batch_size=12",
        ],
    )
    with pytest.raises(ConfigError, match="needs a multiple of pipeline_parallel"):
        validate(vp, world_size=2)  # 3 micro-batches per step
    tp2 = load_config(None, ["parallel.tensor_parallel=2"])
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        validate(tp2, world_size=3)


def test_bad_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_cli_prints_one_line_and_exits_2(capsys):
    code = main(["train", "train.stepz=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "megatron-pwdpo: error: unknown config key 'train.stepz' (did you mean 'train.steps'?)"
    ]


def test_defaults_are_valid():
    validate(RunConfig())


def test_file_paths_resolve_against_the_file_but_hub_names_stay(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "data:\n  source: pointwise\n  path: hf:someone/rows\n  tokenizer: tok.model\n"
    )
    config = load_config(tmp_path / "run.yaml")
    assert config.data.path == "hf:someone/rows"
    assert config.data.tokenizer == str(tmp_path / "tok.model")
