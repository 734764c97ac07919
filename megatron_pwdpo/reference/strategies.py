"""The frozen reference model pi_ref of the implicit reward ``beta log pi/pi_ref``.

Every strategy answers one question, :meth:`Reference.logps`: the per-row reference
log-probs ``[b]`` of each micro-batch, on the last pipeline stage (where the loss is
computed; the other stages get ``[]``). ``reference.mode`` picks the strategy:

* ``resident``: a frozen copy built by the same builder with the policy's TP/PP
  layout; no optimizer, no gradients, run forward-only through Megatron's schedule,
  so under pipeline parallelism its log-probs reach the last stage with the batch.
* ``offload``: no second model. The reference weights live in host memory; for each
  reference pass (one per global batch) the policy's weights are copied to a host
  stash, the reference weights are copied into the *same* parameters, the policy
  chunks run forward-only, and the stash is copied back: the policy's weights come
  back bit for bit and its gradients and optimizer state are never touched. Costs two
  host copies of this rank's shard of the model, and four copies per pass.
* ``cache``: no model at all. ``megatron-pwdpo precompute-ref`` ran the reference once
  over the train and eval rows and wrote per-row log-probs keyed by row id (see
  :mod:`megatron_pwdpo.reference.cache` for the file and what it is checked against
  before use).
* ``none``: SFT (no reference).

ULMA trains demonstrations (label 1, ``kind: demo``) with the SFT term alone, so their
reference log-probs are never needed: given the rows of the micro-batches (``rows=``),
a strategy runs only the other rows, re-batched, and returns NaN for the
demonstrations (``losses.ulma_loss`` ignores them); :func:`skipped_rows` counts them.

A resumed stage compares against the same reference: resident and offload references
that exist only in this run (the SFT stage's result, a fresh initialisation) are saved
as ``checkpoints/reference`` when the preference stage starts; one that a checkpoint
already holds (``reference.checkpoint``, or ``train.init_checkpoint`` without an SFT
stage) is not copied (141 GB at 70B) but recorded, resolved to its ``iter_N``, in
``checkpoints/reference.json``, and read from there again.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch

from megatron_pwdpo.config import RunConfig, dump_yaml
from megatron_pwdpo.data.tokenize import TokenizedRow
from megatron_pwdpo.engine import checkpoint
from megatron_pwdpo.engine.step import Batch, run_logps
from megatron_pwdpo.platform import decisions as platform
from megatron_pwdpo.reference.cache import needs_reference

log = logging.getLogger(__name__)

Rebatch = Callable[[list[TokenizedRow]], list[Batch]]


class Reference(Protocol):
    """What the training loop asks of a reference (any ``reference.mode``)."""

    def logps(
        self, micro_batches: list[Batch], *, reduction: str, rows: dict | None = None
    ) -> list[torch.Tensor]:
        """Per-row reference log-probs ``[b]`` of each micro-batch on the last pipeline
        stage (``[]`` on the others). With ``rows`` (row index -> row, ULMA), rows that
        are demonstrations are not run and get NaN."""
        ...


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside a DDP (or other ``.module``) wrapper."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


class _Strategy:
    """The part every strategy shares: ULMA's demonstration skipping.

    Args:
        rebatch: rows -> micro-batches (no data-parallel split), as the loop makes them.
        is_last_stage: whether this rank holds the last pipeline stage.
    """

    def __init__(self, *, rebatch: Rebatch, is_last_stage: bool):
        self.rebatch, self.is_last_stage = rebatch, is_last_stage

    def _run(self, micro_batches: list[Batch], *, reduction: str) -> list[torch.Tensor]:
        raise NotImplementedError

    def logps(
        self, micro_batches: list[Batch], *, reduction: str, rows: dict | None = None
    ) -> list[torch.Tensor]:
        if rows is None:
            return self._run(micro_batches, reduction=reduction)
        # the rows of each micro-batch, in the order of its per-row log-probs
        batch_rows = [[rows[i] for i in b["row_index"].tolist()] for b in micro_batches]
        kept = [r for r in _flatten(batch_rows) if needs_reference(r)]
        flat = self._run(self.rebatch(kept), reduction=reduction) if kept else []
        if not self.is_last_stage:
            return []
        values = torch.cat(flat).float() if flat else torch.empty(0, device=_device())
        # scatter the kept rows' values back in one index op; the positions are known on
        # the host, so nothing waits for the device here
        kept_at = torch.tensor(
            [k for k, r in enumerate(_flatten(batch_rows)) if needs_reference(r)],
            dtype=torch.long,
        )
        ref = torch.full((sum(map(len, batch_rows)),), float("nan"), device=values.device)
        ref[kept_at.to(values.device, non_blocking=True)] = values
        return list(ref.split([len(rs) for rs in batch_rows]))


def _flatten(nested: list[list]) -> list:
    return [x for xs in nested for x in xs]


class ResidentReference(_Strategy):
    """A frozen, forward-only copy of the policy (same layout, same rank shards).

    Args:
        chunks: model chunks built like the policy's, holding the reference weights.
        forward_backward_func: Megatron's schedule (the policy's).
        seq_length: the run's ``data.seq_length``.
    """

    def __init__(self, chunks, *, forward_backward_func, seq_length: int, **kwargs):
        super().__init__(**kwargs)
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        self.chunks, self.fb, self.seq_length = chunks, forward_backward_func, seq_length

    def _run(self, micro_batches, *, reduction):
        return run_logps(
            self.fb, self.chunks, micro_batches, reduction=reduction, seq_length=self.seq_length
        )


def _host_like(t: torch.Tensor) -> torch.Tensor:
    """An empty host tensor for ``t`` (pinned when there is a GPU: faster copies)."""
    pin = platform.detect().cuda  # pinned host memory needs a CUDA device
    return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)


class OffloadReference(_Strategy):
    """Reference weights in host memory, swapped into the policy for each pass.

    Built from the policy's current weights (the usual start of a preference stage);
    :meth:`load` replaces them with a checkpoint's.

    Args:
        policy: the policy's model chunks (DDP-wrapped or not).
        forward_backward_func: Megatron's schedule (the policy's).
        seq_length: the run's ``data.seq_length``.
    """

    def __init__(self, policy, *, forward_backward_func, seq_length: int, **kwargs):
        super().__init__(**kwargs)
        self.policy, self.fb, self.seq_length = policy, forward_backward_func, seq_length
        # every parameter once (tied weights are shared), in a fixed order
        self.params = [p for chunk in policy for p in unwrap(chunk).parameters()]
        self.host = [_host_like(p) for p in self.params]  # the reference weights
        self.stash = [_host_like(p) for p in self.params]  # the policy's, during a pass
        self._copy(self.host, self.params)

    @staticmethod
    def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for d, s in zip(dst, src, strict=True):
                d.data.copy_(s.data, non_blocking=False)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the policy's parameters hold the reference weights; after it,
        exactly the policy's own again (bitwise), whatever happened inside."""
        modes = [c.training for c in self.policy]
        self._copy(self.stash, self.params)
        try:
            self._copy(self.params, self.host)
            for chunk in self.policy:
                chunk.eval()
            yield
        finally:
            self._copy(self.params, self.stash)
            for chunk, mode in zip(self.policy, modes, strict=True):
                chunk.train(mode)

    def load(self, path: str | Path) -> None:
        """Take the reference weights from a checkpoint (any layout), loaded through the
        policy's own parameters so that no second model is ever built."""
        self._copy(self.stash, self.params)
        try:
            checkpoint.load_checkpoint(self.policy, path)
            self._copy(self.host, self.params)
        finally:
            self._copy(self.params, self.stash)

    def _run(self, micro_batches, *, reduction):
        if not micro_batches:
            return []
        with self.swapped_in():
            return run_logps(
                self.fb, self.policy, micro_batches, reduction=reduction, seq_length=self.seq_length
            )


