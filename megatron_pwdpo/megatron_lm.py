"""The pieces a Megatron-LM training script passes to ``pretrain()``.

Megatron-LM's loop (``megatron.training.pretrain``) builds the model, the optimizer,
the data loaders and the schedule itself; it needs three callables from the user:

* ``model_provider(pre_process, post_process, vp_stage=None)`` -> our Llama-style
  GPTModel (:func:`model_provider`);
* ``forward_step(data_iterator, model)`` -> ``(output, loss_func)``: exactly
  :func:`megatron_pwdpo.step.forward_step`, bound to a loss (:func:`make_forward_step`);
* ``train_valid_test_datasets_provider(num_samples)`` -> map-style datasets whose items
  are one row each (:class:`PointwiseRowDataset`; :func:`prepare` then :func:`build_datasets`);
  Megatron-LM's sampler and default collate stack them into micro-batches. Item ``i`` of
  the training set is position ``i`` of ``megatron-pwdpo train``'s sample stream
  (``GlobalBatchSampler``: a new permutation each epoch, class balancing if configured),
  and the set is ``num_samples`` long, so Megatron-LM's sequential sampler, which takes
  global batch ``k`` from items ``[k G, (k + 1) G)``, trains on the same global batches as
  ``megatron-pwdpo train`` for as many steps as ``--train-iters`` asks, and resumes from
  its consumed-sample count.

Megatron-LM's loop has no reference-model hook, so preference losses read the
reference log-probs that ``megatron-pwdpo precompute-ref`` wrote (its ``.npz`` cache),
checked against the run like ``reference.mode=cache`` checks it
(:func:`reference_logps`: fingerprint, every needed row, each row's tokens). Each row
weighs ``1 / global_batch_size`` (the plain global mean); the reports are
``(sum, count)`` pairs, which Megatron-LM's loop already sums over micro-batches and
data-parallel ranks before dividing.

Supported: ``sft``, ``pointwise_dpo`` and ``ulma`` (whose demonstrations need no
reference: their ``ref_logps`` are NaN, as in ``megatron-pwdpo train``), with
``loss.normalization=global_mean``, no packing and no SFT stage.
:func:`unsupported` names everything else, one line each, before any work is done.
See ``examples/megatron_lm/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import torch

from megatron_pwdpo.config import ConfigError, LossConfig, RunConfig
from megatron_pwdpo.data.sampler import GlobalBatchSampler
from megatron_pwdpo.data.tokenize import TokenizedRow, collate
from megatron_pwdpo.step import forward_step, make_objective, megatron_grad_scale

SUPPORTED_LOSSES = ("sft", "pointwise_dpo", "ulma")

_WHY_NOT = {
    "dpo": "its micro-batches stack each chosen/rejected pair, and Megatron-LM's data "
    "loader stacks single rows",
    "ipo": "its micro-batches stack each chosen/rejected pair, and Megatron-LM's data "
    "loader stacks single rows",
    "kto": "its KL reference point needs the policy and the reference on mismatched "
    "pairs of every global batch, which neither a row dataset nor a precomputed cache has",
}


def unsupported(config: RunConfig, *, ref_cache: str | Path | None = None) -> list[str]:
    """What a run through Megatron-LM's ``pretrain()`` cannot do: one line each (empty
    when it can). Reads only the config, so it runs before any data or model work.

    Args:
        config: the megatron-pwdpo run config.
        ref_cache: the reference cache the run will read (``--pwdpo-ref-cache``), else
            ``reference.cache_path``.
    """
    loss, data = config.loss, config.data
    out = []
    if loss.name not in SUPPORTED_LOSSES:
        out.append(
            f"loss.name={loss.name} is not supported in Megatron-LM's pretrain(): "
            f"{_WHY_NOT.get(loss.name, 'unknown loss')}; train it with megatron-pwdpo train "
            f"(supported here: {', '.join(SUPPORTED_LOSSES)})"
        )
    if loss.normalization != "global_mean":
        out.append(
            f"loss.normalization={loss.normalization} is not supported in Megatron-LM's "
            "pretrain(): a row's weight there is 1 / global batch size, it cannot depend on "
            "the batch's class counts; set loss.normalization=global_mean"
        )
    if loss.name != "sft" and config.train.sft_steps > 0:
        out.append(
            f"train.sft_steps={config.train.sft_steps} is not supported in Megatron-LM's "
            "pretrain(), which runs one loss: run the SFT stage first (loss.name=sft), "
            "precompute the reference from its checkpoint, then set train.sft_steps=0"
        )
    if data.packing != "none":
        out.append(
            f"data.packing={data.packing} is not supported in Megatron-LM's pretrain(): "
            "its items are one row each, padded to data.seq_length; set data.packing=none"
        )
    if (
        loss.name in ("pointwise_dpo", "ulma")
        and (ref_cache or config.reference.cache_path) is None
    ):
        out.append(
            f"loss.name={loss.name} needs the reference log-probs of megatron-pwdpo "
            "precompute-ref: pass --pwdpo-ref-cache FILE.npz (or set reference.cache_path)"
        )
    return out


def check_supported(config: RunConfig, *, ref_cache: str | Path | None = None) -> None:
    """Raise a ``ConfigError`` listing :func:`unsupported`'s lines, if any."""
    problems = unsupported(config, ref_cache=ref_cache)
    if problems:
        raise ConfigError("\n".join(problems))


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
    (:func:`megatron_pwdpo.reference_cache.load_cache_table`): its fingerprint
    (reference checkpoint, model section, tokenizer, ``data.seq_length``,
    ``loss.logp_reduction``) must be this run's, it must hold every row that needs a
    reference (ULMA: all but the demonstrations), each with the same tokens.

    Args:
        rows: every row the run reads (train and eval).

    Raises:
        ConfigError: no cache named, or it is not a cache, stale or incomplete (the
            message names the file and, for a missing row, that row).
    """
    from megatron_pwdpo.reference_cache import cache_rows, load_cache_table

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


class PointwiseRowDataset(torch.utils.data.Dataset):
    """Tokenised rows as fixed-width items for Megatron-LM's data loader.

    Args:
        rows: tokenised rows.
        seq_length: width every item is padded to.
        pad_id: padding token.
        global_batch_size: rows per optimizer step (each row's loss weight is its inverse).
        ref_logps: reference log-prob per row id (:func:`reference_logps`); None for SFT.
        loss_name: the loss. With ``ulma``, demonstrations need no reference: theirs is
            NaN, unused (as in ``megatron-pwdpo train``); with any other loss (or None)
            every row needs one when ``ref_logps`` is given.
        order: the sample stream: item ``i`` is row ``order.stream(i, 1)``; None = the
            rows in file order, once.
        num_samples: items (``order`` repeats the rows epoch after epoch); None = one
            epoch of ``order`` (``len(rows)`` without it).

    Raises:
        KeyError: a row that needs a reference log-prob has none (names the row).
        ValueError: a preference loss without ``ref_logps``.
    """

    def __init__(
        self,
        rows: Sequence[TokenizedRow],
        *,
        seq_length: int,
        pad_id: int,
        global_batch_size: int,
        ref_logps: Mapping[str, float] | None = None,
        loss_name: str | None = None,
        order: GlobalBatchSampler | None = None,
        num_samples: int | None = None,
    ):
        from megatron_pwdpo.reference import needs_reference

        def needs(row: TokenizedRow) -> bool:
            return loss_name != "ulma" or needs_reference(row)

        if ref_logps is None and loss_name not in (None, "sft") and any(map(needs, rows)):
            raise ValueError(f"loss.name={loss_name} needs ref_logps (the reference cache)")
        missing = (
            [] if ref_logps is None else [r.id for r in rows if needs(r) and r.id not in ref_logps]
        )
        if missing:
            raise KeyError(f"no reference log-prob for {len(missing)} rows, e.g. {missing[0]}")
        if order is None and num_samples is not None and num_samples > len(rows):
            raise ValueError(f"num_samples={num_samples} > {len(rows)} rows needs an order")
        self.rows, self.seq_length, self.pad_id = rows, seq_length, pad_id
        self.weight = 1.0 / global_batch_size
        self.ref_logps = ref_logps
        self.order = order
        epoch = len(rows) if order is None else order.epoch_length
        self.length = epoch if num_samples is None else num_samples

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"item {index} of {self.length}")
        row = self.rows[index if self.order is None else int(self.order.stream(index, 1)[0])]
        item = {
            k: v[0]
            for k, v in collate([row], seq_length=self.seq_length, pad_id=self.pad_id).items()
        }
        item["weight"] = torch.tensor(self.weight)
        if self.ref_logps is not None:
            ref = self.ref_logps.get(row.id, float("nan"))  # NaN: a ULMA demonstration
            item["ref_logps"] = torch.tensor(ref, dtype=torch.float32)
        return item


def prepare(config: RunConfig, *, ref_cache: str | Path | None = None):
    """Everything a run checks before Megatron-LM builds a model: :func:`unsupported`,
    the data (``prepare_data``) and the reference cache (:func:`reference_logps`).

    Returns:
        ``(data, ref_logps)`` for :func:`build_datasets`.

    Raises:
        ConfigError: what :func:`unsupported` names, or a bad cache.
        DataError: bad data.
    """
    from megatron_pwdpo.data.prepare import prepare_data

    check_supported(config, ref_cache=ref_cache)
    data = prepare_data(config.data, vocab_size=config.model.vocab_size)
    ref = reference_logps(config, data.train + data.eval, data.tokenizer, ref_cache=ref_cache)
    return data, ref


def build_datasets(
    config: RunConfig,
    data,
    ref_logps: Mapping[str, float] | None,
    *,
    global_batch_size: int,
    num_samples: Sequence[int] | None = None,
) -> tuple[PointwiseRowDataset, PointwiseRowDataset]:
    """The train and validation datasets of :func:`prepare`'s ``(data, ref_logps)``.

    Args:
        num_samples: Megatron-LM's ``train_val_test_num_samples`` (``[train, valid,
            ...]``); the training set then holds that many items of ``megatron-pwdpo
            train``'s sample stream (``train.seed``; ``data.balance_classes``), the
            validation set cycles through the held-out rows in order. None: one epoch each.
    """

    def dataset(rows, order, length) -> PointwiseRowDataset:
        return PointwiseRowDataset(
            rows,
            seq_length=config.data.seq_length,
            pad_id=data.tokenizer.pad_id,
            global_batch_size=global_batch_size,
            ref_logps=ref_logps,
            loss_name=config.loss.name,
            order=order,
            num_samples=length,
        )

    train_samples, valid_samples = (None, None) if num_samples is None else num_samples[:2]
    stream = GlobalBatchSampler(
        len(data.train),
        global_batch_size=global_batch_size,
        seed=config.train.seed,
        labels=[r.label for r in data.train],
        balance=config.data.balance_classes and config.loss.name != "sft",  # as run_stage
    )
    cycle = GlobalBatchSampler(len(data.eval), global_batch_size=1, seed=0, shuffle=False)
    return (
        dataset(data.train, stream, train_samples),
        dataset(data.eval, cycle, max(valid_samples or 0, len(data.eval))),
    )


def make_forward_step(loss: LossConfig, *, num_microbatches: int, data_parallel_size: int):
    """``forward_step(data_iterator, model)`` for ``pretrain()`` with this loss.

    Raises:
        ConfigError: a loss or normalisation this path does not support (see
            :func:`unsupported`).
    """
    if loss.name not in SUPPORTED_LOSSES or loss.normalization != "global_mean":
        raise ConfigError(
            f"Megatron-LM's pretrain() supports loss.name in {SUPPORTED_LOSSES} with "
            f"loss.normalization=global_mean, not {loss.name} with {loss.normalization}"
        )
    return partial(
        forward_step,
        objective=make_objective(loss),
        reduction=loss.logp_reduction,
        grad_scale=megatron_grad_scale(
            num_microbatches=num_microbatches, data_parallel_size=data_parallel_size
        ),
    )


def model_provider(config: RunConfig):
    """``model_provider(pre_process, post_process, vp_stage=None)`` for ``pretrain()``."""
    from megatron_pwdpo.model import build_model

    def provide(pre_process: bool = True, post_process: bool = True, vp_stage=None):
        return build_model(
            config.model,
            config.parallel,
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
            precision=config.precision,
        )

    return provide
