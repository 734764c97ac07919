"""Converters and readers on small fixtures in each source's real schema (notes/DATASETS.md)."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_pwdpo.data.hf_tokenizer import (
    HFTokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
    transcript_to_messages,
)
from megatron_pwdpo.data.loading import (
    SOURCES,
    heldout_cut,
    label_histogram,
    load_source_rows,
    prompt_groups,
)
from megatron_pwdpo.data.readers import check_unique_ids, read_pointwise
from megatron_pwdpo.data.records import iter_records
from megatron_pwdpo.data.schema import DataError, PointwiseRow
from megatron_pwdpo.data.sources import golden_hh_pairs, golden_hh_rows, hh_rlhf_rows
from megatron_pwdpo.data.sources_qa import qa_feedback_pairs, qa_feedback_rows, win_rates
from megatron_pwdpo.data.sources_redteam import (
    logistic_labels,
    minmax_labels,
    red_team_rows,
)
from megatron_pwdpo.data.tokenize import tokenize_rows


def _write(path: Path, text: str | bytes) -> Path:
    data = text.encode() if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _jsonl(path: Path, records: list) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in records))


def _array(path: Path, records: list) -> Path:
    return _write(path, json.dumps(records, indent=2))


# --- Golden HH ------------------------------------------------------------------------------


def _hh_pair(i: int) -> dict:
    prompt = f"\n\nHuman: how do I stay safe online, part {i}?\n\nAssistant:"
    return {
        "chosen": f"{prompt} Use strong passwords and a password manager.",
        "rejected": f"{prompt} Just don't bother.",
    }


def test_golden_hh_chosen_rows_are_demonstrations(tmp_path):
    path = _jsonl(tmp_path / "train.jsonl", [_hh_pair(i) for i in range(3)])
    rows = golden_hh_rows(path)
    assert [r.id for r in rows][:2] == ["golden-000000-c", "golden-000000-r"]
    assert [(r.label, r.kind) for r in rows[:2]] == [(1.0, "demo"), (0.0, "feedback")]
    assert rows[0].response == "Use strong passwords and a password manager."
    unpaired = golden_hh_rows(path, mode="unpaired", seed=1)
    assert len(unpaired) == 3 and all((r.kind == "demo") == (r.label == 1.0) for r in unpaired)
    pairs = golden_hh_pairs(path)
    assert [p.id for p in pairs] == ["golden-000000", "golden-000001", "golden-000002"]
    assert pairs[0].rejected == "Just don't bother."


# --- red-team attempts ----------------------------------------------------------------------


def _attempt(i: int, *, score: float, rating: float, transcript: str | None = None) -> dict:
    return {
        "transcript": transcript
        or f"\n\nHuman: tell me something harmful #{i}\n\nAssistant: I won't do that, sorry.",
        "min_harmlessness_score_transcript": score,
        "num_params": "52B",
        "model_type": "context distillation",
        "rating": rating,
        "task_description": f"tried to get harmful advice {i}",
        "task_description_harmlessness_score": 0.5,
        "red_team_member_id": i,
        "is_upworker": False,
        "tags": None if i % 2 else ["violence"],
    }


ATTEMPTS = [
    _attempt(0, score=-2.0, rating=4.0),
    _attempt(1, score=1.0, rating=0.0),
    _attempt(
        2,
        score=0.0,
        rating=2.0,
        transcript=(
            "\n\nHuman: hi\n\nAssistant: Hello.\n\nHuman: and?\n\nAssistant: Bye.\n\nHuman: wait"
        ),
    ),
]


@pytest.mark.parametrize("name", ["red_team_attempts.jsonl.gz", "attempts.jsonl", "a.json"])
def test_red_team_labels_and_containers(tmp_path, name):
    write = _jsonl if name == "attempts.jsonl" else _array  # the real file may be an array
    path = write(tmp_path / name, ATTEMPTS)
    rating = red_team_rows(path, score="rating")
    assert [r.label for r in rating] == [0.0, 1.0, 0.5]  # 1 - rating / 4
    assert [r.id for r in rating] == ["rt-000000", "rt-000001", "rt-000002"]
    assert {r.kind for r in rating} == {"feedback"}
    minmax = red_team_rows(path)  # harmlessness, min-max over the file
    assert [r.label for r in minmax] == pytest.approx([0.0, 1.0, 2 / 3])
    ranged = red_team_rows(path, score_range=(-1.0, 0.0))
    assert [r.label for r in ranged] == [0.0, 1.0, 1.0]  # clipped
    logistic = red_team_rows(path, normalisation="logistic", scale=2.0)
    assert [r.label for r in logistic] == pytest.approx(
        [1 / (1 + math.e), 1 / (1 + math.e**-0.5), 0.5]
    )
    # the unanswered last Human turn is not part of the response
    assert (rating[2].prompt, rating[2].response) == (
        "\n\nHuman: hi\n\nAssistant: Hello.\n\nHuman: and?\n\nAssistant:",
        "Bye.",
    )


def test_label_maps_are_bounded():
    scores = np.array([-1e6, -3.0, 0.0, 3.0, 1e6])
    assert np.all((logistic_labels(scores) >= 0) & (logistic_labels(scores) <= 1))
    assert minmax_labels(np.array([2.0, 2.0])).tolist() == [0.5, 0.5]


BAD_ATTEMPTS = {
    "missing transcript": ({"rating": 1.0}, "field 'transcript': missing"),
    "rating range": (_attempt(9, score=0.0, rating=5.0), "field 'rating': 5 is outside \\[0, 4\\]"),
    "score nan": (
        _attempt(9, score=math.nan, rating=1.0),
        "'min_harmlessness_score_transcript': nan",
    ),
    "score type": (
        {**_attempt(9, score=0, rating=1), "rating": "2"},
        "'rating': expected a number",
    ),
    "no assistant": (_attempt(9, score=0, rating=1, transcript="\n\nHuman: hi"), "Assistant"),
    "empty response": (
        _attempt(9, score=0, rating=1, transcript="\n\nHuman: hi\n\nAssistant: \n\nHuman: x"),
        "empty response",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ATTEMPTS))
def test_bad_red_team_record_names_file_and_line(tmp_path, case):
    bad, expected = BAD_ATTEMPTS[case]
    score = (
        "rating"
        if case.startswith(("rating", "score type"))
        else "min_harmlessness_score_transcript"
    )
    path = _array(tmp_path / "rt.json", [ATTEMPTS[0], bad])
    with pytest.raises(DataError, match=expected) as e:
        red_team_rows(path, score=score)
    text = path.read_text()
    second = text.index("{", text.index("}") + 1)  # where the second element starts
    line = text[:second].count("\n") + 1
    assert str(e.value).startswith(f"{path}:{line}: ")


# --- QA-feedback ----------------------------------------------------------------------------


def _qa_item(i: int, preference: list[int]) -> dict:
    return {
        "question": f"When does bloom by troye sivan come out? ({i})",
        "passages": [
            [
                "Bloom (Troye Sivan album)",
                "Bloom (Troye Sivan album)\n\nBloom is the second studio album by Troye Sivan.",
                "It was released on 31 August 2018.",
            ],
            ["Troye Sivan", "Troye Sivan is an Australian singer."],
        ],
        "gold": "Bloom was released on 31 August 2018.",
        "prediction 1": "Bloom came out in August 2018, and Sivan is a singer.",
        "prediction 2": "It was released in 2018.",
        "prediction 3": "Bloom is an album.",
        "prediction 4": "Bloom was released on 31 August 2018 by EMI.",
        "feedback": {
            "errors": [{"error type": "Irrelevant", "explanation": "", "start": 31, "end": 53}],
            "missing-info": [{"error type": "Missing-Answer", "passage_id": 1, "sentence_id": [2]}],
            "corrected-prediction": "Bloom came out on 31 August 2018.",
        },
        "preference": preference,
    }


def test_win_rates_count_ties_half():
    # 1v2 tie, 1v3 -> 1, 1v4 -> 4, 2v3 -> 2, 2v4 tie, 3v4 -> 4
    assert win_rates([0, 1, 2, 1, 0, 2]) == pytest.approx([0.5, 2 / 3, 0.0, 5 / 6])
    assert sum(win_rates([1, 2, 0, 0, 1, 2])) == pytest.approx(2.0)  # 6 comparisons / 3


def test_qa_feedback_rows_and_pairs(tmp_path):
    path = _array(tmp_path / "dev_feedback.json", [_qa_item(0, [0, 1, 2, 1, 0, 2])])
    rows = qa_feedback_rows(path)
    assert [r.id for r in rows] == [
        "qa-00000-gold",
        "qa-00000-corrected",
        "qa-00000-p1",
        "qa-00000-p2",
        "qa-00000-p3",
        "qa-00000-p4",
    ]
    assert [r.kind for r in rows] == ["demo", "demo"] + ["feedback"] * 4
    assert [r.label for r in rows] == pytest.approx([1, 1, 0.5, 2 / 3, 0, 5 / 6])
    assert rows[1].response == "Bloom came out on 31 August 2018."
    (message,) = rows[0].prompt
    content = message["content"]
    assert message["role"] == "user" and content.endswith(
        "Question: When does bloom by troye sivan come out? (0)"
    )
    assert "[1] Bloom (Troye Sivan album): Bloom (Troye Sivan album) Bloom is the second" in content
    assert "[2] Troye Sivan: Troye Sivan is an Australian singer." in content
    assert all(r.prompt == rows[0].prompt for r in rows)
    assert len(qa_feedback_rows(path, demonstrations=False)) == 4
    pairs = qa_feedback_pairs(path)
    assert [p.id for p in pairs] == ["qa-00000-1v3", "qa-00000-1v4", "qa-00000-2v3", "qa-00000-3v4"]
    assert (pairs[1].chosen, pairs[1].rejected) == (rows[5].response, rows[2].response)


BAD_QA = {
    "preference length": ({"preference": [0, 1]}, "'preference': expected six"),
    "preference value": ({"preference": [0, 1, 3, 0, 0, 0]}, "'preference': expected six"),
    "missing prediction": ({"prediction 3": None}, "'prediction 3': expected a string"),
    "passages": ({"passages": "text"}, "'passages': expected a list"),
    "empty gold": ({"gold": " "}, "'gold': is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_QA))
def test_bad_qa_item_names_file_and_line(tmp_path, case):
    change, expected = BAD_QA[case]
    bad = {**_qa_item(1, [0] * 6), **change}
    path = _array(tmp_path / "train_feedback.json", [_qa_item(0, [1] * 6), bad])
    text = path.read_text()
    line = text[: text.index('"question": "When does bloom by troye sivan come out? (1)"')].count(
        "\n"
    )
    with pytest.raises(DataError, match=expected) as e:
        qa_feedback_rows(path)
    assert str(e.value).startswith(f"{path}:{line}: ")  # the line of the item's "{"


# --- containers: JSON array, parquet, datasets folder, hub -----------------------------------

GOOD = [
    {
        "id": "a",
        "prompt": "\n\nHuman: hi\n\nAssistant:",
        "response": "hello",
        "label": 1.0,
        "kind": "demo",
    },
    {
        "id": "b",
        "prompt": [{"role": "user", "content": "hi"}],
        "response": "go away",
        "label": 0.25,
        "kind": "feedback",
    },
]


def _parquet(path: Path, records: list[dict], schema: pa.Schema | None = None) -> Path:
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)
    return path


def test_canonical_rows_from_every_container(tmp_path):
    import datasets

    expected = [
        PointwiseRow("a", GOOD[0]["prompt"], "hello", 1.0, "demo"),
        PointwiseRow("b", [{"role": "user", "content": "hi"}], "go away", 0.25, "feedback"),
    ]
    jsonl = _jsonl(tmp_path / "rows.jsonl.gz", GOOD)
    array = _array(tmp_path / "rows.json", GOOD)
    parquet = _parquet(
        tmp_path / "rows.parquet",
        [{**GOOD[0], "prompt": [{"role": "user", "content": "x"}]}, GOOD[1]],
    )
    datasets.Dataset.from_list(GOOD[1:]).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(GOOD[:1]),
            "test": datasets.Dataset.from_list(GOOD[1:]),
        }
    ).save_to_disk(str(tmp_path / "dd"))
    assert read_pointwise(jsonl) == expected == read_pointwise(array)
    assert read_pointwise(parquet)[1] == expected[1]
    assert read_pointwise(tmp_path / "ds") == expected[1:]
    assert read_pointwise(tmp_path / "dd", split="test") == expected[1:]
    with pytest.raises(DataError, match="choose one of the splits"):
        read_pointwise(tmp_path / "dd")
    with pytest.raises(DataError, match="no such file"):
        read_pointwise(tmp_path / "missing.jsonl")


def test_container_errors_name_file_and_row(tmp_path):
    bad_label = [GOOD[0], {**GOOD[1], "prompt": "x", "label": 2.0}]
    parquet = _parquet(tmp_path / "bad.parquet", bad_label)
    with pytest.raises(DataError, match="outside") as e:
        read_pointwise(parquet)
    assert str(e.value).startswith(f"{parquet}:2: ")
    dup = _parquet(tmp_path / "dup.parquet", [GOOD[0], GOOD[0]])
    with pytest.raises(DataError, match=f"^{dup}:2: field 'id': duplicate id 'a'"):
        read_pointwise(dup)
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.string()),
            ("response", pa.binary()),
            ("label", pa.float64()),
            ("kind", pa.string()),
        ]
    )
    undecodable = _parquet(
        tmp_path / "utf.parquet",
        [{**GOOD[0], "response": b"ok"}, {**GOOD[0], "id": "z", "response": b"\xff"}],
        schema,
    )
    with pytest.raises(DataError, match=f"^{undecodable}:2: text is not valid UTF-8"):
        read_pointwise(undecodable)
    empty = _parquet(tmp_path / "empty.parquet", [], schema)
    with pytest.raises(DataError, match=f"^{empty}: file is empty"):
        read_pointwise(empty)
    array = _write(tmp_path / "a.json", '[\n {"id": "a"},\n {"id": x}\n]')
    with pytest.raises(DataError, match=f"^{array}:3: invalid JSON"):
        list(iter_records(array))
    utf = _write(tmp_path / "u.json", b'[\n{"id": "a"},\n{"id": "\xff"}]')
    with pytest.raises(DataError, match=f"^{utf}:3: text is not valid UTF-8"):
        list(iter_records(utf))
    with pytest.raises(DataError, match="file is empty"):
        list(iter_records(_write(tmp_path / "e.json", " [ ] ")))


def test_hub_names_go_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([GOOD[0], {**GOOD[0], "id": "b"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert len(read_pointwise("hf:someone/rows")) == 2
    assert calls == [("someone/rows", "train")]


def test_hh_rlhf_from_parquet_matches_jsonl(tmp_path):
    pairs = [_hh_pair(i) for i in range(4)]
    from_jsonl = hh_rlhf_rows(_jsonl(tmp_path / "hh.jsonl", pairs))
    assert hh_rlhf_rows(_parquet(tmp_path / "hh.parquet", pairs)) == from_jsonl


# --- dispatch, ids, split, summary ----------------------------------------------------------


def test_every_source_loads_and_ids_are_unique(tmp_path):
    files = {
        "pointwise": _jsonl(tmp_path / "p.jsonl", GOOD),
        "hh-rlhf": _jsonl(tmp_path / "hh.jsonl", [_hh_pair(0), _hh_pair(1)]),
        "golden-hh": _jsonl(tmp_path / "g.jsonl", [_hh_pair(0)]),
        "red-team": _array(tmp_path / "rt.json", ATTEMPTS),
        "qa-feedback": _array(tmp_path / "qa.json", [_qa_item(0, [1] * 6)]),
        "pairwise": _jsonl(
            tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}]
        ),
        "trl": _jsonl(tmp_path / "trl.jsonl", [{"prompt": "p", "completion": "a", "label": True}]),
    }
    files["auto"] = files["hh-rlhf"]
    counts = {s: len(load_source_rows(files[s], source=s)) for s in SOURCES}
    assert counts == {
        "auto": 4,
        "trl": 1,
        "pointwise": 2,
        "hh-rlhf": 4,
        "golden-hh": 2,
        "red-team": 3,
        "qa-feedback": 6,
        "pairwise": 2,
    }
    qa_pairs = load_source_rows(files["qa-feedback"], source="qa-feedback", qa_mode="pairs")
    assert len(qa_pairs) == 2 + 2 * 6  # gold and corrected, six non-tied comparisons
    rows = [PointwiseRow("x", "p", "r", 1.0, "demo")] * 2
    with pytest.raises(DataError, match="duplicate id 'x' \\(rows 1 and 2"):
        check_unique_ids(rows, path="f")
    with pytest.raises(ValueError, match="unknown data source"):
        load_source_rows(files["pointwise"], source="nope")


def test_heldout_split_keeps_prompt_groups_together():
    prompts = ["a", "a", "b", "b", "b", "c"]
    rows = [PointwiseRow(str(i), p, "r", 1.0, "demo") for i, p in enumerate(prompts)]
    groups = prompt_groups(rows)
    assert groups.tolist() == [0, 0, 2, 2, 2, 5]
    assert [heldout_cut(groups, k) for k in range(7)] == [6, 5, 2, 2, 2, 0, 0]
    assert (
        label_histogram([0.0, 0.1, 0.5, 1.0])
        == "[0,0.2) 2 | [0.2,0.4) 0 | [0.4,0.6) 1 | [0.6,0.8) 0 | [0.8,1] 1"
    )


# --- Hugging Face tokenizer -----------------------------------------------------------------

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny byte-level BPE tokenizer with a chat template, saved like a hub folder."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["Human: hello there Assistant: hi, how can I help?"] * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = TEMPLATE
    folder = tmp_path_factory.mktemp("hf_tok")
    fast.save_pretrained(folder)
    return folder


def test_hf_tokenizer_round_trip_and_chat_template(hf_dir):
    tok = load_tokenizer(hf_dir, kind="hf")
    assert isinstance(tok, HFTokenizer) and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for text in [" héllo\n  there", "\n\nHuman: hi\n\nAssistant: ok"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.bos_id not in ids
    messages = [{"role": "user", "content": "hi"}]
    assert tok.render_prompt(messages) == "<|user|>hi\n<|assistant|>"  # bos removed
    hh = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert tok.render_prompt(hh) == "<|user|>a\n<|assistant|>b\n<|user|>c\n<|assistant|>"
    assert transcript_to_messages("plain") == [{"role": "user", "content": "plain"}]
    plain = HFTokenizer(hf_dir, chat_template=False)
    assert plain.render_prompt(hh) == hh and plain.response_prefix == " "
    assert tokenizer_fingerprint(plain) != tokenizer_fingerprint(tok)


def test_hf_tokenizer_masks_exactly_the_prompt(hf_dir):
    tok = HFTokenizer(hf_dir)
    row = PointwiseRow(
        "r", [{"role": "user", "content": "hello there"}], "hi, how can I help?", 1.0, "demo"
    )
    (t,), _ = tokenize_rows([row], tok, seq_length=64)
    assert t.input_ids[0] == tok.bos_id and t.input_ids[-1] == tok.eos_id
    assert tok.decode(t.input_ids[1 : t.prompt_len]) == "<|user|>hello there\n<|assistant|>"
    assert tok.decode(t.input_ids[t.prompt_len : -1]) == "hi, how can I help?"


def test_tokenizer_load_errors(tmp_path):
    with pytest.raises(DataError, match="no such sentencepiece model"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(DataError, match="cannot load the sentencepiece model"):
        load_tokenizer(_write(tmp_path / "bad.model", b"not a model"))
    with pytest.raises(DataError, match="not a folder"):
        load_tokenizer(tmp_path / "nope", kind="hf")
    with pytest.raises(DataError, match="cannot load a Hugging Face tokenizer"):
        load_tokenizer(tmp_path, kind="hf")
