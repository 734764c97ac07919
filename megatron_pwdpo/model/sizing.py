"""Memory per GPU of a run, estimated from its config before any GPU is touched.

``megatron-pwdpo train --dry-run --world-size N`` prints it; the cluster examples are
checked against it (``tests/unit/config/test_example_configs.py``). The estimate is for the most
loaded GPU: a first or last pipeline stage, which holds its layers and one embedding
table (both, untied, when PP = 1), divided by tensor parallelism. For its ``P``
parameters:

==============  =====================================================================
weights         2 B (bf16) or 4 B (fp32) per parameter
gradients       4 B: Megatron's DDP keeps fp32 gradient buffers (``grad_reduce_in_fp32``)
optimizer       Adam's two fp32 moments (8 B), plus fp32 master weights (4 B) for bf16
                parameters; divided by data parallel with the distributed optimizer
reference       a ``resident`` reference's weights (``offload`` keeps them in host
                memory, ``cache`` and ``none`` have none)
activations     per layer and micro-batch in flight, s x b x h x (34 / TP) bytes with
                sequence parallelism, s x b x h x (10 + 24 / TP) without (Korthikanti et
                al. 2022, with flash attention: no s x s scores kept); 1F1B keeps up to
                PP micro-batches in flight on the first stage
logits          the last stage's fp32 ``[s, b, V / TP]`` logits and the cross-entropy's
                softmax (2 x 4 B), over ``logprob_chunk_size`` positions when it is set
==============  =====================================================================

Not counted: NCCL buffers, the CUDA context, allocator fragmentation (a few GB; keep the
estimate under ~75% of the GPU), and FP8 weight copies (about 1 B per parameter).
"""

from __future__ import annotations

from megatron_pwdpo.model.build import padded_vocab_size
from megatron_pwdpo.platform.decisions import use_distributed_optimizer

GB = 1e9


def parameters_per_gpu(config) -> float:
    """Parameters on the most loaded GPU (a first or last pipeline stage)."""
    m, p = config.model, config.parallel
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    kv = (m.num_query_groups or m.num_attention_heads) * (
        m.kv_channels or m.hidden_size // m.num_attention_heads
    )
    q = m.num_attention_heads * (m.kv_channels or m.hidden_size // m.num_attention_heads)
    h = m.hidden_size
    # q, k, v and output projections; SwiGLU's three matrices; two RMSNorm weights
    layer = 2 * h * q + 2 * h * kv + 3 * h * m.ffn_hidden_size + 2 * h
    vocab = padded_vocab_size(m.vocab_size, multiple=m.vocab_pad_multiple, tensor_parallel=tp)
    tables = 2 if pp == 1 and m.untie_embeddings else 1
    return (m.num_layers // pp * layer + tables * vocab * h) / tp


def memory_per_gpu(config, world_size: int) -> dict[str, float]:
    """GB per item on the most loaded GPU (see the module docstring), and ``total``."""
    m, p, t = config.model, config.parallel, config.train
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    dp = world_size // (tp * pp)
    params = parameters_per_gpu(config)
    bf16 = config.precision.dtype == "bf16"
    weight_bytes = 2 if bf16 else 4
    optimizer_bytes = 12 if bf16 else 8
    if use_distributed_optimizer(p.distributed_optimizer, data_parallel=dp):
        optimizer_bytes /= dp
    in_flight = min(pp, max(1, t.global_batch_size // (t.micro_batch_size * dp)))
    s, b, h = config.data.seq_length, t.micro_batch_size, m.hidden_size
    per_layer = s * b * h * (34 / tp if p.sequence_parallel else 10 + 24 / tp)
    positions = min(s, p.logprob_chunk_size) if p.logprob_chunk_size else s
    vocab = padded_vocab_size(m.vocab_size, multiple=m.vocab_pad_multiple, tensor_parallel=tp)
    gb = {
        "params_per_gpu_billion": params / 1e9,
        "weights": weight_bytes * params / GB,
        "gradients": 4 * params / GB,
        "optimizer": optimizer_bytes * params / GB,
        "reference": weight_bytes * params / GB if config.reference.mode == "resident" else 0.0,
        "activations": per_layer * (m.num_layers // pp) * in_flight / GB,
        "logits": 2 * 4 * positions * b * vocab / tp / GB,
    }
    gb["total"] = sum(v for k, v in gb.items() if k != "params_per_gpu_billion")
    return gb


def memory_table(config, world_size: int) -> str:
    """The estimate as the lines ``train --dry-run`` prints."""
    gb = memory_per_gpu(config, world_size)
    p = config.parallel
    dp = world_size // (p.tensor_parallel * p.pipeline_parallel)
    lines = [
        f"memory per GPU (estimate), world {world_size} = TP {p.tensor_parallel} x "
        f"PP {p.pipeline_parallel} x DP {dp}, {config.precision.dtype}, micro-batch "
        f"{config.train.micro_batch_size} x {config.data.seq_length} tokens:",
        f"  parameters on the most loaded GPU  {gb['params_per_gpu_billion']:.2f} B",
    ]
    for key in ("weights", "gradients", "optimizer", "reference", "activations", "logits"):
        lines.append(f"  {key:<34} {gb[key]:7.1f} GB")
    lines.append(f"  {'total':<34} {gb['total']:7.1f} GB (+ NCCL, CUDA context, fragmentation)")
    return "\n".join(lines)
