"""Source options reached from the config and the ``preprocess`` flags: the declared
red-team score range (``data.red_team_score_range``, ``--red-team-score-range``) and the
seed of the unpaired HH pick (``data.unpaired_seed``, ``--seed``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_pwdpo.cli import main
from megatron_pwdpo.config import ConfigError, load_config
from megatron_pwdpo.data.prepare import load_rows
from megatron_pwdpo.data.readers import read_pointwise
from megatron_pwdpo.data.sources import hh_rlhf_rows


def _attempts(path: Path, scores: list[float]) -> Path:
    records = [
        {
            "transcript": f"\n\nHuman: question {i}?\n\nAssistant: answer {i}.",
            "min_harmlessness_score_transcript": score,
            "rating": 1.0,
        }
        for i, score in enumerate(scores)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _data(*overrides: str):
    return load_config(None, list(overrides)).data


def test_declared_range_puts_files_on_one_scale(tmp_path):
    # the same score 0.0 in two files whose observed ranges differ
    a = _attempts(tmp_path / "a.jsonl", [-2.0, 0.0, 2.0])
    b = _attempts(tmp_path / "b.jsonl", [-1.0, 0.0, 4.0])

    def label_of_zero(path, *extra):
        rows = load_rows(_data("data.source=red-team", f"data.path={path}", *extra))
        return rows[1].label

    assert label_of_zero(a) == pytest.approx(0.5)  # each file's own min/max
    assert label_of_zero(b) == pytest.approx(0.2)
    declared = "data.red_team_score_range=[-4, 4]"
    assert label_of_zero(a, declared) == label_of_zero(b, declared) == pytest.approx(0.5)
    rows = load_rows(_data("data.source=red-team", f"data.path={b}", declared))
    assert [r.label for r in rows] == pytest.approx([3 / 8, 0.5, 1.0])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[1, 1]", "low must be below high"),
        ("[2, -2]", "low must be below high"),
        ("[0, .inf]", "must be finite"),
        ("[0]", "expected [low, high]"),
        ("[a, b]", "expected [low, high]"),
        ("3", "expected [low, high]"),
    ],
)
def test_bad_score_range_is_one_line(value, expected):
    with pytest.raises(ConfigError, match="data.red_team_score_range: ") as err:
        _data("data.source=red-team", f"data.red_team_score_range={value}")
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "other",
    ["data.source=hh-rlhf", "data.red_team_score=rating", "data.red_team_normalisation=logistic"],
)
def test_score_range_refused_where_it_has_no_effect(other):
    with pytest.raises(ConfigError, match="applies only to the red-team source"):
        _data("data.source=red-team", "data.red_team_score_range=[-4, 4]", other)


def test_score_range_round_trips_through_the_config():
    data = _data("data.source=red-team", "data.red_team_score_range=[-4, 4.5]")
    assert data.red_team_score_range == [-4, 4.5]
    assert _data().red_team_score_range is None


def test_preprocess_score_range_flag(tmp_path, capsys):
    src = _attempts(tmp_path / "b.jsonl", [-1.0, 0.0, 4.0])
    out = tmp_path / "rows.jsonl"
    base = ["preprocess", "--source", "red-team", "--input", str(src), "--out", str(out)]
    assert main([*base, "--red-team-score-range", "-4", "4"]) == 0
    assert [r.label for r in read_pointwise(out)] == pytest.approx([3 / 8, 0.5, 1.0])
    assert main([*base, "--red-team-score-range", "4", "-4"]) == 2
    err = capsys.readouterr().err
    assert "--red-team-score-range: low must be below high" in err


def _hh(path: Path, n: int) -> Path:
    pairs = [
        {
            "chosen": f"\n\nHuman: q{i}\n\nAssistant: good {i}",
            "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad {i}",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def test_unpaired_pick_follows_the_configured_seed(tmp_path):
    path = _hh(tmp_path / "hh.jsonl", 40)
    base = ["data.source=hh-rlhf", f"data.path={path}", "data.hh_mode=unpaired"]
    default = [r.id for r in load_rows(_data(*base))]
    assert default == [r.id for r in hh_rlhf_rows(path, mode="unpaired", seed=0)]
    assert default == [r.id for r in load_rows(_data(*base, "data.unpaired_seed=0"))]
    other = [r.id for r in load_rows(_data(*base, "data.unpaired_seed=7"))]
    assert other == [r.id for r in hh_rlhf_rows(path, mode="unpaired", seed=7)]
    assert other != default and len(other) == len(default) == 40
    golden = ["data.source=golden-hh", f"data.path={path}", "data.hh_mode=unpaired"]
    picks = {
        tuple(r.id[-1] for r in load_rows(_data(*golden, f"data.unpaired_seed={s}")))
        for s in (0, 7)
    }
    assert len(picks) == 2
