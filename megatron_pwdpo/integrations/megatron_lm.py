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
truth: :func:`megatron_args` are the Megatron-LM arguments it implies (the example's
``args_defaults``), and :func:`contradictions` names every Megatron-LM flag that differs.

Pair-wise losses (``dpo``, ``ipo``) train on chosen/rejected pairs, as there; an item
is still one row, so Megatron-LM counts rows: its micro-batch and global batch sizes are
twice the YAML's (which count pairs, :func:`megatron_args`), and the items of each
micro-batch are its pairs' chosen rows, then their rejected rows, the stacking
``step._split_pairs`` undoes (:func:`pairwise_item`). The loss weight of a pair is
``1 / global_batch_size`` (pairs), on the chosen row's item (:func:`pair_weights`
drops the rejected half in the forward step).

KTO needs a reference on each step's mismatched rows, which no cache holds: its items
carry their mismatched row, and ``megatron_lm_kto.KtoForwardStep`` runs a resident
reference (``reference.checkpoint``, else ``train.init_checkpoint``) and the KL point in
the forward step, on one pipeline stage.

Supported: ``sft``, ``pointwise_dpo``, ``ulma`` (whose demonstrations need no
reference: their ``ref_logps`` are NaN, as in ``megatron-pwdpo train``), ``dpo``,
``ipo`` and ``kto``, with ``loss.normalization=global_mean`` and no packing; the main
stage of a preference loss needs ``train.sft_steps=0``. :func:`unsupported` names everything
else, one line each, before any work is done. See ``examples/megatron_lm/``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import torch

from megatron_pwdpo.config import ConfigError, LossConfig, RunConfig
from megatron_pwdpo.data.sampler import GlobalBatchSampler
from megatron_pwdpo.data.tokenize import TokenizedRow, collate
from megatron_pwdpo.engine.batches import pair_up
from megatron_pwdpo.engine.step import forward_step, make_objective, megatron_grad_scale
from megatron_pwdpo.training.plan import Stage, plan_stages

STAGES = ("main", "sft")

SUPPORTED_LOSSES = ("sft", "pointwise_dpo", "ulma", "dpo", "ipo", "kto")
PAIRWISE = ("dpo", "ipo")  # an example is a (chosen, rejected) pair: 2 items
CACHED = ("pointwise_dpo", "ulma", *PAIRWISE)  # read precompute-ref's cache

_WHY_NOT = {
    "unlikelihood": "its per-token log(1 - p) terms are not wired into this path",
}