class CacheReference(_Strategy):
    """Per-row reference log-probs read from a precomputed cache; no model.

    Args:
        table: ``[max row_index + 1]`` float32 log-probs by row index (NaN = not needed).
    """

    def __init__(self, table: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.table = table.to(_device())

    def _run(self, micro_batches, *, reduction):
        if not self.is_last_stage:
            return []
        return [self.table[b["row_index"].to(self.table.device)] for b in micro_batches]


def _device() -> torch.device:
    from megatron_pwdpo.platform.distributed import device

    return device()


# --------------------------------------------------------------------------- building


def build_reference(
    config: RunConfig,
    *,
    policy: list[torch.nn.Module],
    data,
    ckpt_root: Path,
    resumed: bool,
    forward_backward_func,
    is_last_stage: bool,
    info: Callable[[str], None] = log.info,
) -> Reference | None:
    """The reference of a preference stage that starts now (or resumes: ``resumed``).

    A new ``resident`` or ``offload`` reference is the policy as it is now (the SFT
    result, or the initial checkpoint), or ``reference.checkpoint`` if set, and is saved
    as ``ckpt_root/reference``; a resumed one is loaded from there. A ``cache`` is
    checked against this run (see :func:`load_cache_table`).
    """
    from megatron_pwdpo.engine.batches import packing_options, rank_micro_batches
    from megatron_pwdpo.reference.cache import load_cache_table

    mode = config.reference.mode
    if mode == "none":
        return None
    d = config.data

    def rebatch(rows: list[TokenizedRow]) -> list[Batch]:
        return rank_micro_batches(
            rows,
            dp_rank=0,
            dp_size=1,
            micro_batch_size=config.train.micro_batch_size,
            pad_id=data.tokenizer.pad_id,
            **packing_options(config),
        )

    common = {"rebatch": rebatch, "is_last_stage": is_last_stage}
    if mode == "cache":
        table = load_cache_table(
            config.reference.cache_path, config, data.train + data.eval, data.tokenizer
        )
        rows = int(table.isfinite().sum())
        info(f"reference: {rows} rows' log-probs from {config.reference.cache_path}")
        return CacheReference(table, **common)
    external = None if resumed else external_reference(config)
    if resumed:
        source = recorded_reference(ckpt_root)
    else:
        source = external
        if torch.distributed.get_rank() == 0:  # no copy: a resumed run reads it again
            _record_reference(ckpt_root, external)
    run = {"forward_backward_func": forward_backward_func, "seq_length": d.seq_length, **common}
    info(f"reference: {mode}, from {source or 'the policy'}")
    if mode == "offload":
        ref = OffloadReference(policy, **run)
        if source is not None:
            ref.load(source)
        if not resumed and external is None:
            with ref.swapped_in():
                _save(policy, ckpt_root, config)
        return ref
    from megatron_pwdpo.engine.setup import build_chunks

    chunks = build_chunks(config, wrap_ddp=False)
    if source is not None:
        checkpoint.load_checkpoint(chunks, source)
    else:
        for chunk, pol in zip(chunks, policy, strict=True):
            chunk.load_state_dict(unwrap(pol).state_dict(), strict=True)
    if not resumed and external is None:
        _save(chunks, ckpt_root, config)
    return ResidentReference(chunks, **run)


REFERENCE_RECORD = "reference.json"


def external_reference(config: RunConfig) -> Path | None:
    """The checkpoint folder (``iter_N``, resolved now) that already holds the main
    stage's reference, or None when the reference exists only in this run (the SFT
    stage's result, or a fresh initialisation) and must be saved as
    ``checkpoints/reference``: ``reference.checkpoint`` if set, else
    ``train.init_checkpoint`` when no SFT stage comes first."""
    if config.reference.checkpoint:
        return checkpoint.resolve_checkpoint(config.reference.checkpoint).resolve()
    if config.train.init_checkpoint and config.train.sft_steps == 0:
        return checkpoint.resolve_checkpoint(config.train.init_checkpoint).resolve()
    return None


def _record_reference(ckpt_root: Path, source: Path | None) -> None:
    """Record ``source`` (None: the reference is this run's copy; drop any record)."""
    if source is None:
        (ckpt_root / REFERENCE_RECORD).unlink(missing_ok=True)
        return
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f"{REFERENCE_RECORD}.tmp"
    tmp.write_text(json.dumps({"checkpoint": str(source)}) + "\n")
    tmp.replace(ckpt_root / REFERENCE_RECORD)


def recorded_reference(ckpt_root: Path) -> Path:
    """Where a resumed stage reads its reference: the checkpoint recorded when the stage
    started (the exact ``iter_N``, even if a ``latest.txt`` there has moved on since),
    else this run's copy, ``checkpoints/reference``.

    Raises:
        FileNotFoundError: the recorded checkpoint is gone.
    """
    record = ckpt_root / REFERENCE_RECORD
    if not record.exists():
        return ckpt_root / "reference"
    source = Path(json.loads(record.read_text())["checkpoint"])
    if not (source / "metadata.json").exists():
        raise FileNotFoundError(
            f"{record}: the reference this run started with, {source}, is gone; restore it "
            "to resume (the run compares against it)"
        )
    return source


def _save(chunks, ckpt_root: Path, config: RunConfig) -> None:
    checkpoint.save_checkpoint(
        chunks, ckpt_root, name="reference", common={"config": dump_yaml(config)}
    )
