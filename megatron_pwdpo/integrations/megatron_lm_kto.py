"""KTO inside Megatron-LM's ``pretrain()``: the reference and the KL point in the forward step.

KTO (Ethayarajh et al., arXiv 2402.01306) compares each row's log-ratio
``d = log pi/pi_ref`` with the detached reference point
``z_ref = max(0, E[log pi(y'|x) / pi_ref(y'|x)])`` over the *mismatched* rows of the global
batch (row ``k``'s prompt with row ``(k + 1) mod G``'s response, ``batches.mismatched``).
Megatron-LM's loop has no hook for either model pass, and no cache can hold them (the
mismatched rows, and the policy's log-probs on them, change every step), so
:class:`KtoForwardStep` does what ``megatron-pwdpo train``'s resident reference does, at
the first micro-batch of each iteration:

1. it takes every micro-batch of the iteration from Megatron-LM's data iterator (each
   item carries its mismatched row as ``kl_*`` tensors: :func:`mismatched_item`);
2. a frozen reference, built like the policy and loaded from ``reference.checkpoint``
   (else ``train.init_checkpoint``), gives every row's and every mismatched row's
   log-prob; the policy gives the mismatched rows' (no gradient);
3. ``z_ref`` is all-reduced over the data-parallel group (``engine.step.kto_reference_point``),
   then the iteration's micro-batches go through the plain forward step one per call.

The extra passes run outside Megatron's pipeline schedule, so this needs one pipeline
stage (``--pipeline-model-parallel-size 1``); tensor and data parallelism work as in
the policy's forward.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import partial

import torch

from megatron_pwdpo.config import ConfigError, RunConfig
from megatron_pwdpo.data.tokenize import TokenizedRow, collate
from megatron_pwdpo.engine.batches import mismatched
from megatron_pwdpo.engine.step import (
    forward_step,
    kto_reference_point,
    make_objective,
    megatron_grad_scale,
    row_logps,
    to_model_device,
)
from megatron_pwdpo.model.logprobs import model_token_logps

KL_PREFIX = "kl_"


def mismatched_item(
    row: TokenizedRow, neighbour: TokenizedRow, *, seq_length: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """``row``'s prompt with ``neighbour``'s response, as ``kl_``-prefixed item tensors
    (``kl_tokens`` ``[s]``, ``kl_target_ids``, ``kl_loss_mask``, ``kl_position_ids``)."""
    (shifted,) = mismatched([row, neighbour], seq_length=seq_length)[:1]
    batch = collate([shifted], seq_length=seq_length, pad_id=pad_id)
    keys = ("tokens", "target_ids", "loss_mask", "position_ids")
    return {KL_PREFIX + k: batch[k][0] for k in keys}


def _unprefixed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(KL_PREFIX) :]: v for k, v in batch.items() if k.startswith(KL_PREFIX)}


class _Once:
    """An iterator of one micro-batch (what ``step.forward_step`` reads)."""

    def __init__(self, batch):
        self.batch = batch

    def __next__(self):
        batch, self.batch = self.batch, None
        if batch is None:
            raise StopIteration
        return batch


class KtoForwardStep:
    """``forward_step(data_iterator, model)`` for ``loss.name=kto`` in ``pretrain()``.

    Args:
        config: a function returning the run config with Megatron-LM's parallel layout
            (called once, at the first step, when Megatron-LM has parsed its flags).
        num_microbatches: ``(training: bool) -> int``: the micro-batches per
            data-parallel rank of a training iteration (Megatron-LM's
            ``get_num_microbatches``) or of an evaluation iteration (``model.training``
            tells them apart: Megatron-LM's evaluation sets eval mode).
        data_parallel_group: a function returning the data-parallel process group
            (None: one rank).
    """

    def __init__(
        self,
        config: Callable[[], RunConfig],
        *,
        num_microbatches: Callable[[bool], int],
        data_parallel_group: Callable[[], torch.distributed.ProcessGroup | None],
    ):
        self._config, self._num_microbatches = config, num_microbatches
        self._dp_group = data_parallel_group
        self.config: RunConfig | None = None
        self.reference: torch.nn.Module | None = None
        self.pending: deque = deque()
        self.count = 0  # micro-batches of the current iteration

    def _build_reference(self) -> torch.nn.Module:
        from megatron_pwdpo.engine import checkpoint
        from megatron_pwdpo.engine.setup import build_chunks
        from megatron_pwdpo.reference.strategies import external_reference

        source = external_reference(self.config)
        if source is None:
            raise ConfigError(
                "loss.name=kto in pretrain() needs reference.checkpoint or "
                "train.init_checkpoint (the reference model's weights)"
            )
        (chunk,) = build_chunks(self.config, wrap_ddp=False)
        checkpoint.load_checkpoint([chunk], source)
        chunk.requires_grad_(False)
        chunk.eval()
        return chunk

    def _logps(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """``[b]`` per-row log-probs of ``batch`` under ``model`` (no gradient)."""
        batch = to_model_device(batch, model)
        token_logps = model_token_logps(
            model, batch["tokens"], batch["position_ids"], batch["target_ids"]
        )
        return row_logps(token_logps, batch, reduction=self.config.loss.logp_reduction)

    @torch.no_grad()
    def _attach_inputs(self, batches: list[dict], policy: torch.nn.Module) -> None:
        """Every row's reference log-prob and the iteration's KL point ``z_ref``."""
        from megatron_pwdpo.model.precision import reference_precision

        shifted = [_unprefixed(b) for b in batches]
        with reference_precision(self.config.precision, [self.reference, policy]):
            for batch in batches:
                batch["ref_logps"] = self._logps(self.reference, batch)
            ref_kl = [self._logps(self.reference, b) for b in shifted]
        policy_kl = [self._logps(policy, b) for b in shifted]
        kl = kto_reference_point(policy_kl, ref_kl, dp_group=self._dp_group())
        for batch in batches:
            batch["kl"] = kl

    def __call__(self, data_iterator, model: torch.nn.Module):
        if self.config is None:
            self.config = self._config()
            if self.config.parallel.pipeline_parallel > 1:
                raise ConfigError(
                    "loss.name=kto in pretrain() needs --pipeline-model-parallel-size 1: its "
                    "reference and KL passes run outside Megatron's pipeline schedule"
                )
            self.reference = self._build_reference()
        if not self.pending:  # the first micro-batch of an iteration (or an evaluation)
            self.count = self._num_microbatches(model.training)
            batches = [next(data_iterator) for _ in range(self.count)]
            self._attach_inputs(batches, model)
            self.pending.extend(batches)
        loss = self.config.loss
        group = self._dp_group()
        grad_scale = megatron_grad_scale(
            num_microbatches=self.count,
            data_parallel_size=1 if group is None else torch.distributed.get_world_size(group),
        )
        step = partial(
            forward_step,
            objective=make_objective(loss),
            reduction=loss.logp_reduction,
            grad_scale=grad_scale,
        )
        return step(_Once(self.pending.popleft()), model)