def unsupported(
    config: RunConfig, *, ref_cache: str | Path | None = None, stage: str = "main"
) -> list[str]:
    """What a run through Megatron-LM's ``pretrain()`` cannot do: one line each (empty
    when it can). Reads only the config, so it runs before any data or model work.

    Args:
        config: the megatron-pwdpo run config.
        ref_cache: the reference cache the run will read (``--pwdpo-ref-cache``), else
            ``reference.cache_path``.
        stage: ``main`` (``loss.name``) or ``sft`` (the SFT stage of a preference YAML).
    """
    loss, data = config.loss, config.data
    out = []
    if stage not in STAGES:
        return [f"stage {stage!r} is not one of {', '.join(STAGES)}"]
    has_sft_stage = loss.name != "sft" and config.train.sft_steps > 0
    if stage == "sft" and not has_sft_stage:
        out.append(
            f"--pwdpo-stage sft needs an SFT stage in the YAML (a preference loss with "
            f"train.sft_steps > 0), not loss.name={loss.name} with "
            f"train.sft_steps={config.train.sft_steps}"
        )
    if stage == "main" and loss.name not in SUPPORTED_LOSSES:
        out.append(
            f"loss.name={loss.name} is not supported in Megatron-LM's pretrain(): "
            f"{_WHY_NOT.get(loss.name, 'unknown loss')}; train it with megatron-pwdpo train "
            f"(supported here: {', '.join(SUPPORTED_LOSSES)})"
        )
    if stage == "main" and loss.normalization != "global_mean":
        out.append(
            f"loss.normalization={loss.normalization} is not supported in Megatron-LM's "
            "pretrain(): a row's weight there is 1 / global batch size, it cannot depend on "
            "the batch's class counts; set loss.normalization=global_mean"
        )
    if stage == "main" and has_sft_stage:
        out.append(
            f"train.sft_steps={config.train.sft_steps} is not supported in the main stage of "
            "Megatron-LM's pretrain(), which runs one stage: run the SFT stage first "
            "(--pwdpo-stage sft), precompute the reference from its checkpoint, then set "
            "train.sft_steps=0"
        )
    if data.packing != "none":
        out.append(
            f"data.packing={data.packing} is not supported in Megatron-LM's pretrain(): "
            "its items are one row each, padded to data.seq_length; set data.packing=none"
        )
    if stage == "main" and loss.name == "kto":
        if ref_cache is not None:
            out.append(
                "loss.name=kto reads no reference cache (its KL point needs the reference "
                "on each step's mismatched rows): drop --pwdpo-ref-cache; the reference is "
                "reference.checkpoint, else train.init_checkpoint, resident like the policy"
            )
        if not (config.reference.checkpoint or config.train.init_checkpoint):
            out.append(
                "loss.name=kto needs the reference model's weights: set "
                "reference.checkpoint (or train.init_checkpoint)"
            )
    if (
        stage == "main"
        and loss.name in CACHED
        and (ref_cache or config.reference.cache_path) is None
    ):
        out.append(
            f"loss.name={loss.name} needs the reference log-probs of megatron-pwdpo "
            "precompute-ref: pass --pwdpo-ref-cache FILE.npz (or set reference.cache_path)"
        )
    return out


