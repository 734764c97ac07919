"""Pairs for the pairwise baselines from every source that has them: the generic
``pairwise`` reader (and its file:line errors), Golden HH and QA-feedback pairs; which
(source, loss) combinations the config refuses; and one tiny ``dpo`` run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY, run_cli

from megatron_pwdpo.config import ConfigError, load_config
from megatron_pwdpo.data.loading import load_source_rows
from megatron_pwdpo.data.prepare import PreparedData
from megatron_pwdpo.data.readers import read_pairwise
from megatron_pwdpo.data.schema import DataError, PointwiseRow
from megatron_pwdpo.data.tokenize import TokenizedRow
from megatron_pwdpo.engine.batches import pair_up
from megatron_pwdpo.training.plan import plan_stages

ROOT = Path(__file__).resolve().parents[3]
TOKENIZER = ROOT / "examples" / "data" / "tokenizer.model"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How do I boil an egg?"},
]


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _pair(i: int, **change) -> dict:
    obj = {
        "prompt": f"\n\nHuman: question {i}?\n\nAssistant:",
        "chosen": f"A careful answer to question {i}.",
        "rejected": "No.",
        **change,
    }
    return {k: v for k, v in obj.items() if v is not ...}


def _tok(rows) -> list[TokenizedRow]:
    ids = np.arange(6, dtype=np.int64)
    return [TokenizedRow(i, ids, 3, r.label, r.kind == "demo", r.id) for i, r in enumerate(rows)]


# --- the generic pairwise reader ------------------------------------------------------------


def test_pairwise_file_becomes_chosen_and_rejected_rows(tmp_path):
    path = _jsonl(
        tmp_path / "pairs.jsonl",
        [_pair(0), _pair(1, id="mine", prompt=MESSAGES), _pair(2)],
    )
    pairs = read_pairwise(path)
    assert [p.id for p in pairs] == ["pair-000000", "mine", "pair-000002"]
    assert pairs[1].prompt == MESSAGES
    rows = load_source_rows(path, source="pairwise", demo_chosen=False)
    assert [r.id for r in rows] == [
        "pair-000000-c",
        "pair-000000-r",
        "mine-c",
        "mine-r",
        "pair-000002-c",
        "pair-000002-r",
    ]
    assert [r.label for r in rows] == [1.0, 0.0] * 3
    assert {r.kind for r in rows} == {"feedback"}
    assert rows[2].prompt == rows[3].prompt == MESSAGES
    demos = load_source_rows(path, source="pairwise", demo_chosen=True)
    assert [r.kind for r in demos] == ["demo", "feedback"] * 3
    tokenized = _tok(rows)
    assert [(c.id, r.id) for c, r in pair_up(tokenized)] == [
        ("pair-000000-c", "pair-000000-r"),
        ("mine-c", "mine-r"),
        ("pair-000002-c", "pair-000002-r"),
    ]


def test_pairwise_parquet_matches_jsonl(tmp_path):
    records = [_pair(i) for i in range(3)]
    jsonl = _jsonl(tmp_path / "p.jsonl", records)
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    assert read_pairwise(parquet) == read_pairwise(jsonl)


BAD_PAIRS = {
    "missing rejected": (_pair(9, rejected=...), ":2: field 'rejected': missing"),
    "chosen not a string": (_pair(9, chosen=3), ":2: field 'chosen': expected a string, got int"),
    "empty chosen": (_pair(9, chosen="  "), ":2: field 'chosen': is empty"),
    "prompt type": (_pair(9, prompt=5), ":2: field 'prompt': expected a string or a list"),
    "bad role": (
        _pair(9, prompt=[{"role": "bot", "content": "x"}]),
        ":2: field 'prompt[0]': role 'bot' is not one of",
    ),
    "hh transcript": (
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
        ":2: field 'prompt': missing (a pairwise record is {prompt, chosen, rejected}; "
        "HH-RLHF transcripts are data.source=hh-rlhf)",
    ),
    "duplicate id": (_pair(9, id="x"), ":2: field 'id': duplicate id 'x' (first at line 1)"),
    "empty id": (_pair(9, id=""), ":2: field 'id': is empty"),
    "not an object": ([1, 2], ":2: expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", sorted(BAD_PAIRS))
def test_bad_pair_names_file_and_line(tmp_path, case):
    record, expected = BAD_PAIRS[case]
    path = _jsonl(tmp_path / "pairs.jsonl", [_pair(0, id="x"), record])
    with pytest.raises(DataError) as err:
        load_source_rows(path, source="pairwise")
    assert str(err.value).startswith(f"{path}{expected}")
    assert "\n" not in str(err.value)


def test_empty_pairwise_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match=r"empty.jsonl: file is empty"):
        read_pairwise(path)


# --- pairs from Golden HH and QA-feedback ---------------------------------------------------


def test_golden_hh_paired_rows_pair_up(tmp_path):
    records = [
        {
            "chosen": f"\n\nHuman: q{i}\n\nAssistant: a good answer {i}",
            "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad {i}",
        }
        for i in range(3)
    ]
    rows = load_source_rows(_jsonl(tmp_path / "golden.jsonl", records), source="golden-hh")
    pairs = pair_up(_tok(rows))
    assert [c.id for c, _ in pairs] == ["golden-000000-c", "golden-000001-c", "golden-000002-c"]
    assert all(c.is_demo and not r.is_demo for c, r in pairs)


def _qa_item(i: int, preference: list[int]) -> dict:
    return {
        "question": f"Question {i}?",
        "passages": [["Title", "A sentence.", "Another sentence."]],
        "gold": f"The gold answer {i}.",
        **{f"prediction {k}": f"prediction {k} of item {i}" for k in range(1, 5)},
        "feedback": {"corrected-prediction": f"The corrected answer {i}."},
        "preference": preference,
    }


def test_qa_feedback_pairs_mode_gives_demos_and_pairs(tmp_path):
    # item 0: 1v3 -> 1, 1v4 -> 4, 2v3 -> 2, 3v4 -> 4 (two ties); item 1: no ties
    items = [_qa_item(0, [0, 1, 2, 1, 0, 2]), _qa_item(1, [1, 1, 1, 2, 2, 2])]
    path = tmp_path / "dev_feedback.json"
    path.write_text(json.dumps(items, indent=1))
    rows = load_source_rows(path, source="qa-feedback", qa_mode="pairs")
    assert [r.id for r in rows[:4]] == [
        "qa-00000-gold",
        "qa-00000-corrected",
        "qa-00000-1v3-c",
        "qa-00000-1v3-r",
    ]
    assert sum(r.kind == "demo" for r in rows) == 4
    pairs = pair_up(_tok(rows))
    assert len(pairs) == 4 + 6
    by_id = {r.id: r for r in rows}
    assert by_id["qa-00000-1v4-c"].response == "prediction 4 of item 0"
    assert by_id["qa-00000-1v4-r"].response == "prediction 1 of item 0"
    assert by_id["qa-00001-2v3-c"].response == "prediction 3 of item 1"
    win_rate = load_source_rows(path, source="qa-feedback")
    assert not pair_up(_tok(win_rate))  # point-wise rows: no pairs


# --- which combinations the config takes -----------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.source=pairwise"],
        ["data.source=golden-hh"],
        ["data.source=qa-feedback", "data.qa_mode=pairs"],
        ["data.source=hh-rlhf"],
        ["data.source=preprocessed"],  # may hold pairs; plan_stages checks
        ["data.source=pointwise"],
    ],
)
@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_pairwise_losses_take_paired_sources(overrides, loss):
    load_config(None, [f"loss.name={loss}", *overrides])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.source=red-team"], "data.source=red-team has none"),
        (["data.source=golden-hh", "data.hh_mode=unpaired"], "set data.hh_mode=paired"),
        (["data.source=hh-rlhf", "data.hh_mode=unpaired"], "set data.hh_mode=paired"),
        (["data.source=qa-feedback"], "set data.qa_mode=pairs"),
    ],
)
def test_pairwise_losses_refuse_sources_without_pairs(overrides, expected):
    with pytest.raises(ConfigError, match="loss.name=dpo needs chosen/rejected pairs") as err:
        load_config(None, ["loss.name=dpo", *overrides])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_plan_refuses_rows_without_pairs():
    config = load_config(None, ["loss.name=dpo", "data.source=preprocessed", "train.sft_steps=0"])
    rows = _tok([PointwiseRow(f"rt-{i}", "p", "r", 0.5, "feedback") for i in range(4)])
    with pytest.raises(ConfigError, match="training rows of data.source=preprocessed hold none"):
        plan_stages(config, PreparedData(rows, [], tokenizer=None, stats=None))


# --- end to end --------------------------------------------------------------------------


def test_dpo_trains_on_a_generic_pairwise_file(tmp_path):
    rng = np.random.default_rng(0)
    words = ["apple", "river", "stone", "green", "quiet", "window", "paper", "light"]
    records = []
    for i in range(40):
        prompt = f"\n\nHuman: tell me about {' '.join(rng.choice(words, 3))}\n\nAssistant:"
        if i % 2:
            prompt = [{"role": "user", "content": prompt.split("Human: ")[1].split("\n")[0]}]
        chosen = " ".join(rng.choice(words, 8))
        records.append({"prompt": prompt, "chosen": chosen, "rejected": "no"})
    path = _jsonl(tmp_path / "pairs.jsonl", records)
    run_dir = tmp_path / "run"
    args = [
        "train",
        *TINY,
        "data.source=pairwise",
        f"data.path={path}",
        f"data.tokenizer={TOKENIZER}",
        "loss.name=dpo",
        "train.sft_steps=0",
        "train.steps=2",
        f"run_dir={run_dir}",
    ]
    proc = run_cli(args, timeout=240)
    assert "stage 'dpo': 2 steps on 32 examples" in proc.stdout + proc.stderr
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if m["stage"] == "dpo" and "grad_norm" in m]
    assert [m["step"] for m in train] == [1, 2]
    assert train[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)  # policy == reference
    assert all(np.isfinite(m["loss"]) for m in train)
