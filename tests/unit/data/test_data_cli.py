"""Bad data through the real command line: one line naming file:line, exit 2, nothing written.

The eight ``train`` runs start together (a thread each around `run_cli`): each fails while
loading data, before any model is built, so the module costs about one process start per
core instead of eight in a row.
"""

from __future__ import annotations

import gzip
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import run_cli

from megatron_pwdpo.cli import main
from megatron_pwdpo.data.readers import read_pointwise

GOOD = {"prompt": "\n\nHuman: hi\n\nAssistant:", "response": "hello", "label": 1.0, "kind": "demo"}


def _line(**change) -> bytes:
    obj = {"id": "bad", **GOOD, **change}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


# case -> (third line of the file, or None for an empty file; expected message after path)
BAD = {
    "missing field": (_line(label=...), ":3: field 'label': missing"),
    "wrong type": (_line(response=5), ":3: field 'response': expected a string, got int"),
    "label out of range": (_line(label=1.5), ":3: field 'label': 1.5 is outside [0, 1]"),
    "label nan": (_line(label=math.nan), ":3: field 'label': nan is not finite"),
    "empty response": (_line(response="  "), ":3: field 'response': is empty"),
    "undecodable": (
        b'{"id": "bad", "prompt": "\xff"}',
        ":3: text is not valid UTF-8 (invalid start",
    ),
    "empty file": (None, ": file is empty (no rows)"),
    "duplicate id": (_line(id="row1"), ":3: field 'id': duplicate id 'row1' (first at line 2)"),
}


def _bad_file(folder: Path, case: str) -> Path:
    third, _ = BAD[case]
    path = folder / f"{case.replace(' ', '_')}.jsonl"
    lines = [] if third is None else [_line(id="row0"), _line(id="row1"), third]
    path.write_bytes(b"".join(x + b"\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_data")

    def run(case: str):
        path = _bad_file(folder, case)
        run_dir = folder / f"run_{path.stem}"
        args = ["train", "data.source=pointwise", f"data.path={path}", f"run_dir={run_dir}"]
        return path, run_dir, run_cli(args, check=False, timeout=240)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(BAD, pool.map(run, BAD), strict=True))


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_stops_train_with_one_line(train_runs, case):
    path, run_dir, proc = train_runs[case]
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"megatron-pwdpo: error: {path}{BAD[case][1]}")
    leftovers = ["config.yaml", "metrics.jsonl", "checkpoints"]
    assert not any((run_dir / name).exists() for name in leftovers)


def test_preprocess_bad_input_writes_nothing(tmp_path, capsys):
    bad = _bad_file(tmp_path, "label out of range")
    out = tmp_path / "out" / "pre"
    code = main(["preprocess", "--source", "pointwise", "--input", str(bad), "--out", str(out)])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"megatron-pwdpo: error: {bad}{BAD['label out of range'][1]}"
    ]
    assert not out.parent.exists() or not any(out.parent.iterdir())
    good = tmp_path / "good.jsonl"
    good.write_text(_line(id="a").decode() + "\n")
    args = ["preprocess", "--source", "pointwise", "--input", str(good), "--out", str(out)]
    code = main([*args, "--tokenizer", str(tmp_path / "none.model")])
    assert code == 2 and "no such sentencepiece model" in capsys.readouterr().err
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_preprocess_converts_and_tokenizer_train_takes_every_source(tmp_path, capsys):
    attempts = [
        {
            "transcript": f"\n\nHuman: question {i}?\n\nAssistant: answer number {i}.",
            "min_harmlessness_score_transcript": float(i),
            "rating": float(i % 5),
        }
        for i in range(40)
    ]
    src = tmp_path / "red_team_attempts.jsonl.gz"
    src.write_bytes(gzip.compress(json.dumps(attempts).encode()))  # one JSON array
    out = tmp_path / "rows.jsonl.gz"
    base = ["preprocess", "--source", "red-team", "--input", str(src)]
    assert main([*base, "--out", str(out), "--red-team-score", "rating"]) == 0
    rows = read_pointwise(out)
    assert len(rows) == 40 and rows[1].label == 0.75 and rows[1].response == "answer number 1."
    model = tmp_path / "sp"
    tok_args = ["--source", "red-team", "--data", str(src), "--out", str(model)]
    assert main(["tokenizer", "train", *tok_args, "--vocab-size", "300"]) == 0
    tokenizer = ["--tokenizer", str(tmp_path / "sp.model"), "--seq-length", "64"]
    assert main([*base, "--out", str(tmp_path / "pre"), *tokenizer]) == 0
    assert "wrote 40 rows" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob("pre*")) == ["pre.bin", "pre.idx.npz", "pre.json"]
