"""A resumed run may change what is safe and nothing else (resume_check.py)."""

import dataclasses

import pytest

from megatron_pwdpo.config import ConfigError, RunConfig, dump_yaml, to_dict
from megatron_pwdpo.training.resume_check import SAFE_ON_RESUME, check_resume_config, is_safe


def _with(config: RunConfig, **changes) -> RunConfig:
    for dotted, value in changes.items():
        section, _, field = dotted.partition("__")
        if field:
            part = dataclasses.replace(getattr(config, section), **{field: value})
            config = dataclasses.replace(config, **{section: part})
        else:
            config = dataclasses.replace(config, **{section: value})
    return config


SAVED = RunConfig()


@pytest.mark.parametrize(
    "change",
    [
        {"train__lr": 1e-5},
        {"train__steps": 600},
        {"train__time_budget_s": 3600.0},
        {"train__save_interval": 25, "train__keep_checkpoints": 2},
        {"logging__tensorboard": True},
        {"parallel__tensor_parallel": 2},
        {"run_dir": "/scratch/moved", "timeout_s": 900},
    ],
)
def test_safe_changes_are_allowed_and_reported(change):
    new = _with(SAVED, **change)
    allowed = check_resume_config(dump_yaml(SAVED), new, where="ckpt")
    assert len(allowed) == len(change)
    for key in change:
        assert any(line.startswith(key.replace("__", ".") + ":") for line in allowed)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"model__hidden_size": 256}, "model.hidden_size: 128 -> 256"),
        ({"data__path": "other.jsonl"}, "data.path"),
        ({"data__tokenizer": "other.model"}, "data.tokenizer"),
        ({"data__seq_length": 512}, "data.seq_length"),
        ({"loss__name": "kto"}, "loss.name: 'pointwise_dpo' -> 'kto'"),
        ({"loss__beta": 0.5}, "loss.beta"),
        ({"train__global_batch_size": 32}, "train.global_batch_size"),
        ({"train__seed": 1}, "train.seed"),
        ({"train__sft_steps": 10}, "train.sft_steps"),
        ({"precision__dtype": "bf16"}, "precision.dtype"),
        ({"train__init_checkpoint": "/ckpt/other"}, "train.init_checkpoint"),
    ],
)
def test_changes_that_corrupt_the_run_are_refused_in_one_line(change, named):
    new = _with(SAVED, **change, train__lr=1e-5)  # a safe change alongside is not named
    with pytest.raises(ConfigError) as err:
        check_resume_config(dump_yaml(SAVED), new, where="runs/x/checkpoints/iter_0000040")
    message = str(err.value)
    assert "\n" not in message and named in message and "iter_0000040" in message
    assert "train.lr" not in message


def test_an_unchanged_config_and_an_old_checkpoint_without_config_pass():
    assert check_resume_config(dump_yaml(SAVED), SAVED, where="ckpt") == []
    assert check_resume_config(None, _with(SAVED, model__num_layers=4), where="ckpt") == []


def test_a_field_the_saved_config_lacks_compares_as_its_default():
    saved = to_dict(SAVED)
    del saved["loss"]["label_smoothing"]  # written before the field existed
    import yaml

    text = yaml.safe_dump(saved)
    assert check_resume_config(text, SAVED, where="ckpt") == []
    with pytest.raises(ConfigError, match="loss.label_smoothing"):
        check_resume_config(text, _with(SAVED, loss__label_smoothing=0.1), where="ckpt")


def test_every_field_is_classified_and_unknown_ones_are_refused():
    keys = []

    def walk(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                keys.append(prefix + key)

    walk(to_dict(SAVED))
    safe = {k for k in keys if is_safe(k)}
    assert {"train.lr", "train.steps", "parallel.tensor_parallel", "logging.wandb"} <= safe
    assert not any(k.startswith(("model.", "data.", "loss.", "reference.")) for k in safe)
    assert not is_safe("train.some_future_field")
    # each listed entry names a real field or section
    for entry in SAFE_ON_RESUME:
        assert any(k == entry or k.startswith(entry.removesuffix("*")) for k in keys), entry
