"""Tests of megatron_pwdpo.data on fixtures in the real HH-RLHF schema and on the shipped slice."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_pwdpo.data import (
    RESPONSE_PREFIX,
    DataError,
    PointwiseRow,
    SentencePieceTokenizer,
    Tokenizer,
    collate,
    hh_rlhf_pairs,
    hh_rlhf_rows,
    read_pointwise_jsonl,
    render_prompt,
    row_texts,
    split_transcript,
    tokenize_rows,
    train_sentencepiece,
    write_jsonl,
)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "data"
SLICE = EXAMPLES / "hh_rlhf_harmless_base_test.jsonl.gz"
TOKENIZER = EXAMPLES / "tokenizer.model"

MULTI_TURN = (
    "\n\nHuman: what are some pranks with a pen?\n\nAssistant: Are you looking for jokes?"
    "\n\nHuman: yep\n\nAssistant: Draw a moustache on a friend."
)


def _pair(i: int, *, chosen: str = "Sure, here you go.", rejected: str = "No.") -> dict:
    prompt = f"\n\nHuman: question {i}?\n\nAssistant: Why?\n\nHuman: curious {i}\n\nAssistant:"
    return {"chosen": f"{prompt} {chosen}", "rejected": f"{prompt} {rejected}"}


def _write_lines(path: Path, lines: list[str | bytes]) -> Path:
    data = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _write_pairs(path: Path, pairs: list[dict]) -> Path:
    return _write_lines(path, [json.dumps(p) for p in pairs])


@pytest.fixture(scope="module")
def tok() -> SentencePieceTokenizer:
    return SentencePieceTokenizer(TOKENIZER)


# --- HH-RLHF conversion -------------------------------------------------------------------


def test_split_transcript_multi_turn():
    prompt, response = split_transcript(MULTI_TURN)
    assert prompt.endswith("\n\nHuman: yep\n\nAssistant:")
    assert prompt.count("\n\nAssistant:") == 2
    assert response == "Draw a moustache on a friend."
    assert prompt + " " + response == MULTI_TURN
    with pytest.raises(ValueError, match="Assistant"):
        split_transcript("\n\nHuman: hi")


def test_paired_rows(tmp_path):
    path = _write_pairs(tmp_path / "hh.jsonl", [_pair(0), _pair(1)])
    rows = hh_rlhf_rows(path)
    assert [r.id for r in rows] == ["hh-000000-c", "hh-000000-r", "hh-000001-c", "hh-000001-r"]
    assert [r.label for r in rows] == [1.0, 0.0, 1.0, 0.0]
    assert {r.kind for r in rows} == {"feedback"}
    assert rows[0].prompt == rows[1].prompt and rows[0].prompt.endswith("curious 0\n\nAssistant:")
    assert (rows[0].response, rows[1].response) == ("Sure, here you go.", "No.")
    demo = hh_rlhf_rows(path, demo_chosen=True)
    assert [r.kind for r in demo] == ["demo", "feedback", "demo", "feedback"]


def test_pairs_with_different_prompts_use_their_own_split(tmp_path):
    pair = {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}
    path = _write_pairs(tmp_path / "hh.jsonl.gz", [pair])
    chosen, rejected = hh_rlhf_rows(path)
    assert (chosen.prompt, rejected.prompt) == (
        "\n\nHuman: a\n\nAssistant:",
        "\n\nHuman: b\n\nAssistant:",
    )
    (baseline,) = hh_rlhf_pairs(path)
    assert (baseline.id, baseline.prompt) == ("hh-000000", chosen.prompt)
    assert (baseline.chosen, baseline.rejected) == ("x", "y")


def test_unpaired_one_row_per_prompt_balanced_and_seeded(tmp_path):
    path = _write_pairs(tmp_path / "hh.jsonl", [_pair(i) for i in range(400)])
    rows = hh_rlhf_rows(path, mode="unpaired", seed=3)
    pair_ids = [r.id[:-2] for r in rows]
    assert len(rows) == 400 and len(set(pair_ids)) == 400
    assert 0.4 < np.mean([r.label for r in rows]) < 0.6
    assert all((r.label == 1.0) == r.id.endswith("-c") for r in rows)
    assert rows == hh_rlhf_rows(path, mode="unpaired", seed=3)
    assert rows != hh_rlhf_rows(path, mode="unpaired", seed=4)


BAD_HH_LINES = {
    "not json": ('{"chosen": "x', "invalid JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "missing chosen": (
        json.dumps({"rejected": "\n\nHuman: a\n\nAssistant: b"}),
        "'chosen': missing",
    ),
    "missing rejected": (json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b"}), "'rejected'"),
    "not a string": (json.dumps({"chosen": 3, "rejected": "x"}), "expected a string"),
    "no assistant": (json.dumps({"chosen": "\n\nHuman: a", "rejected": "x"}), "Assistant"),
    "empty response": (json.dumps(_pair(2, rejected="  ")), "'rejected': empty response"),
    "undecodable": (b'{"chosen": "\xff\xfe"}', "UTF-8"),
}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize("case", sorted(BAD_HH_LINES))
def test_bad_hh_line_names_file_and_line(tmp_path, case, suffix):
    bad, expected = BAD_HH_LINES[case]
    path = _write_lines(tmp_path / f"bad{suffix}", [json.dumps(_pair(0)), "", bad])
    for read in (hh_rlhf_rows, hh_rlhf_pairs):
        with pytest.raises(DataError, match=expected) as e:
            read(path)
        assert str(e.value).startswith(f"{path}:3: ")


def test_empty_hh_file_names_file(tmp_path):
    path = _write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="empty") as e:
        hh_rlhf_rows(path)
    assert str(e.value).startswith(str(path))


def test_shipped_slice(caplog, tmp_path):
    with pytest.raises(DataError) as e:
        hh_rlhf_rows(SLICE)
    assert f"{SLICE}:87: field 'chosen': empty response" in str(e.value)
    rows = hh_rlhf_rows(SLICE, skip_empty_responses=True)
    assert len(rows) == 2 * 1796 and "lines 87, 517, 926, 1104" in caplog.text
    assert all(isinstance(r.prompt, str) and r.prompt.endswith("\n\nAssistant:") for r in rows)
    assert read_pointwise_jsonl(write_jsonl(rows, tmp_path / "rows.jsonl.gz")) == rows
    unpaired = hh_rlhf_rows(SLICE, mode="unpaired", skip_empty_responses=True)
    assert len(unpaired) == 1796 and 0.45 < np.mean([r.label for r in unpaired]) < 0.55


# --- canonical rows -----------------------------------------------------------------------

GOOD = {
    "id": "a",
    "prompt": "\n\nHuman: hi\n\nAssistant:",
    "response": "ok",
    "label": 1,
    "kind": "demo",
}


def _without(name: str) -> dict:
    return {k: v for k, v in GOOD.items() if k != name}


BAD_ROWS = {
    "missing id": (_without("id"), "field 'id': missing"),
    "missing prompt": (_without("prompt"), "field 'prompt': missing"),
    "missing response": (_without("response"), "field 'response': missing"),
    "missing label": (_without("label"), "field 'label': missing"),
    "missing kind": (_without("kind"), "field 'kind': missing"),
    "label high": ({**GOOD, "label": 1.7}, "field 'label': 1.7 is outside \\[0, 1\\]"),
    "label low": ({**GOOD, "label": -0.1}, "field 'label': -0.1 is outside"),
    "label nan": ({**GOOD, "label": math.nan}, "field 'label': nan is not finite"),
    "label inf": ({**GOOD, "label": math.inf}, "field 'label': inf is not finite"),
    "label string": ({**GOOD, "label": "1"}, "field 'label': expected a number"),
    "label bool": ({**GOOD, "label": True}, "field 'label': expected a number"),
    "response type": ({**GOOD, "response": 5}, "field 'response': expected a string"),
    "response empty": ({**GOOD, "response": " \n"}, "field 'response': is empty"),
    "kind": ({**GOOD, "kind": "gold"}, "field 'kind': 'gold' is not one of"),
    "prompt type": ({**GOOD, "prompt": 3}, "field 'prompt': expected a string or a list"),
    "prompt role": ({**GOOD, "prompt": [{"role": "bot", "content": "x"}]}, "prompt\\[0\\]'"),
    "prompt content": ({**GOOD, "prompt": [{"role": "user"}]}, "'content' must be a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_pointwise_row_names_file_and_line(tmp_path, case):
    bad, expected = BAD_ROWS[case]
    path = _write_lines(
        tmp_path / "rows.jsonl", [json.dumps({**GOOD, "id": "first"}), json.dumps(bad)]
    )
    with pytest.raises(DataError, match=expected) as e:
        read_pointwise_jsonl(path)
    assert str(e.value).startswith(f"{path}:2: ")


def test_bad_pointwise_files(tmp_path):
    row = json.dumps(GOOD)
    cases = {
        "dup.jsonl": ([row, row, row], ":2: field 'id': duplicate id 'a' (first at line 1)"),
        "utf.jsonl": ([row, b'{"id": "\xc3"}'], ":2: text is not valid UTF-8"),
        "json.jsonl": ([row, "{'id': 1}"], ":2: invalid JSON"),
        "empty.jsonl": ([], ": file is empty"),
    }
    for name, (lines, expected) in cases.items():
        path = _write_lines(tmp_path / name, lines)
        with pytest.raises(DataError) as e:
            read_pointwise_jsonl(path)
        assert str(e.value).startswith(f"{path}{expected}"), str(e.value)
    truncated = tmp_path / "cut.jsonl.gz"
    lines = "".join(json.dumps({**GOOD, "id": str(i)}) + "\n" for i in range(50))
    truncated.write_bytes(gzip.compress(lines.encode())[:-12])
    with pytest.raises(DataError, match="cannot read file") as e:
        read_pointwise_jsonl(truncated)
    assert str(e.value).startswith(f"{truncated}:")


@pytest.mark.parametrize("name", ["rows.jsonl", "sub/rows.jsonl.gz"])
def test_write_jsonl_round_trip(tmp_path, name):
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "héllo"}]
    rows = [
        PointwiseRow("x", messages, "fine", 0.25, "feedback"),
        PointwiseRow("y", "\n\nHuman: a\n\nAssistant:", "b", 1.0, "demo"),
    ]
    path = write_jsonl(rows, tmp_path / name)
    assert read_pointwise_jsonl(path) == rows
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


# --- tokenizer ----------------------------------------------------------------------------


def test_render_prompt():
    assert render_prompt("\n\nHuman: hi\n\nAssistant:") == "\n\nHuman: hi\n\nAssistant:"
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "v"},
    ]
    expected = "\n\nSystem: s\n\nHuman: u\n\nAssistant: a\n\nHuman: v\n\nAssistant:"
    assert render_prompt(messages) == expected


def test_train_sentencepiece_round_trip_and_determinism(tmp_path):
    texts = list(row_texts(hh_rlhf_rows(SLICE, skip_empty_responses=True)[:100]))
    first = train_sentencepiece(texts, model_prefix=tmp_path / "a" / "sp", vocab_size=400)
    second = train_sentencepiece(texts, model_prefix=tmp_path / "b" / "sp", vocab_size=400)
    assert first.read_bytes() == second.read_bytes()
    sp = SentencePieceTokenizer(first)
    assert isinstance(sp, Tokenizer)
    assert (sp.vocab_size, sp.pad_id, sp.bos_id, sp.eos_id) == (400, 0, 2, 3)
    for text in ["\n\nHuman: hi\n\nAssistant: ok", "  two  spaces\ttab\n", "émoji 🤖 中文"]:
        assert sp.decode(sp.encode(text)) == text


def test_shipped_tokenizer_is_reproducible(tmp_path, tok):
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (2048, 0, 2, 3)
    text = "\n\nHuman: hi\n\nAssistant: ok"
    assert tok.decode(tok.encode(text)) == text
    rows = hh_rlhf_rows(SLICE, skip_empty_responses=True)
    model = train_sentencepiece(row_texts(rows), model_prefix=tmp_path / "tokenizer")
    assert model.read_bytes() == TOKENIZER.read_bytes()


# --- tokenisation and collation -----------------------------------------------------------


def _row(prompt: str, response: str, *, id: str = "r", kind: str = "feedback") -> PointwiseRow:
    return PointwiseRow(id, f"\n\nHuman: {prompt}\n\nAssistant:", response, 0.0, kind)


def test_loss_mask_covers_exactly_the_response(tok):
    rows = [
        _row("How do I bake bread?", "Mix flour, water and yeast.", kind="demo"),
        _row("hi", "hello there, how can I help?"),
    ]
    tokenized, stats = tokenize_rows(rows, tok, seq_length=64)
    assert stats.rows_kept == 2 and stats.prompts_truncated == 0
    batch = collate(tokenized, seq_length=64, pad_id=tok.pad_id)
    for j, (row, t) in enumerate(zip(rows, tokenized, strict=True)):
        mask = batch["loss_mask"][j].bool()
        targets = batch["target_ids"][j][mask].tolist()
        assert targets[-1] == tok.eos_id
        assert tok.decode(targets[:-1]) == RESPONSE_PREFIX + row.response
        assert t.input_ids[0] == tok.bos_id
        assert tok.decode(t.input_ids[1 : t.prompt_len].tolist()) == render_prompt(row.prompt)
        assert not mask[: t.prompt_len - 1].any()  # targets that are prompt tokens
    assert batch["is_demo"].tolist() == [True, False]


def test_long_prompt_is_left_truncated_and_long_response_dropped(tok):
    long_prompt = " ".join(f"word{i}" for i in range(200))
    rows = [
        _row(long_prompt, "Short answer.", id="keep"),
        _row("hi", "a very long answer " * 40, id="drop"),
        _row("ok", "fine", id="short"),
    ]
    tokenized, stats = tokenize_rows(rows, tok, seq_length=48)
    assert [t.id for t in tokenized] == ["keep", "short"]
    assert [t.row_index for t in tokenized] == [0, 2]
    assert (stats.rows_in, stats.rows_kept, stats.prompts_truncated) == (3, 2, 1)
    assert stats.dropped_long_response == 1 and stats.dropped_ids == ("drop",)
    assert stats.length_max > 48 and "dropped 1" in stats.summary()
    keep = tokenized[0]
    assert keep.input_ids.size == 49 and keep.input_ids[0] == tok.bos_id
    full_prompt = tok.encode(render_prompt(rows[0].prompt))
    assert keep.input_ids[1 : keep.prompt_len].tolist() == full_prompt[-(keep.prompt_len - 1) :]
    response = keep.input_ids[keep.prompt_len : -1].tolist()
    assert tok.decode(response) == " Short answer." and keep.input_ids[-1] == tok.eos_id


def test_collate_shapes_and_dtypes(tok):
    rows = [_row("a", "b", kind="demo"), _row("longer question here", "longer answer here")]
    tokenized, _ = tokenize_rows(rows, tok, seq_length=32)
    batch = collate(tokenized, seq_length=32, pad_id=tok.pad_id)
    dtypes = {
        "tokens": torch.int64,
        "target_ids": torch.int64,
        "loss_mask": torch.float32,
        "position_ids": torch.int64,
        "label": torch.float32,
        "is_demo": torch.bool,
        "row_index": torch.int64,
    }
    assert {k: v.dtype for k, v in batch.items()} == dtypes
    for key in ("tokens", "target_ids", "loss_mask", "position_ids"):
        assert batch[key].shape == (2, 32)
    assert batch["label"].shape == batch["row_index"].shape == batch["is_demo"].shape == (2,)
    assert torch.equal(batch["position_ids"][1], torch.arange(32))
    length = tokenized[0].input_ids.size
    assert batch["tokens"][0, : length - 1].tolist() == tokenized[0].input_ids[:-1].tolist()
    assert (batch["tokens"][0, length - 1 :] == tok.pad_id).all()
    assert (batch["target_ids"][0, length - 1 :] == tok.pad_id).all()
    assert batch["loss_mask"][0].sum() == length - tokenized[0].prompt_len
    with pytest.raises(ValueError, match="seq_length"):
        collate(tokenized, seq_length=8, pad_id=0)


def test_shipped_slice_fits_seq_length(tok):
    rows = hh_rlhf_rows(SLICE, skip_empty_responses=True)[:600]
    tokenized, stats = tokenize_rows(rows, tok, seq_length=256)
    assert stats.rows_kept + stats.dropped_long_response == stats.rows_in == 600
    assert max(t.input_ids.size for t in tokenized) <= 257
    assert all(t.prompt_len >= 9 for t in tokenized)
