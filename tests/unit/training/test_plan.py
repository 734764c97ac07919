"""`training.plan.plan_stages` on hand-made tokenised rows: what each stage trains on, and the
one-line errors when the data cannot serve the configured stages."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_pwdpo.config import ConfigError, load_config
from megatron_pwdpo.data.prepare import PreparedData
from megatron_pwdpo.data.tokenize import TokenizedRow
from megatron_pwdpo.training.plan import plan_stages


def _row(index: int, id: str, *, label: float = 1.0, demo: bool = False) -> TokenizedRow:
    return TokenizedRow(index, np.arange(6, dtype=np.int64), 3, label, demo, id)


def _data(rows: list[TokenizedRow]) -> PreparedData:
    return PreparedData(rows, [], tokenizer=None, stats=None)


def _config(*overrides: str):
    return load_config(None, list(overrides))


@pytest.mark.parametrize(
    ("source", "extra", "hint"),
    [
        ("preprocessed", [], "set train.sft_steps=0"),
        ("red-team", [], "set train.sft_steps=0"),
        ("hh-rlhf", ["data.demo_chosen=false"], "or data.demo_chosen=true"),
        ("pointwise", [], "kind=demo"),
    ],
)
def test_sft_stage_without_demonstrations_says_how_to_fix(source, extra, hint):
    config = _config(f"data.source={source}", "train.sft_steps=5", *extra)
    rows = [_row(0, "a", label=0.2), _row(1, "b", label=0.9)]
    with pytest.raises(ConfigError, match="no demonstrations") as err:
        plan_stages(config, _data(rows))
    assert hint in str(err.value)
    assert "\n" not in str(err.value)
    if source in ("preprocessed", "red-team"):  # demo_chosen cannot help these
        assert "demo_chosen" not in str(err.value)


def test_sft_steps_zero_trains_feedback_only_rows():
    config = _config("data.source=red-team", "train.sft_steps=0")
    rows = [_row(0, "rt-0", label=0.2), _row(1, "rt-1", label=0.9)]
    (stage,) = plan_stages(config, _data(rows))
    assert stage.name == "pointwise_dpo" and len(stage.examples) == 2
