"""Peak host memory of ``convert hf-to-mcore`` and ``convert mcore-to-hf`` against the
size of the model, at a few sizes: does it stay near one copy of the weights?

Synthetic Llama-style Hugging Face models (width 1024, SwiGLU 2816, 16 heads, 8
key/value groups, vocabulary 32000, untied, **bf16**, random weights) of 8, 24 and 56
layers (0.32, 0.70 and 1.45 GB), each saved as 8 safetensors shards the way
``save_pretrained`` shards a large model. Each conversion runs alone in a fresh process
(world of one, gloo, on the CPU); after the process group is up and the modules are
imported, the peak is reset, and read after the conversion. Reported per size and
direction: the peak above that start (``VmHWM``: every resident page, including the
safetensors files mapped while they are read) and the peak anonymous memory (tensors
and heap), both as a ratio to the model's bytes (``weights``), and the checkpoint's dtype.

The ratio to the weights is what carries to 70B: peak ~= ratio x 141 GB, plus the
runtime (several hundred MiB). The target is <= 1.2 (one copy of the weights, plus one
input or output shard at a time).

    python bench/convert_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import MEMORY_ENV, MemoryTracker, common_args, report, run_worker, write_worker_result

HIDDEN, FFN, HEADS, GROUPS, VOCAB = 1024, 2816, 16, 8, 32000
LAYERS = (8, 24, 56)
SHARDS = 8


def hf_config(layers: int) -> dict:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": GROUPS,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def hf_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    dim = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (GROUPS * dim, HIDDEN),
            p + "self_attn.v_proj.weight": (GROUPS * dim, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
        }
    return shapes | {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}


def write_hf_model(folder: Path, layers: int) -> int:
    """A random bf16 model in ``SHARDS`` files with an index; returns its bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_config(layers)))
    shapes = hf_shapes(layers)
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    per_shard, shard, size, weight_map = total / SHARDS, {}, 0, {}
    files: list[dict] = []
    for name, shape in shapes.items():
        shard[name] = (torch.randn(shape) * 0.02).to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size >= per_shard:
            files.append(shard)
            shard, size = {}, 0
    if shard:
        files.append(shard)
    for k, tensors in enumerate(files):
        file = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def worker(args) -> None:
    from megatron_pwdpo.convert.hf_to_mcore import hf_to_mcore
    from megatron_pwdpo.convert.mcore_to_hf import mcore_to_hf, stored_dtype
    from megatron_pwdpo.platform import distributed

    distributed.init_distributed(
        tensor_parallel=1, pipeline_parallel=1, virtual_pipeline=None, timeout_s=600, cpu=True
    )
    tracker = MemoryTracker().start()
    if args.direction == "hf-to-mcore":
        hf_to_mcore(args.src, args.dst)
        dtype = stored_dtype(Path(args.dst) / "iter_0000000")
    else:
        mcore_to_hf(args.src, args.dst, max_shard_bytes=args.shard_bytes)
        dtype = stored_dtype(Path(args.src) / "iter_0000000")
    result = tracker.stop() | {"dtype": str(dtype).removeprefix("torch.")}
    distributed.shutdown()
    write_worker_result(args.json_out, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(parser)
    parser.add_argument("--direction", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--dst", help=argparse.SUPPRESS)
    parser.add_argument("--shard-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    layers = LAYERS[:2] if args.quick else LAYERS
    sizes, rows = [], []
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        for n in layers:
            hf, mc, back = (Path(tmp) / f"{name}{n}" for name in ("hf", "mcore", "back"))
            weights = write_hf_model(hf, n)
            entry = {"layers": n, "weights_mib": round(weights / 2**20, 1)}
            for direction, src, dst in (("hf-to-mcore", hf, mc), ("mcore-to-hf", mc, back)):
                got = run_worker(
                    "convert_memory.py",
                    ["--worker=convert", f"--direction={direction}", f"--src={src}", f"--dst={dst}"]
                    + [f"--shard-bytes={weights // SHARDS}"],
                    timeout=1800,
                    threads=2,
                    env=MEMORY_ENV,
                )
                ratio = got["peak_above_start_mib"] / entry["weights_mib"]
                anon = got["anon_above_start_mib"] / entry["weights_mib"]
                entry[direction] = got | {
                    "ratio_rss": round(ratio, 3),
                    "ratio_anon": round(anon, 3),
                }
                rows.append(
                    [
                        f"convert {direction}, {n} layers ({entry['weights_mib']:.0f} MiB "
                        f"{got['dtype']})",
                        f"peak +{got['peak_above_start_mib']:.0f} MiB",
                        f"{ratio:.2f}x weights (anon {anon:.2f}x)",
                        "<= 1.2x",
                        "yes" if ratio <= 1.2 else "no",
                    ]
                )
            back_files = sorted(p.name for p in back.glob("*.safetensors"))
            entry["hf_files_written"] = len(back_files)
            sizes.append(entry)
    report("convert_memory", {"sizes": sizes, "shards": SHARDS}, rows, args.out)


if __name__ == "__main__":
    main()
