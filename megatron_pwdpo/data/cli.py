"""``megatron-pwdpo preprocess``: convert a data set, and tokenise it once for big runs.

    megatron-pwdpo preprocess --source SOURCE --input PATH --out rows.jsonl.gz
    megatron-pwdpo preprocess --source SOURCE --input PATH --out PREFIX \\
        --tokenizer examples/data/tokenizer.model --seq-length 256

With an ``--out`` ending in ``.jsonl`` or ``.jsonl.gz`` the rows are converted to the
canonical format (no tokenizer needed). Any other ``--out`` is a prefix: the rows are
tokenised and written in the memory-mapped format of `megatron_pwdpo.data.indexed`
(``PREFIX.bin``, ``PREFIX.idx.npz``, ``PREFIX.json``), which a run reads with
``data.source=preprocessed data.path=PREFIX`` and the same tokenizer and ``seq_length``.
Bad input stops with one line naming the file and line, and nothing is written.
"""

from __future__ import annotations

import argparse
import time

from megatron_pwdpo.data.loading import QA_MODES, SOURCES

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        choices=SOURCES,
        default="auto",
        help="input format (default: detected from the first record)",
    )
    parser.add_argument("--split", default=None, help="split of a datasets folder")
    parser.add_argument("--hh-mode", choices=["paired", "unpaired"], default="paired")
    parser.add_argument(
        "--demo-chosen",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hh-rlhf: chosen rows are demonstrations",
    )
    parser.add_argument(
        "--seed",
        "--unpaired-seed",
        dest="seed",
        type=int,
        default=0,
        help="seed of the unpaired pick (data.unpaired_seed)",
    )
    parser.add_argument(
        "--red-team-score",
        choices=["min_harmlessness_score_transcript", "rating"],
        default="min_harmlessness_score_transcript",
    )
    parser.add_argument(
        "--red-team-normalisation", choices=["minmax", "logistic"], default="minmax"
    )
    parser.add_argument(
        "--red-team-score-range",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        default=None,
        help="declared range of the minmax normalisation (default: the file's own)",
    )
    parser.add_argument(
        "--qa-mode",
        choices=list(QA_MODES),
        default="win_rate",
        help="qa-feedback: win-rate rows, or pairs for dpo/ipo",
    )


def _score_range(args: argparse.Namespace) -> list[float] | None:
    """``--red-team-score-range``, checked as ``data.red_team_score_range`` is."""
    from megatron_pwdpo.config import ConfigError
    from megatron_pwdpo.config.validation import score_range_problem

    value = args.red_team_score_range
    problem = score_range_problem(
        value,
        source=args.source,
        score=args.red_team_score,
        normalisation=args.red_team_normalisation,
    )
    if problem is not None:
        raise ConfigError(f"--red-team-score-range: {problem}")
    return None if value is None else list(value)


def _load(args: argparse.Namespace, path: str):
    from megatron_pwdpo.data.loading import detect_source, load_source_rows

    if args.source == "auto":
        args.source = detect_source(path, split=args.split)

    return load_source_rows(
        path,
        source=args.source,
        hh_mode=args.hh_mode,
        demo_chosen=args.demo_chosen,
        seed=args.seed,
        red_team_score=args.red_team_score,
        red_team_normalisation=args.red_team_normalisation,
        red_team_score_range=_score_range(args),
        qa_mode=args.qa_mode,
        split=args.split,
    )


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from megatron_pwdpo.data.schema import DataError, write_jsonl

    start = time.perf_counter()
    rows = _load(args, args.input)
    if args.out.endswith(JSONL_SUFFIXES):
        write_jsonl(rows, args.out)
        print(f"wrote {len(rows)} canonical rows to {args.out}")
        return 0
    if args.tokenizer is None:
        raise DataError("--tokenizer is needed to write tokenised data", path=args.out)
    from megatron_pwdpo.data.hf_tokenizer import load_tokenizer
    from megatron_pwdpo.data.indexed import fingerprint_for, write_indexed
    from megatron_pwdpo.data.loading import label_histogram, prompt_groups
    from megatron_pwdpo.data.tokenize import tokenize_rows

    tokenizer = load_tokenizer(args.tokenizer, kind=args.tokenizer_type)
    tokenized, stats = tokenize_rows(rows, tokenizer, seq_length=args.seq_length)
    meta = write_indexed(
        args.out,
        tokenized,
        stats,
        groups=prompt_groups(rows),
        fingerprint=fingerprint_for(tokenizer, seq_length=args.seq_length),
        extra={
            "source": args.source,
            "input": str(args.input),
            "tokenizer": str(args.tokenizer),
            "seq_length": args.seq_length,
        },
    )
    print(f"labels {label_histogram([r.label for r in tokenized])}")
    print(stats.summary())
    elapsed = time.perf_counter() - start
    print(
        f"wrote {len(tokenized)} rows to {args.out}.bin/.idx.npz/.json ({meta}) in {elapsed:.1f}s"
    )
    return 0


def _widen_tokenizer_sources(subparsers: argparse._SubParsersAction) -> None:
    """Let ``tokenizer train --source`` take every source (it loads via `load_source_rows`)."""
    tokenizer = subparsers.choices.get("tokenizer")
    for action in tokenizer._actions if tokenizer is not None else []:
        if isinstance(action, argparse._SubParsersAction) and "train" in action.choices:
            for option in action.choices["train"]._actions:
                if option.dest == "source":
                    option.choices = list(SOURCES)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``preprocess`` to the ``megatron-pwdpo`` command line."""
    pre = subparsers.add_parser(
        "preprocess",
        help="convert a data set to canonical rows, or tokenise it once (memory-mapped)",
        description=__doc__.split("\n")[0].replace("``", ""),
    )
    _add_source_options(pre)
    pre.add_argument("--input", required=True, help="file, datasets folder or hf:OWNER/NAME")
    pre.add_argument("--out", required=True, help="rows.jsonl(.gz), or a prefix for tokens")
    pre.add_argument("--tokenizer", default=None, help="sentencepiece .model or HF folder")
    pre.add_argument("--tokenizer-type", choices=["sentencepiece", "hf"], default="sentencepiece")
    pre.add_argument("--seq-length", type=int, default=256)
    pre.set_defaults(func=_cmd_preprocess)
    _widen_tokenizer_sources(subparsers)
