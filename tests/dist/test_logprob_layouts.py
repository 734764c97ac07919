"""Two ways of getting the same log-probs, checked on a real Megatron model at TP=1 and TP=2:

* ``parallel.logprob_chunk_size``: output layer + vocab-parallel cross-entropy over
  chunks of the sequence (checkpointed) equals the whole sequence at once, in values
  and in gradients;
* THD packing (``PackedSeqParams``, what Transformer Engine runs on GPU) equals the
  block-diagonal-mask packing and the padded rows. On CPU megatron-core's local attention
  refuses ``PackedSeqParams``, so the script swaps in a core attention that reads the
  row boundaries from ``cu_seqlens`` (the one thing TE's kernel does); everything else,
  our batch layout, the ``[1, b*s]`` flattening, Megatron's THD RoPE and the per-row
  reductions, is the production path. ``tests/gpu`` runs the same with TE itself.
"""

import textwrap

import pytest
from conftest import TINY, run_python

pytestmark = pytest.mark.dist

SCRIPT = textwrap.dedent(
    """
    import dataclasses
    import sys
    import torch
    import megatron_pwdpo.model.build as model_module
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron_pwdpo.platform import cpu_bridge
    from megatron_pwdpo.platform import distributed
    from megatron_pwdpo.engine.batches import rank_micro_batches
    from megatron_pwdpo.cli import DEFAULT_CONFIG
    from megatron_pwdpo.config import load_config
    from megatron_pwdpo.data.prepare import prepare_data
    from megatron_pwdpo.engine.step import _next_through_model, row_logps
    from megatron_pwdpo.engine.setup import build_chunks


    class ThdOnCpuAttention(DotProductAttention):
        '''Local attention that honours THD PackedSeqParams: [t, n, d] inputs whose rows
        cu_seqlens delimits become one [t, 1, n, d] sequence with a block-causal mask.'''

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None):
            if packed_seq_params is None:
                return super().forward(query, key, value, attention_mask, attn_mask_type,
                                       attention_bias)
            t = query.shape[0]
            cu = packed_seq_params.cu_seqlens_q.long()
            starts = torch.zeros(t, dtype=torch.long)
            starts[cu[1:-1]] = 1
            run = starts.cumsum(0)
            pos = torch.arange(t)
            visible = (run[:, None] == run[None, :]) & (pos[None, :] <= pos[:, None])
            q, k, v = (x.unsqueeze(1) for x in (query, key, value))
            return super().forward(q, k, v, ~visible[None, None], attn_mask_type, None)


    stock_spec = model_module.layer_spec

    def thd_capable_spec(*, use_te, attention):
        spec = stock_spec(use_te=use_te, attention="local")
        spec.submodules.self_attention.submodules.core_attention = ThdOnCpuAttention
        return spec


    def grads(chunks):
        return [p.grad.clone() for p in chunks[0].parameters()]


    def rows_and_grads(chunks, batch, weights):
        '''Per-row log-probs [n] of one micro-batch and the gradient of weights . logps.'''
        chunks[0].zero_grad(set_to_none=True)
        batch, token_logps = _next_through_model(iter([batch]), chunks[0])
        logps = row_logps(token_logps, batch, reduction="sum")
        (logps * weights).sum().backward()
        return logps.detach(), grads(chunks)


    def close(a, b, what, rtol=2e-5, atol=2e-5):
        assert torch.allclose(a, b, rtol=rtol, atol=atol), f"{what}: {(a - b).abs().max()}"


    def main():
        tp = int(sys.argv[1])
        config = load_config(DEFAULT_CONFIG, sys.argv[2:])
        data = prepare_data(config.data, vocab_size=config.model.vocab_size)
        distributed.init_distributed(
            tensor_parallel=tp, pipeline_parallel=1, virtual_pipeline=None, timeout_s=120
        )
        model_module.layer_spec = thd_capable_spec
        cpu_bridge.manual_seed(0)
        plain = build_chunks(config, wrap_ddp=False)
        chunk_config = dataclasses.replace(
            config, parallel=dataclasses.replace(config.parallel, logprob_chunk_size=24)
        )
        chunked = build_chunks(chunk_config, wrap_ddp=False)
        chunked[0].load_state_dict(plain[0].state_dict())
        assert chunked[0].logprob_chunk_size == 24 and plain[0].logprob_chunk_size == 0

        rows = [r for r in data.train if r.input_ids.size <= 64][:6]  # several per sequence
        weights = torch.linspace(-1.0, 1.0, len(rows))
        pad = data.tokenizer.pad_id
        padded = rank_micro_batches(rows, dp_rank=0, dp_size=1, micro_batch_size=6, pad_id=pad)
        assert len(padded) == 1 and padded[0]["tokens"].shape[1] > 24  # several chunks
        want, want_grads = rows_and_grads(plain, padded[0], weights)

        # 1. chunked output layer + cross-entropy = the whole sequence at once
        got, got_grads = rows_and_grads(chunked, padded[0], weights)
        close(got, want, "chunked log-probs", rtol=1e-6, atol=1e-5)
        for g, w in zip(got_grads, want_grads, strict=True):
            close(g, w, "chunked gradients", rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # reference forwards: no checkpointing, same numbers
            _, nograd = _next_through_model(iter([padded[0]]), chunked[0])
            _, full = _next_through_model(iter([padded[0]]), plain[0])
        close(nograd, full, "chunked no-grad token log-probs", rtol=1e-6, atol=1e-5)

        # 2. THD packing = mask packing = one padded row per sequence
        kw = dict(dp_rank=0, dp_size=1, micro_batch_size=8, pad_id=pad, pack_length=128)
        masked = rank_micro_batches(rows, packed_layout="mask", **kw)
        thd = rank_micro_batches(rows, packed_layout="thd", **kw)
        assert len(masked) == len(thd) == 1 and "cu_seqlens" in thd[0]
        assert masked[0]["tokens"].shape[0] < len(rows)  # rows really share sequences
        assert thd[0]["tokens"].shape[0] == 1  # THD: all rows in one sequence
        for name, batch, model in [("mask", masked[0], plain), ("thd", thd[0], plain),
                                   ("thd+chunks", thd[0], chunked)]:
            got, got_grads = rows_and_grads(model, batch, weights)
            close(got, want, f"{name} packed log-probs")
            for g, w in zip(got_grads, want_grads, strict=True):
                close(g, w, f"{name} packed gradients", rtol=1e-4, atol=1e-5)
        distributed.shutdown()
        print("layouts ok")


    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.parametrize("tp", [1, 2])
def test_chunked_and_thd_log_probs_equal_the_plain_ones(tmp_path, tp):
    script = tmp_path / "layouts.py"
    script.write_text(SCRIPT)
    proc = run_python([str(script), str(tp), *TINY, f"parallel.tensor_parallel={tp}"], nproc=tp)
    assert proc.stdout.count("layouts ok") == tp
