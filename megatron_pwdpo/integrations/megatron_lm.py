"""The pieces a Megatron-LM training script passes to ``pretrain()``.

Megatron-LM's loop (``megatron.training.pretrain``) builds the model, the optimizer,
the data loaders and the schedule itself; it needs three callables from the user:

* ``model_provider(pre_process, post_process, vp_stage=None, config=None,
  pg_collection=None)`` -> our Llama-style GPTModel (:func:`model_provider`; Megatron-LM
  0.16 passes its own ``TransformerConfig`` and process groups, older releases neither);
* ``forward_step(data_iterator, model)`` -> ``(output, loss_func)``: exactly
  :func:`megatron_pwdpo.engine.step.forward_step`, bound to a loss (:func:`make_forward_step`);
* ``train_valid_test_datasets_provider(num_samples)`` -> map-style datasets whose items
  are one row each (:class:`PointwiseRowDataset`; :func:`prepare` then :func:`build_datasets`);
  Megatron-LM's sampler and default collate stack them into micro-batches. Item ``i`` of
  the training set is position ``i`` of ``megatron-pwdpo train``'s sample stream
  (``GlobalBatchSampler``: a new permutation each epoch, class balancing if configured),
  and the set is ``num_samples`` long, so Megatron-LM's sequential sampler, which takes
  global batch ``k`` from items ``[k G, (k + 1) G)``, trains on the same global batches as
  ``megatron-pwdpo train`` for as many steps as ``--train-iters`` asks, and resumes from
  its consumed-sample count.

Megatron-LM's loop has no reference-model hook, so preference losses (but KTO, below)
read the reference log-probs that ``megatron-pwdpo precompute-ref`` wrote (its ``.npz`` cache),
checked against the run like ``reference.mode=cache`` checks it
(:func:`reference_logps`: fingerprint, every needed row, each row's tokens). Each row
weighs ``1 / global_batch_size`` (the plain global mean); the reports are
``(sum, count)`` pairs, which Megatron-LM's loop already sums over micro-batches and
data-parallel ranks before dividing.

A run trains one stage of ``megatron-pwdpo train``'s plan (:func:`select_stage`, from
``training.plan.plan_stages``): the main stage, or with ``stage="sft"`` the SFT stage of a
preference YAML (``train.sft_steps > 0``); a stage has the same rows and the same loss
(SFT: demonstrations, token-mean log-probs) as there. The YAML is the single source of
truth: :mod:`~megatron_pwdpo.integrations.megatron_lm_args` gives the Megatron-LM
arguments it implies and names every flag that differs.

Pair-wise losses (``dpo``, ``ipo``) train on chosen/rejected pairs, as there; an item
is still one row, so Megatron-LM counts rows: its micro-batch and global batch sizes are
twice the YAML's (which count pairs, ``megatron_lm_args.megatron_args``), and the items of each
micro-batch are its pairs' chosen rows, then their rejected rows, the stacking
``step._split_pairs`` undoes (:func:`pairwise_item`). The loss weight of a pair is
``1 / global_batch_size`` (pairs), on the chosen row's item (:func:`pair_weights`
drops the rejected half in the forward step).

KTO needs a reference on each step's mismatched rows, which no cache holds: its items
carry their mismatched row, and ``megatron_lm_kto.KtoForwardStep`` runs a resident
reference (``reference.checkpoint``, else ``train.init_checkpoint``) and the KL point in
the forward step, on one pipeline stage.

What this path supports, and the one-line refusals of the rest, are
:func:`megatron_pwdpo.integrations.megatron_lm_args.unsupported`'s. See
``examples/megatron_lm/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import torch

from megatron_pwdpo.config import ConfigError, LossConfig, RunConfig
from megatron_pwdpo.data.sampler import GlobalBatchSampler
from megatron_pwdpo.data.tokenize import TokenizedRow, collate
from megatron_pwdpo.engine.batches import pair_up
from megatron_pwdpo.engine.step import forward_step, make_objective, megatron_grad_scale
from megatron_pwdpo.integrations.megatron_lm_args import (
    CACHED,
    PAIRWISE,
    SUPPORTED_LOSSES,
    check_supported,
)
from megatron_pwdpo.training.plan import Stage, plan_stages


def reference_logps(
    config: RunConfig,
    rows: Sequence[TokenizedRow],
    tokenizer,
    *,
    ref_cache: str | Path | None = None,
) -> dict[str, float] | None:
    """``{row id: reference log-prob}`` of the rows that need one, from the ``.npz`` of
    ``megatron-pwdpo precompute-ref`` (``ref_cache``, else ``reference.cache_path``);
    None for SFT.

    The cache is checked as ``reference.mode=cache`` checks it
    (:func:`megatron_pwdpo.reference.cache.load_cache_table`): its fingerprint
    (reference checkpoint, model section, tokenizer, ``data.seq_length``,
    ``loss.logp_reduction``) must be this run's, it must hold every row that needs a
    reference (ULMA: all but the demonstrations), each with the same tokens.

    Args:
        rows: every row the run reads (train and eval).

    Raises:
        ConfigError: no cache named, or it is not a cache, stale or incomplete (the
            message names the file and, for a missing row, that row).
    """
    from megatron_pwdpo.reference.cache import cache_rows, load_cache_table

    if config.loss.name == "sft":
        return None
    path = ref_cache or config.reference.cache_path
    if path is None:
        raise ConfigError(
            f"loss.name={config.loss.name} needs a reference cache: pass --pwdpo-ref-cache "
            "FILE.npz (written by megatron-pwdpo precompute-ref)"
        )
    table = load_cache_table(path, config, rows, tokenizer)
    return {r.id: float(table[r.row_index]) for r in cache_rows(rows, loss_name=config.loss.name)}


def pairwise_item(index: int, micro_batch_size: int) -> tuple[int, int]:
    """Which pair and which of its rows item ``index`` of a pair-wise dataset is:
    ``(position in the pair stream, 0 chosen / 1 rejected)``.

    Megatron-LM's samplers cut the items into micro-batches of ``2 * micro_batch_size``
    consecutive items, aligned at multiples of it; micro-batch ``j`` holds pairs
    ``[j m, (j + 1) m)`` of the stream (``m = micro_batch_size``), chosen rows first::

        items of micro-batch j:  c(jm) .. c(jm + m - 1)  r(jm) .. r(jm + m - 1)
    """
    block, offset = divmod(index, 2 * micro_batch_size)
    side, within = divmod(offset, micro_batch_size)
    return block * micro_batch_size + within, side


class PointwiseRowDataset(torch.utils.data.Dataset):
    """Tokenised rows as fixed-width items for Megatron-LM's data loader.

    Args:
        rows: the examples: tokenised rows, or ``(chosen, rejected)`` pairs (``dpo``,
            ``ipo``), whose items are their rows (:func:`pairwise_item`).
        seq_length: width every item is padded to.
        pad_id: padding token.
        global_batch_size: examples (rows or pairs) per optimizer step (each
            example's loss weight is its inverse; a pair's is on its chosen row's item,
            0 on the rejected one's).
        ref_logps: reference log-prob per row id (:func:`reference_logps`); None for SFT.
        loss_name: the loss. With ``ulma``, demonstrations need no reference: theirs is
            NaN, unused (as in ``megatron-pwdpo train``); with any other loss (or None)
            every row needs one when ``ref_logps`` is given.
        order: the example stream: example ``i`` is ``order.stream(i, 1)``; None = the
            examples in file order, once.
        num_samples: items (``order`` repeats the examples epoch after epoch); None = one
            epoch of ``order`` (``len(rows)`` without it; twice that for pairs).
        micro_batch_size: pairs per micro-batch (pair-wise only; Megatron-LM's
            ``--micro-batch-size`` is twice it).
        mismatched: each item also carries its mismatched row (KTO's KL point: the
            prompt of stream position ``i`` with the response of the next position of
            its global batch, cyclically; ``megatron_lm_kto.mismatched_item``); the
            reference log-probs then come from the forward step, not ``ref_logps``.

    Raises:
        KeyError: a row that needs a reference log-prob has none (names the row).
        ValueError: a preference loss without ``ref_logps``; pairs without
            ``micro_batch_size``.
    """

    def __init__(
        self,
        rows: Sequence[TokenizedRow] | Sequence[tuple[TokenizedRow, TokenizedRow]],
        *,
        seq_length: int,
        pad_id: int,
        global_batch_size: int,
        ref_logps: Mapping[str, float] | None = None,
        loss_name: str | None = None,
        order: GlobalBatchSampler | None = None,
        num_samples: int | None = None,
        micro_batch_size: int | None = None,
        mismatched: bool = False,
    ):
        from megatron_pwdpo.reference.cache import needs_reference

        self.pairs = bool(rows) and isinstance(rows[0], tuple)
        if self.pairs and micro_batch_size is None:
            raise ValueError("chosen/rejected pairs need micro_batch_size (pairs per micro-batch)")
        flat = [r for pair in rows for r in pair] if self.pairs else list(rows)

        def needs(row: TokenizedRow) -> bool:
            return loss_name != "ulma" or needs_reference(row)

        needs_refs = loss_name not in (None, "sft") and not mismatched
        if ref_logps is None and needs_refs and any(map(needs, flat)):
            raise ValueError(f"loss.name={loss_name} needs ref_logps (the reference cache)")
        missing = (
            [] if ref_logps is None else [r.id for r in flat if needs(r) and r.id not in ref_logps]
        )
        if missing:
            raise KeyError(f"no reference log-prob for {len(missing)} rows, e.g. {missing[0]}")
        per_example = 2 if self.pairs else 1
        epoch = per_example * (len(rows) if order is None else order.epoch_length)
        if order is None and num_samples is not None and num_samples > epoch:
            raise ValueError(f"num_samples={num_samples} > {epoch} items needs an order")
        self.rows, self.seq_length, self.pad_id = rows, seq_length, pad_id
        self.weight = 1.0 / global_batch_size
        self.ref_logps = ref_logps
        self.order = order
        self.micro_batch_size = micro_batch_size
        self.mismatched, self.global_batch_size = mismatched, global_batch_size
        self.length = epoch if num_samples is None else num_samples

    def __len__(self) -> int:
        return self.length

    def _example(self, position: int):
        return self.rows[position if self.order is None else int(self.order.stream(position, 1)[0])]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"item {index} of {self.length}")
        weight = self.weight
        if self.pairs:
            position, side = pairwise_item(index, self.micro_batch_size)
            row = self._example(position)[side]
            weight = 0.0 if side else weight
        else:
            row = self._example(index)
        item = {
            k: v[0]
            for k, v in collate([row], seq_length=self.seq_length, pad_id=self.pad_id).items()
        }
        item["weight"] = torch.tensor(weight)
        if self.mismatched:
            from megatron_pwdpo.integrations.megatron_lm_kto import mismatched_item

            batch, k = divmod(index, self.global_batch_size)
            neighbour = self._example(
                batch * self.global_batch_size + (k + 1) % self.global_batch_size
            )
            item.update(
                mismatched_item(row, neighbour, seq_length=self.seq_length, pad_id=self.pad_id)
            )
        if self.ref_logps is not None:
            ref = self.ref_logps.get(row.id, float("nan"))  # NaN: a ULMA demonstration
            item["ref_logps"] = torch.tensor(ref, dtype=torch.float32)
        return item


def pair_weights(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A pair-wise micro-batch of items (chosen rows, then rejected rows) with one loss
    weight per pair (its chosen row's), as ``batches.rank_micro_batches`` makes it."""
    half = batch["weight"].shape[0] // 2
    return {**batch, "weight": batch["weight"][:half]}


def select_stage(config: RunConfig, data, stage: str = "main") -> Stage:
    """The stage of ``megatron-pwdpo train``'s plan a ``pretrain()`` run trains: its
    rows, held-out rows, loss (SFT: token-mean log-probs), steps and learning rate.

    Args:
        stage: ``main`` (the last stage of the plan) or ``sft`` (the first).
    """
    stages = plan_stages(config, data)
    return stages[0] if stage == "sft" else stages[-1]


def prepare(config: RunConfig, *, ref_cache: str | Path | None = None, stage: str = "main"):
    """Everything a run checks before Megatron-LM builds a model: ``megatron_lm_args.unsupported``,
    the data (``prepare_data``), the stage (:func:`select_stage`) and the reference
    cache (:func:`reference_logps`).

    Returns:
        ``(data, ref_logps, stage)`` for :func:`build_datasets`.

    Raises:
        ConfigError: what ``megatron_lm_args.unsupported`` names, or a bad cache.
        DataError: bad data.
    """
    from megatron_pwdpo.data.prepare import prepare_data

    check_supported(config, ref_cache=ref_cache, stage=stage)
    data = prepare_data(config.data, vocab_size=config.model.vocab_size)
    chosen = select_stage(config, data, stage)
    ref = None
    if chosen.loss.name in CACHED:  # KTO's reference runs in its forward step
        rows = data.train + data.eval
        ref = reference_logps(config, rows, data.tokenizer, ref_cache=ref_cache)
    return data, ref, chosen


def build_datasets(
    config: RunConfig,
    data,
    ref_logps: Mapping[str, float] | None,
    *,
    global_batch_size: int,
    num_samples: Sequence[int] | None = None,
    stage: Stage | None = None,
) -> tuple[PointwiseRowDataset, PointwiseRowDataset]:
    """The train and validation datasets of :func:`prepare`'s ``(data, ref_logps, stage)``.

    Args:
        global_batch_size: examples (rows, or pairs for ``dpo``/``ipo``) per step:
            ``train.global_batch_size``.
        num_samples: Megatron-LM's ``train_val_test_num_samples`` (``[train, valid,
            ...]``, in items: rows); the training set then holds that many items of
            ``megatron-pwdpo train``'s sample stream of the stage (``train.seed``;
            ``data.balance_classes``), the validation set cycles through the held-out
            examples in order. None: one epoch each.
        stage: the stage (:func:`select_stage`); None = the main stage's rows
            (``data.train``, ``data.eval``) and ``loss.name``.
    """
    train_rows = data.train if stage is None else stage.examples
    eval_rows = data.eval if stage is None else stage.eval_examples
    loss_name = config.loss.name if stage is None else stage.loss.name
    pairs = isinstance(train_rows[0], tuple)
    if stage is None and loss_name in PAIRWISE:
        train_rows, eval_rows, pairs = pair_up(train_rows), pair_up(eval_rows), True

    def dataset(rows, order, length) -> PointwiseRowDataset:
        return PointwiseRowDataset(
            rows,
            seq_length=config.data.seq_length,
            pad_id=data.tokenizer.pad_id,
            global_batch_size=global_batch_size,
            ref_logps=ref_logps,
            loss_name=loss_name,
            order=order,
            num_samples=length,
            micro_batch_size=config.train.micro_batch_size if pairs else None,
            mismatched=loss_name == "kto",
        )

    train_samples, valid_samples = (None, None) if num_samples is None else num_samples[:2]
    stream = GlobalBatchSampler(
        len(train_rows),
        global_batch_size=global_batch_size,
        seed=config.train.seed,
        labels=None if pairs else [r.label for r in train_rows],  # as run_stage
        balance=config.data.balance_classes and loss_name != "sft",
    )
    cycle = GlobalBatchSampler(len(eval_rows), global_batch_size=1, seed=0, shuffle=False)
    per_example = 2 if pairs else 1
    return (
        dataset(train_rows, stream, train_samples),
        dataset(eval_rows, cycle, max(valid_samples or 0, per_example * len(eval_rows))),
    )


class _Mapped:
    """``next()`` of an iterator-like object (one with only ``__next__``) through ``fn``."""

    def __init__(self, source, fn):
        self.source, self.fn = source, fn

    def __next__(self):
        return self.fn(next(self.source))


def make_forward_step(loss: LossConfig, *, num_microbatches: int, data_parallel_size: int):
    """``forward_step(data_iterator, model)`` for ``pretrain()`` with this loss.

    Raises:
        ConfigError: a loss or normalisation this path does not support (see
            ``megatron_lm_args.unsupported``).
    """
    if loss.name == "kto":
        raise ConfigError(
            "Megatron-LM's pretrain() supports loss.name=kto through "
            "megatron_lm_kto.KtoForwardStep (its reference and KL point run in the step)"
        )
    if loss.name not in SUPPORTED_LOSSES or loss.normalization != "global_mean":
        raise ConfigError(
            f"Megatron-LM's pretrain() supports loss.name in {SUPPORTED_LOSSES} with "
            f"loss.normalization=global_mean, not {loss.name} with {loss.normalization}"
        )
    step = partial(
        forward_step,
        objective=make_objective(loss),
        reduction=loss.logp_reduction,
        grad_scale=megatron_grad_scale(
            num_microbatches=num_microbatches, data_parallel_size=data_parallel_size
        ),
    )
    if loss.name not in PAIRWISE:
        return step

    def pairwise_step(data_iterator, model):
        # Megatron-LM's RerunDataIterator has __next__ but no __iter__ (no map())
        return step(_Mapped(data_iterator, pair_weights), model)

    return pairwise_step


def model_provider(config: RunConfig):
    """``model_provider(pre_process, post_process, vp_stage=None, config=None,
    pg_collection=None)`` for ``pretrain()``.

    Megatron-LM 0.16 passes its ``TransformerConfig`` (built from its flags) as
    ``config`` and its process groups as ``pg_collection``; the model is built from the
    YAML instead (``megatron_lm_args.contradictions`` has refused flags that differ from it) on the
    default groups of ``parallel_state``, which Megatron-LM initialised and which are the
    groups of its default ``pg_collection``. Older releases pass neither.
    """
    from megatron_pwdpo.model.build import build_model

    run = config

    def provide(
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage=None,
        config=None,
        pg_collection=None,
    ):
        del config, pg_collection  # see above
        return build_model(
            run.model,
            run.parallel,
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
            precision=run.precision,
        )

    return provide
