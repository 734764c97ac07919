"""Shared helpers: launching the CLI in 1..4 processes on CPU, reading metrics.jsonl."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from megatron_pwdpo.platform import distributed
from megatron_pwdpo.platform.launch import free_port, python_command, run_group

# A tiny model and run: 2 layers, width 64, on the shipped HH-RLHF slice.
TINY = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.max_seq_length=128",
    "data.seq_length=128",
    "data.eval_rows=16",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.eval_interval=1000",
    "train.progress=false",
]


@contextlib.contextmanager
def world_of_one(*, timeout_s: int = 60):
    """A gloo world of one process with Megatron's parallel state (TP = PP = 1) for an
    in-process test; the environment variables it sets are the caller's again after."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in [
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", str(free_port())),
        ]:
            mp.setenv(key, value)
        distributed.init_distributed(
            tensor_parallel=1, pipeline_parallel=1, virtual_pipeline=None, timeout_s=timeout_s
        )
        try:
            yield
        finally:
            distributed.shutdown()


@pytest.fixture
def te_answers(monkeypatch):
    """What megatron-core asks Transformer Engine while it checks a TransformerConfig
    (``apply_rope_fusion`` needs TE's fused RoPE; version checks), answered as TE 2.8
    would: lets a CPU test build the config a GPU with TE builds. Only the answers to
    those questions are stood in; the config itself is megatron-core's own."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import transformer_config as tc_module

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)
    from packaging.version import Version

    monkeypatch.setattr(
        tc_module, "is_te_min_version", lambda version, **_: Version("2.8") >= Version(version)
    )


def run_cli(
    args: list[str],
    *,
    nproc: int = 1,
    timeout: float = 300,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``megatron-pwdpo ARGS`` in one process, or under torchrun with ``nproc``.

    In its own process group, killed when it ends (``launch.run_group``): an orphaned
    torch_dist writer never outlives the test. Fails the test on a timeout and, with
    ``check``, on a non-zero exit.
    """
    program = ["-m", "megatron_pwdpo.cli", *args]
    return run_python(program, nproc=nproc, timeout=timeout, check=check, env=env)


def run_python(
    program: list[str],
    *,
    nproc: int = 1,
    timeout: float = 300,
    check: bool = True,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess:
    """``python PROGRAM`` (``[script, *args]`` or ``["-m", module, *args]``) as
    :func:`run_cli` runs the CLI, with ``OMP_NUM_THREADS=1``; in ``cwd`` if given."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = python_command(program, nproc=nproc)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = run_group(cmd, stdout=out, stderr=err, env=env, timeout=timeout, cwd=cwd)
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(cmd, code, out.read(), err.read())
    if code is None:
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s:\n{proc.stderr[-6000:]}")
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-6000:]}"
        )
    return proc


def save_initial_weights(model_args: list[str], run_dir: Path) -> Path:
    """Train for 0 steps to save ``model_args``' initial weights (a torch_dist checkpoint).
    Runs that load it (``train.init_checkpoint``) start from the same numbers whatever their
    layout: pipeline stages draw their layers from another point of the RNG stream."""
    run_cli(["train", *model_args, "train.sft_steps=0", "train.steps=0", f"run_dir={run_dir}"])
    return run_dir / "checkpoints"


def write_reference_cache(path: Path, config, rows, tokenizer, logps) -> None:
    """A reference cache as ``precompute-ref`` writes it for ``config``, holding ``rows``
    with the given per-row ``logps`` (so a test knows every value it reads back)."""
    from megatron_pwdpo.reference.cache import cache_fingerprint, row_digests
    from megatron_pwdpo.reference.cli import write_cache

    write_cache(
        path,
        ids=[r.id for r in rows],
        logps=logps,
        digests=row_digests(rows),
        fingerprint=cache_fingerprint(config, tokenizer),
        source="test",
    )


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train_curve(run_dir: Path, stage: str, key: str = "loss") -> list[float]:
    return [
        m[key]
        for m in read_metrics(run_dir)
        if m.get("stage") == stage and m.get("split", "train") == "train"
    ]


def assert_same_curves(
    want_dir: Path,
    got_dir: Path,
    *,
    steps: int,
    stages=("sft", "pointwise_dpo"),
    rtol: float = 2e-5,
    evals: bool = True,
) -> None:
    """Two runs have the same per-step training loss and gradient norm in every stage, and
    the same held-out losses (float32 rounding apart)."""
    for stage in stages:
        for key in ("loss", "grad_norm"):
            want, got = train_curve(want_dir, stage, key), train_curve(got_dir, stage, key)
            assert len(want) == steps, f"{stage}: {len(want)} steps, expected {steps}"
            np.testing.assert_allclose(got, want, rtol=rtol, err_msg=f"{stage} {key}")
    if not evals:
        return
    losses = [
        [m["loss"] for m in read_metrics(d) if m.get("split") == "eval"]
        for d in (want_dir, got_dir)
    ]
    np.testing.assert_allclose(losses[1], losses[0], rtol=rtol)
