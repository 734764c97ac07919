"""The reference cache file of ``reference.mode=cache``, and the checks that refuse a
stale or incomplete one.

``megatron-pwdpo precompute-ref`` (:mod:`megatron_pwdpo.reference.cli`, whose docstring
lists the file's arrays) runs the reference once over a run's rows and writes one
``.npz`` of per-row log-probs keyed by row id. A training run uses it
(:func:`load_cache_table`) only if

* its fingerprint (:func:`cache_fingerprint`) equals the run's: the format
  (``CACHE_FORMAT``), the reference checkpoint's content (:func:`checkpoint_digest`),
  the model section, the tokenizer files, ``data.seq_length`` and
  ``loss.logp_reduction``;
* it holds every row the run needs (:func:`cache_rows`; for ULMA, not the
  demonstrations);
* each of those rows has the tokens it was computed on (:func:`row_digests`).

Otherwise it stops with a ``ConfigError`` that names what differs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_pwdpo.config import ConfigError, RunConfig
from megatron_pwdpo.data.tokenize import TokenizedRow
from megatron_pwdpo.engine import checkpoint

CACHE_FORMAT = "megatron-pwdpo-reference-cache/1"


def needs_reference(row: TokenizedRow) -> bool:
    """False for a demonstration, which ULMA trains with the SFT term only."""
    return not (row.is_demo and row.label == 1.0)


def skipped_rows(examples: Sequence) -> int:
    """Rows of a (global) batch whose reference forward ULMA skips."""
    return sum(not needs_reference(r) for r in examples if isinstance(r, TokenizedRow))


def reference_checkpoint(config: RunConfig) -> Path | None:
    """The checkpoint the reference comes from when no SFT stage makes it:
    ``reference.checkpoint``, else ``train.init_checkpoint`` (resolved to an ``iter_N``)."""
    path = config.reference.checkpoint or config.train.init_checkpoint
    if path is None:
        return None
    try:
        return checkpoint.resolve_checkpoint(path)
    except FileNotFoundError as err:
        raise ConfigError(f"reference checkpoint: {err}") from None


_SMALL_FILE = 4 << 20
_BLOCK, _BLOCKS = 64 << 10, 16


def checkpoint_digest(path: Path) -> str:
    """A sha256 naming a checkpoint folder's content, the same wherever it is copied.

    Over every file (sorted relative path and size): the whole content of files up to
    4 MiB (torch_dist's ``.metadata``, ``metadata.json``, ``common.pt``) and 16 blocks
    of 64 KiB spread evenly over larger ones (first and last included). A retrained or
    different checkpoint changes every shard, so this tells them apart while reading a
    few MiB of even a 70B model; an edit confined to unsampled bytes of a large shard
    would go unnoticed.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path).as_posix()}\0{size}\0".encode())
        with open(file, "rb") as f:
            if size <= _SMALL_FILE:
                digest.update(f.read())
                continue
            for offset in np.linspace(0, size - _BLOCK, _BLOCKS).astype(np.int64):
                f.seek(int(offset))
                digest.update(f.read(_BLOCK))
    return digest.hexdigest()


def row_digests(rows: Sequence[TokenizedRow]) -> np.ndarray:
    """``[n]`` uint64 digest of each row's tokens and prompt length: a cached value is
    only used for the exact tokens it was computed on."""
    out = np.empty(len(rows), dtype=np.uint64)
    for i, row in enumerate(rows):
        h = hashlib.blake2b(int(row.prompt_len).to_bytes(8, "little"), digest_size=8)
        h.update(np.ascontiguousarray(row.input_ids, dtype=np.int64).tobytes())
        out[i] = int.from_bytes(h.digest(), "little")
    return out


