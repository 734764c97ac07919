"""TRL's preference formats and format detection, on real small files in every container."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_pwdpo.data.loading import detect_source, load_source_rows
from megatron_pwdpo.data.readers import read_pointwise
from megatron_pwdpo.data.schema import DataError, PointwiseRow
from megatron_pwdpo.data.sources_trl import trl_rows
from megatron_pwdpo.data.tokenize import tokenize_rows
from megatron_pwdpo.data.tokenizer import SentencePieceTokenizer

ROOT = Path(__file__).resolve().parents[3]
USER = [{"role": "user", "content": "What colour is the sky?"}]


def _msg(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


def write(path: Path, records: list) -> Path:
    """``records`` as jsonl(.gz), a JSON array (.json), parquet or a save_to_disk folder
    (no suffix), chosen by the name."""
    name = path.name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(records), path)
    elif "." not in name:
        import datasets

        datasets.Dataset.from_list(records).save_to_disk(str(path))
    else:
        lines = [json.dumps(r) for r in records]  # one record a line: positions are rows
        is_array = ".json." in name or name.endswith(".json")
        text = "[" + ",\n".join(lines) + "]" if is_array else "".join(f"{x}\n" for x in lines)
        data = text.encode()
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return path


UNPAIRED = [
    {"prompt": "The sky is", "completion": " blue.", "label": True},
    {"prompt": "The sky is", "completion": " green.", "label": False},
    {"prompt": "Grass is", "completion": " green.", "label": 0.75},
]
PAIRED = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "Grass is", "chosen": " green.", "rejected": " red."},
]
IMPLICIT = [
    {"chosen": "The sky is blue.", "rejected": "The sky is bright green."},
    {"chosen": "Grass is green.", "rejected": "Grass is grey."},
]
CONV_UNPAIRED = [
    {"prompt": USER, "completion": _msg("Blue."), "label": True},
    {"prompt": USER, "completion": _msg("Green."), "label": False},
]
CONV_PAIRED = [{"prompt": USER, "chosen": _msg("Blue."), "rejected": _msg("Green.")}]
CONV_IMPLICIT = [
    {"chosen": [*USER, *_msg("Blue.")], "rejected": [*USER, *_msg("Green.")]},
]


def test_unpaired_text_ids_kinds_and_labels(tmp_path):
    rows = trl_rows(write(tmp_path / "u.jsonl", UNPAIRED))
    assert rows == [
        PointwiseRow("trl-000000", "The sky is", "blue.", 1.0, "demo"),
        PointwiseRow("trl-000001", "The sky is", "green.", 0.0, "feedback"),
        PointwiseRow("trl-000002", "Grass is", "green.", 0.75, "feedback"),
    ]
    no_demos = trl_rows(tmp_path / "u.jsonl", demo_chosen=False)
    assert {r.kind for r in no_demos} == {"feedback"}
    own = [{**UNPAIRED[0], "id": 7, "kind": "feedback"}, {**UNPAIRED[1], "id": "x"}]
    rows = trl_rows(write(tmp_path / "own.jsonl", own))
    assert [(r.id, r.kind) for r in rows] == [("7", "feedback"), ("x", "feedback")]


def test_prompt_completion_rows_are_demonstrations(tmp_path):
    sft = [{"prompt": USER, "completion": _msg("Blue.")}, {"prompt": "Sky:", "completion": " blue"}]
    rows = load_source_rows(write(tmp_path / "sft.jsonl", sft), source="auto")
    assert rows == [
        PointwiseRow("trl-000000", USER, "Blue.", 1.0, "demo"),
        PointwiseRow("trl-000001", "Sky:", "blue", 1.0, "demo"),
    ]


def test_paired_explicit_and_implicit_give_the_same_rows(tmp_path):
    explicit = trl_rows(write(tmp_path / "p.json", PAIRED))
    implicit = trl_rows(write(tmp_path / "i.jsonl.gz", IMPLICIT))
    assert [(r.id, r.prompt, r.response, r.label, r.kind) for r in explicit] == [
        ("trl-000000-c", "The sky is", "blue.", 1.0, "demo"),
        ("trl-000000-r", "The sky is", "green.", 0.0, "feedback"),
        ("trl-000001-c", "Grass is", "green.", 1.0, "demo"),
        ("trl-000001-r", "Grass is", "red.", 0.0, "feedback"),
    ]
    # the common prefix is cut back to a word boundary ("Grass is gr" -> "Grass is")
    assert [(r.prompt, r.response) for r in implicit] == [
        ("The sky is", "blue."),
        ("The sky is", "bright green."),
        ("Grass is", "green."),
        ("Grass is", "grey."),
    ]


@pytest.mark.parametrize(
    ("records", "name"),
    [(CONV_UNPAIRED, "cu.parquet"), (CONV_PAIRED, "cp"), (CONV_IMPLICIT, "ci.jsonl")],
)
def test_conversational_rows_keep_messages(tmp_path, records, name):
    rows = trl_rows(write(tmp_path / name, records))
    assert [(r.prompt, r.response, r.label) for r in rows] == [
        (USER, "Blue.", 1.0),
        (USER, "Green.", 0.0),
    ]


def test_conversational_rows_render_with_the_plain_template(tmp_path):
    tok = SentencePieceTokenizer(ROOT / "examples" / "data" / "tokenizer.model")
    rows = trl_rows(write(tmp_path / "c.jsonl", CONV_UNPAIRED))
    (t, _), _ = tokenize_rows(rows, tok, seq_length=64)
    text = "\n\nHuman: What colour is the sky?\n\nAssistant:"
    assert tok.decode(t.input_ids[1 : t.prompt_len]) == text
    assert tok.decode(t.input_ids[t.prompt_len : -1]) == " Blue."


def test_conversational_rows_render_with_the_chat_template(tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_pwdpo.data.hf_tokenizer import HFTokenizer

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    base.train_from_iterator(["What colour is the sky? Blue."] * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=base, bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    fast.save_pretrained(tmp_path / "tok")
    tok = HFTokenizer(tmp_path / "tok")
    rows = trl_rows(write(tmp_path / "c.jsonl", CONV_PAIRED))
    (t, _), _ = tokenize_rows(rows, tok, seq_length=64)
    prompt = tok.decode(t.input_ids[1 : t.prompt_len])
    assert prompt == "[user]What colour is the sky?[assistant]"
    assert tok.decode(t.input_ids[t.prompt_len : -1]) == "Blue."


def test_detection_picks_the_format_and_an_explicit_source_wins(tmp_path):
    hh = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello",
        "rejected": "\n\nHuman: hi\n\nAssistant: go",
    }
    files = {
        "trl": [write(tmp_path / n, r) for n, r in [("a.jsonl", UNPAIRED), ("b", PAIRED)]],
        "hh-rlhf": [write(tmp_path / "hh.jsonl", [hh])],
        "pointwise": [
            write(tmp_path / "pw.parquet", [{"prompt": "p", "response": "r", "label": 1}])
        ],
    }
    for source, paths in files.items():
        for path in paths:
            assert detect_source(path) == source, path
            assert load_source_rows(path, source="auto") == load_source_rows(path, source=source)
    with pytest.raises(DataError, match="field 'response': missing"):
        load_source_rows(tmp_path / "a.jsonl", source="pointwise")
    odd = write(tmp_path / "odd.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError) as e:
        load_source_rows(odd, source="auto")
    assert str(e.value).startswith(f"{odd}:1: cannot tell the data format")


def test_canonical_rows_without_id_or_kind(tmp_path):
    path = write(tmp_path / "rows.jsonl", [{"prompt": "p", "response": "r", "label": 1}] * 2)
    rows = read_pointwise(path)
    assert [(r.id, r.kind) for r in rows] == [("row-000000", "demo"), ("row-000001", "demo")]
    assert {r.kind for r in read_pointwise(path, demo_chosen=False)} == {"feedback"}


# Each format with one bad record at row 2, in one container each: (good first record,
# bad record, file name, expected message after "path:2: ").
BAD = {
    "unpaired label": (UNPAIRED[0], {**UNPAIRED[0], "label": 2}, "u.jsonl", "field 'label'"),
    "unpaired label str": (UNPAIRED[0], {**UNPAIRED[0], "label": "yes"}, "s.json", "field 'label'"),
    "unpaired completion": (
        UNPAIRED[0],
        {"prompt": "p", "label": True, "chosen": "x"},
        "uc.jsonl.gz",
        "field 'completion': missing",
    ),
    "unpaired empty": (
        UNPAIRED[0],
        {**UNPAIRED[0], "completion": " "},
        "e.jsonl",
        "field 'completion': is empty",
    ),
    "paired rejected": (
        PAIRED[0],
        {"prompt": "p", "chosen": "c"},
        "p.parquet",
        "field 'rejected': missing",
    ),
    "paired prompt": (
        PAIRED[0],
        {"chosen": "a b", "rejected": "a c"},
        "pp",
        "field 'prompt': missing",
    ),
    "implicit no prompt": (
        IMPLICIT[0],
        {"chosen": "yes", "rejected": "no"},
        "i.jsonl",
        "field 'chosen'",
    ),
    "implicit same": (
        IMPLICIT[0],
        {"chosen": "a b", "rejected": "a b"},
        "is.jsonl",
        "field 'chosen': is empty",
    ),
    "conv role": (
        CONV_UNPAIRED[0],
        {**CONV_UNPAIRED[0], "prompt": [{"role": "bot", "content": "x"}]},
        "cr.jsonl",
        "field 'prompt': message 0",
    ),
    "conv completion": (
        CONV_PAIRED[0],
        {**CONV_PAIRED[0], "chosen": [*USER, *_msg("a")]},
        "cc.json",
        "field 'chosen': expected one assistant message",
    ),
    "conv implicit": (
        CONV_IMPLICIT[0],
        {"chosen": _msg("a"), "rejected": _msg("b")},
        "ci.jsonl",
        "field 'chosen': shares no first message",
    ),
    "sft completion": (
        {"prompt": "p", "completion": "c"},
        {"prompt": "p", "answer": "c"},
        "sft.jsonl",
        "field 'completion': missing",
    ),
    "mixed": (
        CONV_IMPLICIT[0],
        {"chosen": _msg("a"), "rejected": "b"},
        "m.jsonl",
        "field 'rejected'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_record_names_file_row_and_field(tmp_path, case):
    good, bad, name, expected = BAD[case]
    path = write(tmp_path / name, [good, bad])
    with pytest.raises(DataError) as e:
        load_source_rows(path, source="auto")
    message = str(e.value)
    assert message.startswith(f"{path}:2: {expected}"), message
    assert "\n" not in message
