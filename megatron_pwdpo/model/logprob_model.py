"""A GPTModel whose ``labels`` path gives exact log-probs within bounded memory.

**Padded vocabulary rows.** The embedding and output layer hold ``padded_vocab_size``
rows (:func:`megatron_pwdpo.model.build.padded_vocab_size`: a multiple every TP size divides)
of which only the first ``vocab_size`` are tokens. Megatron-LM lets the others into the
softmax, so a model converted from Hugging Face (zero rows there: logit 0) or trained
from scratch (random rows) gets ``log Z`` too large. Here their logits are set to the
dtype's lowest value before the vocab-parallel cross-entropy (``exp`` of it is 0; a
finite value, not ``-inf``, so that fused online-softmax kernels never compute ``-inf -
(-inf)``), so the log-probs are those of the real vocabulary, as in ``transformers``.

**Chunking.** Megatron-Core's GPTModel, called with ``labels``, applies the output layer
to the whole sequence and then the vocab-parallel cross-entropy: ``[s, b, V / tp]``
logits, plus the fp32 softmax the cross-entropy keeps for its backward, exist at once.
At a 128k vocabulary and 8k positions that is 4 GiB per copy per sample at TP=1, the OOM
preference trainers hit. With ``logprob_chunk_size = c`` this model instead runs the
decoder to its final hidden states ``[s, b, h]`` and computes output layer + cross-
entropy over ``c`` positions at a time, each chunk under activation checkpointing (its
logits are recomputed in the backward pass), so that only one chunk's ``[c, b, V / tp]``
logits exist at a time. Results are identical; the cost is one more output-layer matmul
per chunk in the backward.

Everything else (no labels, pipeline stages without the output layer, sequences not
longer than one chunk) is the stock GPTModel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_model import GPTModel
from torch.utils.checkpoint import checkpoint

from megatron_pwdpo.platform import compat


class LogprobGPTModel(GPTModel):
    """GPTModel whose cross-entropy excludes padded vocabulary rows and can be chunked
    (see the module docstring).

    Args:
        real_vocab_size: tokens of the vocabulary (the rest of GPTModel's
            ``vocab_size`` rows is padding); None = no padding.
        logprob_chunk_size: sequence positions per chunk of the output layer and the
            cross-entropy; 0 = the whole sequence at once (stock behaviour).
        *args, **kwargs: GPTModel's (``vocab_size`` is the padded size).
    """

    def __init__(
        self, *args, real_vocab_size: int | None = None, logprob_chunk_size: int = 0, **kwargs
    ):
        super().__init__(*args, **kwargs)
        if logprob_chunk_size and self.config.mtp_num_layers:
            raise ValueError("logprob_chunk_size does not support multi-token prediction")
        self.logprob_chunk_size = logprob_chunk_size
        self.real_vocab_size = real_vocab_size or self.vocab_size

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        decoder_input: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """GPTModel's forward; with ``labels [b, s]`` on the output stage and ``s`` above
        the chunk size, the per-token cross-entropy ``[b, s]`` is computed in chunks."""
        chunk = self.logprob_chunk_size
        if labels is None or not self.post_process or not chunk or labels.shape[1] <= chunk:
            return super().forward(
                input_ids, position_ids, attention_mask, decoder_input, labels, **kwargs
            )
        hidden = self._final_hidden_states(
            input_ids, position_ids, attention_mask, decoder_input, **kwargs
        )
        return chunked_cross_entropy(hidden, labels, self._cross_entropy, chunk_size=chunk)

    def _final_hidden_states(self, *args, **kwargs) -> torch.Tensor:
        """``[s, b, h]``: the decoder's output (final norm applied), before the output layer
        (how GPTModel is stopped there depends on the megatron-core release: see
        :func:`megatron_pwdpo.platform.compat.final_hidden_states`)."""
        return compat.final_hidden_states(self, super().forward, *args, **kwargs)

    def _cross_entropy(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``[c, b, h]`` hidden states, ``[b, c]`` labels -> ``[b, c]`` per-token
        vocab-parallel cross-entropy (the model's own output layer and loss settings)."""
        weight = (
            self.shared_embedding_or_output_weight()
            if self.share_embeddings_and_output_weights
            else None
        )
        logits, _ = self.output_layer(hidden, weight=weight)
        return self.compute_language_model_loss(labels, logits)

    def compute_language_model_loss(
        self, labels: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        """Megatron's per-token vocab-parallel cross-entropy ``[b, s]`` of ``logits``
        ``[s, b, V / tp]``, with this rank's padded vocabulary rows excluded."""
        local = logits.shape[-1]
        rank = parallel_state.get_tensor_model_parallel_rank()
        first_pad = self.real_vocab_size - rank * local  # local index of the first pad row
        if first_pad < local:
            logits[..., max(first_pad, 0) :] = torch.finfo(logits.dtype).min
        return super().compute_language_model_loss(labels, logits)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    chunk_size: int,
) -> torch.Tensor:
    """Apply ``head`` over sequence chunks, checkpointed when gradients are recorded.

    Args:
        hidden: ``[s, b, h]`` final hidden states.
        labels: ``[b, s]`` target ids.
        head: ``(hidden [c, b, h], labels [b, c]) -> [b, c]`` per-token loss.
        chunk_size: ``c``; the last chunk may be shorter.

    Returns:
        ``[b, s]``, equal to ``head(hidden, labels)``.
    """
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]
        y = labels[:, start : start + chunk_size]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(head, h, y, use_reentrant=False))
        else:
            pieces.append(head(h, y))
    return torch.cat(pieces, dim=1)