def cache_fingerprint(config: RunConfig, tokenizer) -> dict[str, Any]:
    """What a cache's log-probs depend on besides each row's tokens: the reference's
    checkpoint (:func:`checkpoint_digest`), the model section that reads it (less
    ``model.attention``, which kernel computes the same attention), the tokenizer files,
    ``data.seq_length``, ``loss.logp_reduction`` and the precision the reference runs in
    (:func:`megatron_pwdpo.model.precision.reference_numerics`)."""
    from megatron_pwdpo.data.hf_tokenizer import tokenizer_fingerprint
    from megatron_pwdpo.model.precision import reference_numerics

    ckpt = reference_checkpoint(config)
    if ckpt is None:
        raise ConfigError(
            "reference.mode=cache needs the reference's checkpoint: set reference.checkpoint "
            "or train.init_checkpoint (a random initialisation depends on the layout)"
        )
    return {
        "format": CACHE_FORMAT,
        "reference_checkpoint": checkpoint_digest(ckpt),
        # model.attention picks a kernel for the same function: not what the log-probs mean
        "model": {k: v for k, v in asdict(config.model).items() if k != "attention"},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seq_length": config.data.seq_length,
        "logp_reduction": config.loss.logp_reduction,
        "reference_precision": reference_numerics(config.precision),
    }


def cache_rows(rows: Sequence[TokenizedRow], *, loss_name: str) -> list[TokenizedRow]:
    """The rows whose reference log-probs a run needs (ULMA: not the demonstrations)."""
    return [r for r in rows if loss_name != "ulma" or needs_reference(r)]


def read_cache(path: str | Path) -> dict[str, Any]:
    """The arrays of a cache file (npz, read without pickle) and its fingerprint."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in ("ids", "logps", "digests", "fingerprint", "source")}
        data["fingerprint"] = json.loads(str(data["fingerprint"]))
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(
            f"reference.cache_path: {path} is not a reference cache ({err}); "
            "write one with megatron-pwdpo precompute-ref"
        ) from None
    return data


def cache_logps_by_id(path: str | Path) -> dict[str, float]:
    """A cache as ``{row id: reference log-prob}``, for inspection; unchecked (training
    and ``megatron_lm.reference_logps`` go through :func:`load_cache_table`)."""
    cache = read_cache(path)
    return dict(zip(cache["ids"].tolist(), cache["logps"].tolist(), strict=True))


def load_cache_table(path: str | Path, config: RunConfig, rows, tokenizer) -> torch.Tensor:
    """Check a cache against this run and return its log-probs by row index.

    Raises:
        ConfigError: the cache was computed for another reference checkpoint, model,
            tokenizer, sequence length or reduction (its fingerprint differs), or it
            lacks rows this run needs, or holds other tokens for them.
    """
    cache = read_cache(path)
    want, have = cache_fingerprint(config, tokenizer), cache["fingerprint"]
    for key in want:
        if have.get(key) != want[key]:
            raise ConfigError(
                f"reference cache {path} is stale: its {key} is {_short(have.get(key))}, this "
                f"run's is {_short(want[key])} (computed from {cache['source']}); run "
                "megatron-pwdpo precompute-ref again"
            )
    needed = cache_rows(rows, loss_name=config.loss.name)
    where = {str(i): k for k, i in enumerate(cache["ids"].tolist())}
    missing = [r.id for r in needed if r.id not in where]
    if missing:
        raise ConfigError(
            f"reference cache {path} lacks {len(missing)} of the {len(needed)} rows this run "
            f"needs (e.g. '{missing[0]}'); precompute it over this run's data"
        )
    at = np.array([where[r.id] for r in needed], dtype=np.int64)
    changed = np.flatnonzero(cache["digests"][at] != row_digests(needed))
    if changed.size:
        raise ConfigError(
            f"reference cache {path} is stale: {changed.size} rows have other tokens than "
            f"when it was computed (e.g. '{needed[changed[0]].id}'); run precompute-ref again"
        )
    table = torch.full((max(r.row_index for r in rows) + 1,), float("nan"))
    index = torch.tensor([r.row_index for r in needed], dtype=torch.int64)
    table[index] = torch.from_numpy(cache["logps"][at].astype(np.float32))
    return table


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."