def check_supported(
    config: RunConfig, *, ref_cache: str | Path | None = None, stage: str = "main"
) -> None:
    """Raise a ``ConfigError`` listing :func:`unsupported`'s lines, if any."""
    problems = unsupported(config, ref_cache=ref_cache, stage=stage)
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
    """Everything a run checks before Megatron-LM builds a model: :func:`unsupported`,
    the data (``prepare_data``), the stage (:func:`select_stage`) and the reference
    cache (:func:`reference_logps`).

    Returns:
        ``(data, ref_logps, stage)`` for :func:`build_datasets`.

    Raises:
        ConfigError: what :func:`unsupported` names, or a bad cache.
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
            :func:`unsupported`).
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
    YAML instead (:func:`contradictions` has refused flags that differ from it) on the
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


def _tokenizer_type(config: RunConfig) -> str:
    return {"sentencepiece": "SentencePieceTokenizer", "hf": "HuggingFaceTokenizer"}[
        config.data.tokenizer_type
    ]


# Defaults only, never contradictions: how often to log, evaluate and save, how many
# held-out batches to evaluate, and the parallel layout (a launch choice: the model is
# built for the flags' layout, :func:`with_layout`).
FREE = "(a default only)"


def _layout_args(p) -> list[tuple[str, object]]:
    return [
        ("tensor_model_parallel_size", p.tensor_parallel),
        ("pipeline_model_parallel_size", p.pipeline_parallel),
        ("sequence_parallel", p.sequence_parallel),
    ]


def with_layout(config: RunConfig, args) -> RunConfig:
    """``config`` with the parallel layout of Megatron-LM's parsed flags (tensor, pipeline,
    virtual pipeline, sequence parallel): the layout the model is built for."""
    layout = dataclasses.replace(
        config.parallel,
        tensor_parallel=args.tensor_model_parallel_size,
        pipeline_parallel=args.pipeline_model_parallel_size,
        virtual_pipeline=getattr(args, "virtual_pipeline_model_parallel_size", None),
        sequence_parallel=bool(args.sequence_parallel),
    )
    return dataclasses.replace(config, parallel=layout)


def megatron_args(config: RunConfig, stage: Stage) -> list[tuple[str, object, str]]:
    """The Megatron-LM arguments the YAML implies, as ``(dest, value, YAML key)``: the
    model shape, sequence length, tokenizer, batch sizes, the stage's steps and
    learning-rate schedule, optimizer, seed, intervals, the held-out rows (as
    ``eval_iters`` whole global batches) and the parallel layout.

    ``dict((d, v) for d, v, _ in ...)`` is the example's ``args_defaults``.
    """
    m, p, t, d = config.model, config.parallel, config.train, config.data
    groups = m.num_query_groups or m.num_attention_heads
    sft = stage.loss.name == "sft" and config.loss.name != "sft"
    # Megatron-LM counts items (rows); a pair is two (see the module docstring)
    rows, per = (2, "2 x ") if stage.loss.name in PAIRWISE else (1, "")
    out = [
        ("num_layers", m.num_layers, "model.num_layers"),
        ("hidden_size", m.hidden_size, "model.hidden_size"),
        ("ffn_hidden_size", m.ffn_hidden_size, "model.ffn_hidden_size"),
        ("num_attention_heads", m.num_attention_heads, "model.num_attention_heads"),
        ("group_query_attention", groups != m.num_attention_heads, "model.num_query_groups"),
        ("num_query_groups", groups, "model.num_query_groups"),
        ("max_position_embeddings", m.max_seq_length, "model.max_seq_length"),
        ("position_embedding_type", "rope", "model (RoPE)"),
        ("rotary_base", m.rotary_base, "model.rotary_base"),
        ("normalization", "RMSNorm", "model (RMSNorm)"),
        ("swiglu", True, "model (SwiGLU)"),
        ("add_bias_linear", False, "model (no linear biases)"),
        ("add_qkv_bias", m.qkv_bias, "model.qkv_bias"),
        ("untie_embeddings_and_output_weights", m.untie_embeddings, "model.untie_embeddings"),
        ("init_method_std", m.init_method_std, "model.init_method_std"),
        ("seq_length", d.seq_length, "data.seq_length"),
        ("tokenizer_type", _tokenizer_type(config), "data.tokenizer_type"),
        ("tokenizer_model", str(d.tokenizer), "data.tokenizer"),
        ("micro_batch_size", rows * t.micro_batch_size, per + "train.micro_batch_size"),
        ("global_batch_size", rows * t.global_batch_size, per + "train.global_batch_size"),
        ("train_iters", stage.steps, "train.sft_steps" if sft else "train.steps"),
        ("lr", stage.lr, "train.sft_lr" if sft else "train.lr"),
        ("min_lr", t.min_lr, "train.min_lr"),
        ("lr_warmup_iters", min(t.warmup_steps, stage.steps), "train.warmup_steps"),
        ("lr_decay_style", "cosine", "train (cosine decay)"),
        ("weight_decay", t.weight_decay, "train.weight_decay"),
        ("adam_beta1", t.adam_beta1, "train.adam_beta1"),
        ("adam_beta2", t.adam_beta2, "train.adam_beta2"),
        ("clip_grad", t.clip_grad, "train.clip_grad"),
        ("seed", t.seed, "train.seed"),
        ("log_interval", t.log_interval, FREE),
        ("eval_interval", t.eval_interval, FREE),
        # the held-out rows, in whole global batches
        ("eval_iters", len(stage.eval_examples) // t.global_batch_size, FREE),
        *[(dest, value, FREE) for dest, value in _layout_args(p)],
        ("bf16", config.precision.dtype == "bf16", "precision.dtype (bf16)"),
    ]
    if m.kv_channels is not None:
        out.append(("kv_channels", m.kv_channels, "model.kv_channels"))
    if t.save_interval > 0:
        out.append(("save_interval", t.save_interval, FREE))
    return out


def contradictions(args, config: RunConfig, stage: Stage) -> list[str]:
    """Megatron-LM's parsed flags (``args``) that differ from the YAML, and settings this
    path refuses; one line each, e.g. ``--hidden-size 256 differs from the YAML's
    model.hidden_size=128``. An argument left unset (None) is not a contradiction: the
    YAML's value fills it (``args_defaults``). Intervals, ``--eval-iters`` and the
    parallel layout are defaults only (``FREE``): the flags choose them."""
    out = []
    for dest, ours, key in megatron_args(config, stage):
        theirs = getattr(args, dest, None)
        if key != FREE and theirs is not None and theirs != ours:
            out.append(f"--{dest.replace('_', '-')} {theirs} differs from the YAML's {key}={ours}")
    prec = config.precision
    fp8 = prec.fp8 is not None
    checks = [
        ("--fp16", "fp16", False, "precision.dtype (fp16 is not offered)"),
        ("--fp8-format", "fp8", prec.fp8_format if fp8 else None,
         "precision.fp8_format (with precision.fp8)"),
        ("--fp8-recipe", "fp8_recipe", prec.fp8, "precision.fp8"),
    ]  # fmt: skip
    for flag, dest, ours, key in checks:
        theirs = getattr(args, dest, None)
        if dest == "fp8_recipe" and not fp8:
            theirs = None  # Megatron-LM's recipe default means nothing without --fp8-format
        if dest == "fp16":
            theirs = bool(theirs)
        if theirs != ours:
            out.append(f"{flag} {theirs} differs from the YAML's {key}={ours}")
    cp = getattr(args, "context_parallel_size", 1) or 1
    if cp > 1:
        out.append(
            f"--context-parallel-size {cp} is not supported: Megatron-LM's schedule "
            "multiplies each micro-batch's loss by the CP size, and the plugin's sequence "
            "log-probs are not summed across CP ranks; use tensor/pipeline/data parallelism"
        )
    pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    if stage.loss.name == "kto" and pp > 1:
        out.append(
            f"--pipeline-model-parallel-size {pp} is not supported with loss.name=kto: its "
            "reference and KL passes run in the forward step, outside Megatron's pipeline "
            "schedule; use tensor/data parallelism (or megatron-pwdpo train)"
        )
    if getattr(args, "calculate_per_token_loss", False):
        out.append(
            "--calculate-per-token-loss is not supported: the plugin's loss is a mean over "
            "rows (each weighs 1 / global batch size), and Megatron-LM would divide it by "
            "the number of tokens instead; drop the flag"
        )
    return out


def checkpoint_problems(load: str | Path | None, *, save: str | Path | None = None) -> list[str]:
    """Why ``--load`` would start from random weights, one line each (empty: it loads).

    Megatron-LM only warns when the folder has no ``latest_checkpointed_iteration.txt``
    (with ``--exit-on-missing-checkpoint`` it exits with status 0) and trains from random
    weights; this refuses that, except for ``--load`` equal to ``--save`` (a first run
    that a later one resumes). A ``megatron-pwdpo train`` checkpoints folder carries the
    tracker (:data:`megatron_pwdpo.engine.checkpoint.MEGATRON_LM_TRACKER`).
    """
    from megatron_pwdpo.engine.checkpoint import MEGATRON_LM_TRACKER, iteration_name

    if load is None:
        return []
    load = Path(load)
    tracker = load / MEGATRON_LM_TRACKER
    if tracker.exists():
        text = tracker.read_text().strip()
        if text == "release" or (text.isdigit() and (load / iteration_name(int(text))).is_dir()):
            return []
        return [f"--load {load}: {MEGATRON_LM_TRACKER} names iteration {text!r}, not there"]
    if save is not None and Path(save).resolve() == load.resolve():
        return []
    if (load / "metadata.json").exists() and (load.parent / MEGATRON_LM_TRACKER).exists():
        return [f"--load {load} is one checkpoint: pass its folder, --load {load.parent}"]
    hint = ""
    if (load / "latest.txt").exists():
        hint = (
            " (a megatron-pwdpo train checkpoints folder from before the tracker: write "
            f"the iteration of its latest.txt into {tracker})"
        )
    return [f"--load {load} has no {MEGATRON_LM_TRACKER}: no checkpoint to load{hint}"]
