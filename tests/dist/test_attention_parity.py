"""``model.attention=sdpa`` (:class:`megatron_pwdpo.model.attention.SDPAttention`) against
Megatron-Core's local ``DotProductAttention`` on a real GPT model, at TP=1 and TP=2 (the
query heads and key/value groups sharded over the ranks, 2 gloo processes).

The same weights (one model's state dict loaded into the other), grouped-query attention
(4 heads, 2 key/value groups: 1 group per rank at TP=2), fp32: the logits (this rank's
vocabulary shard) and the gradients of every parameter for a fixed weighted sum of the
logits agree to 1e-5 of the largest entry of each tensor (measured: ~3e-7, float32
rounding of two orders of summation; a softmax scale 1% off gives 8.7e-5). Two batches:
padded rows (causal attention, no mask) and rows packed several to a sequence with the
block-diagonal mask of ``data.packing=masked``.
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
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron_pwdpo.platform import cpu_bridge
    from megatron_pwdpo.platform import distributed
    from megatron_pwdpo.model.attention import SDPAttention
    from megatron_pwdpo.engine.batches import rank_micro_batches
    from megatron_pwdpo.cli import DEFAULT_CONFIG
    from megatron_pwdpo.config import load_config
    from megatron_pwdpo.data.prepare import prepare_data
    from megatron_pwdpo.engine.setup import build_chunks


    def with_attention(config, kind):
        return dataclasses.replace(config, model=dataclasses.replace(config.model, attention=kind))


    def core_attention(model):
        return model.decoder.layers[0].self_attention.core_attention


    def logits_and_grads(model, batch):
        model.zero_grad(set_to_none=True)
        logits = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
        (logits * weights).sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]


    def close(a, b, what, tol=1e-5):
        '''Largest difference within tol of the largest entry (float32 rounding).'''
        err = float((a - b).abs().max() / b.abs().max())
        assert err <= tol, f"{what}: max |difference| / max |entry| = {err:.2e}"


    def main():
        tp = int(sys.argv[1])
        config = load_config(DEFAULT_CONFIG, sys.argv[2:])
        data = prepare_data(config.data, vocab_size=config.model.vocab_size)
        distributed.init_distributed(
            tensor_parallel=tp, pipeline_parallel=1, virtual_pipeline=None, timeout_s=120
        )
        cpu_bridge.manual_seed(0)
        (local,) = build_chunks(with_attention(config, "local"), wrap_ddp=False)
        (sdpa,) = build_chunks(with_attention(config, "sdpa"), wrap_ddp=False)
        sdpa.load_state_dict(local.state_dict())
        assert type(core_attention(local)) is DotProductAttention
        assert type(core_attention(sdpa)) is SDPAttention
        ca = core_attention(sdpa)
        assert ca.num_attention_heads_per_partition == 4 // tp
        assert ca.num_query_groups_per_partition == 2 // tp

        rows = [r for r in data.train if r.input_ids.size <= 64][:6]
        pad = data.tokenizer.pad_id
        kw = dict(dp_rank=0, dp_size=1, micro_batch_size=6, pad_id=pad)
        (padded,) = rank_micro_batches(rows, **kw)
        assert "attention_mask" not in padded  # causal
        (packed,) = rank_micro_batches(rows, packed_layout="mask", pack_length=128, **kw)
        assert packed["tokens"].shape[0] < len(rows)  # rows really share sequences
        assert (packed["segment_ids"] == -1).any()  # and padding is in the mask too
        for name, batch in [("causal", padded), ("packed-masked", packed)]:
            want, want_grads = logits_and_grads(local, batch)
            got, got_grads = logits_and_grads(sdpa, batch)
            close(got, want, f"{name} logits")
            for g, w in zip(got_grads, want_grads, strict=True):
                close(g, w, f"{name} gradients")
        distributed.shutdown()
        print("parity ok")


    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_attention_matches_megatron_local_attention(tmp_path, tp):
    script = tmp_path / "parity.py"
    script.write_text(SCRIPT)
    proc = run_python([str(script), str(tp), *TINY, f"parallel.tensor_parallel={tp}"], nproc=tp)
    assert proc.stdout.count("parity ok") == tp
