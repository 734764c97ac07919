"""bf16 vs FP8 on one GPU: tokens/s/GPU and MFU of point-wise DPO training.

Each precision (``bf16``, then the FP8 recipes this GPU supports: ``delayed``,
``tensorwise``, and ``mxfp8`` on Blackwell) runs in its own process on the same model
(a Llama-3.2-1B-shaped model by default: 16 layers, width 2048, 32 heads, 8 key/value
groups, SwiGLU 8192, vocabulary 128256; random weights), the same data (the HH slice's
tokens cut into full sequences, half prompt and half response) and the same batches:
point-wise DPO with a resident reference, Megatron's optimizer (fp32 master weights),
the Transformer Engine layer spec. After ``--warmup`` steps, ``--steps`` steps are
timed (CUDA-synchronised), and the reference forward of each step is timed on its own.

Reported per precision: tokens/s/GPU (positions of the global batch per second of the
whole step), the step and reference-forward times, and MFU counted separately:

* policy MFU = 3 x forward FLOPs (forward + backward) / policy time (step minus the
  reference forward) / peak;
* reference MFU = forward FLOPs / reference-forward time / peak;
* step MFU = (4 x forward FLOPs) / step time / peak.

FLOPs are ``common.forward_flops`` (matmuls, full attention square, as Megatron
counts). The peak is the GPU's dense bf16 peak (``--peak-tflops`` overrides; FP8 runs
are also given against the dense FP8 peak). Measuring needs CUDA; without it the
script says so and exits 0. ``--cpu-dry-run`` runs the whole pipeline (worker process,
session, reference timing, FLOP and MFU arithmetic, table) on the CPU in fp32 with a
tiny model, writing nothing unless ``--out`` is given: a check of the script itself
where no GPU is lent.

``--trl`` adds the comparison with TRL's ``DPOTrainer`` and ``KTOTrainer`` on the same
GPU, model, token ids and batches (``gpu_trl.py``: resident reference, reference cache
against ``precompute_ref_log_probs``, packed HH rows against padded), with issue #24's
targets as pass/miss and, for a miss, the top kernels of one of our steps.
``--precisions ''`` runs the comparison alone.

    python bench/gpu.py [--model 1b|small] [--seq 2048] [--steps 10] [--trl]
    python bench/gpu.py --cpu-dry-run [--trl] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import (
    common_args,
    forward_flops,
    median,
    num_parameters,
    run_worker,
    session,
    table,
    write_result,
    write_worker_result,
)
from gpu_sides import trl_worker
from gpu_trl import print_trl, run_trl, trl_shape

MODELS = {
    # Llama 3.2 1B's shape (untied here, like our default)
    "1b": [
        "model.num_layers=16",
        "model.hidden_size=2048",
        "model.ffn_hidden_size=8192",
        "model.num_attention_heads=32",
        "model.num_query_groups=8",
        "model.vocab_size=128256",
        "model.rotary_base=500000",
    ],
    # the CPU dry run's (--cpu-dry-run)
    "tiny": [
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.ffn_hidden_size=128",
        "model.num_attention_heads=4",
        "model.num_query_groups=2",
    ],
    # a quick check (a few seconds per precision)
    "small": [
        "model.num_layers=8",
        "model.hidden_size=1024",
        "model.ffn_hidden_size=4096",
        "model.num_attention_heads=16",
        "model.num_query_groups=4",
        "model.vocab_size=32768",
    ],
}
# dense peak TFLOP/s (bf16, fp8) by device-name fragment, first match wins
PEAKS = (
    ("H200", 989.4, 1978.9),
    ("H100 SXM", 989.4, 1978.9),
    ("H100 80GB HBM3", 989.4, 1978.9),
    ("H100 NVL", 835.0, 1670.0),
    ("H100 PCIe", 756.0, 1513.0),
    ("H100", 989.4, 1978.9),
    ("GH200", 989.4, 1978.9),
    ("B200", 2250.0, 4500.0),
    ("L40S", 362.0, 733.0),
    ("A100", 312.0, None),
)
PRECISIONS = ("bf16", "delayed", "tensorwise", "mxfp8")


def peak_tflops(name: str) -> tuple[float | None, float | None]:
    for fragment, bf16, fp8 in PEAKS:
        if fragment in name:
            return bf16, fp8
    return None, None


def supported(precision: str) -> str | None:
    """Why ``precision`` cannot run on this GPU (None if it can)."""
    import torch

    from megatron_pwdpo.model.precision import have_transformer_engine

    if precision == "bf16":
        return None
    if not have_transformer_engine():
        return "no Transformer Engine"
    cc = torch.cuda.get_device_capability()
    if cc < (8, 9):
        return f"compute capability {cc} < 8.9"
    if precision == "mxfp8" and cc < (10, 0):
        return "MXFP8 needs Blackwell (compute capability >= 10)"
    return None


def full_rows(rows, *, seq: int, count: int):
    """``count`` rows of exactly ``seq + 1`` tokens cut from the rows' token stream
    (half prompt, half response), labels alternating 1/0."""
    import numpy as np

    from megatron_pwdpo.data.tokenize import TokenizedRow

    stream = np.concatenate([r.input_ids for r in rows])
    need = count * (seq + 1)
    stream = np.resize(stream, need)  # repeats the slice if it is shorter
    return [
        TokenizedRow(
            k,
            stream[k * (seq + 1) : (k + 1) * (seq + 1)].copy(),
            (seq + 1) // 2,
            float(k % 2),
            False,
            f"gpu-{k}",
        )
        for k in range(count)
    ]


def _sync() -> None:
    """Wait for the GPU's queued work (nothing to wait for on the CPU dry run)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _significant(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits: a fixed number of decimals would turn a
    small achieved rate (the CPU dry run's ~0.005 TFLOP/s) into 0."""
    return float(f"{x:.{digits}g}")


def worker(args) -> None:
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu (dry run)"

    overrides = [
        *MODELS[args.model],
        f"model.max_seq_length={args.seq}",
        f"data.seq_length={args.seq}",
        f"train.micro_batch_size={args.micro}",
        f"train.global_batch_size={args.global_batch}",
        f"precision.dtype={args.dtype}",
        "loss.name=pointwise_dpo",
        "loss.logp_reduction=sum",
    ]
    if args.worker != "bf16":
        overrides.append(f"precision.fp8={args.worker}")
    if args.attention_override:
        overrides.append(f"model.attention={args.attention_override}")
    steps = args.warmup + args.steps
    with session(*overrides) as s:
        runner, model = s.runner, s.config.model
        rows = full_rows(s.data.train, seq=args.seq, count=steps * args.global_batch)
        batches = [rows[k * args.global_batch : (k + 1) * args.global_batch] for k in range(steps)]
        ref_times: list[float] = []
        logps = runner.reference.logps

        def timed_logps(*a, **k):
            _sync()
            start = time.perf_counter()
            out = logps(*a, **k)
            _sync()
            ref_times.append(time.perf_counter() - start)
            return out

        runner.reference.logps = timed_logps
        step_times = []
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for k, batch in enumerate(batches):
            _sync()
            start = time.perf_counter()
            metrics, _, _, _ = runner.train_step(s.stage, batch, k + 1, s.optimizer)
            _sync()
            step_times.append(time.perf_counter() - start)
        step = median(step_times[args.warmup :])
        ref = median(ref_times[args.warmup :])
        tokens = args.global_batch * args.seq
        fwd = forward_flops(model, batch=args.global_batch, seq=args.seq)
        bf16_peak, fp8_peak = (args.peak_tflops, None) if args.peak_tflops else peak_tflops(device)
        result = {
            "precision": args.worker,
            "device": device,
            "parameters": num_parameters(model),
            "tokens_per_step": tokens,
            "median_step_s": round(step, 4),
            "median_reference_forward_s": round(ref, 4),
            "tokens_per_s_per_gpu": round(tokens / step, 1),
            "policy_tflops_per_s": _significant(3 * fwd / (step - ref) / 1e12),
            "reference_tflops_per_s": _significant(fwd / ref / 1e12),
            "step_tflops_per_s": _significant(4 * fwd / step / 1e12),
            "peak_bf16_tflops": bf16_peak,
            "peak_fp8_tflops": fp8_peak,
            "max_memory_allocated_gib": round(
                torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, 2
            ),
            "last_loss": metrics["loss"],
        }
        for key in ("policy", "reference", "step"):
            achieved = result[f"{key}_tflops_per_s"]
            if bf16_peak:
                result[f"{key}_mfu_vs_bf16_peak"] = _significant(achieved / bf16_peak)
            if fp8_peak and args.worker != "bf16":
                result[f"{key}_mfu_vs_fp8_peak"] = _significant(achieved / fp8_peak)
    write_worker_result(args.json_out, result)


def summary_rows(r: dict) -> list[list]:
    rows = []
    base = r["runs"].get("bf16")
    base = base if base and "tokens_per_s_per_gpu" in base else None
    for name, x in r["runs"].items():
        if "skipped" in x or "error" in x:
            why = "skipped: " + x["skipped"] if "skipped" in x else "failed (see the JSON)"
            rows.append([name, why, "", "", "", "", ""])
            continue
        speed = x["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] if base else float("nan")
        rows.append(
            [
                name,
                f"{x['tokens_per_s_per_gpu']:.0f}",
                f"{speed:.2f}x",
                f"{x.get('policy_mfu_vs_bf16_peak', float('nan')):.1%}",
                f"{x.get('reference_mfu_vs_bf16_peak', float('nan')):.1%}",
                f"{x.get('step_mfu_vs_bf16_peak', float('nan')):.1%}",
                f"{x['max_memory_allocated_gib']:.1f}",
            ]
        )
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(parser)
    parser.add_argument("--model", choices=sorted(MODELS), default="1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--global-batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--precisions", default=None, help=f"comma-separated, '' for none (default {PRECISIONS})"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak")
    parser.add_argument("--dtype", default=None, help="precision.dtype (bf16; dry run: fp32)")
    parser.add_argument(
        "--attention",
        default="auto",
        help="our model.attention: auto (sdpa where the config has that key), none, or a value",
    )
    parser.add_argument("--attention-override", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--trl", action="store_true", help="also compare with TRL (gpu_trl.py)")
    parser.add_argument("--comparisons", default="dpo,kto,cache,packed")
    parser.add_argument("--trl-warmup", type=int, default=1)
    parser.add_argument("--trl-steps", type=int, default=4)
    parser.add_argument("--hh-pairs", type=int, default=64, help="HH pairs per step (packed)")
    parser.add_argument(
        "--hh-micro", type=int, default=2, help="packed sequences per micro-batch (TRL: pairs)"
    )
    parser.add_argument(
        "--hh-trl-micro", type=int, default=8, help="TRL's HH pairs per padded micro-batch"
    )
    parser.add_argument("--packing", default="auto", help="auto: thd with TE, else masked")
    parser.add_argument("--budget-s", type=float, default=3600, help="stop starting workers after")
    parser.add_argument(
        "--side-min-s", type=float, default=45.0, help="start no worker with less time left"
    )
    parser.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="check the script on the CPU (fp32, tiny model, bf16 side only); writes only --out",
    )
    return parser


def precision_runs(args, shape, *, deadline: float) -> dict:
    """Each precision in its own worker process; a failure is reported, not raised."""
    runs: dict = {}
    for precision in filter(None, args.precisions.split(",")):
        why = supported(precision)
        if why:
            runs[precision] = {"skipped": why}
            continue
        passed = [
            "--model", args.model, "--seq", str(args.seq), "--micro", str(args.micro),
            "--global-batch", str(args.global_batch), "--warmup", str(args.warmup),
            "--steps", str(args.steps), "--dtype", args.dtype,
        ]  # fmt: skip
        if args.peak_tflops:
            passed += ["--peak-tflops", str(args.peak_tflops)]
        if shape.attention:
            passed += ["--attention-override", shape.attention]
        left = min(1800.0, deadline - time.monotonic())
        if left < args.side_min_s:
            runs[precision] = {"skipped": "out of the time budget"}
            continue
        try:
            runs[precision] = run_worker("gpu.py", ["--worker", precision, *passed], timeout=left)
        except RuntimeError as err:  # reported; the other runs and the comparison go on
            runs[precision] = {"error": str(err)[-3000:]}
    return runs


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    if args.worker and args.worker.startswith("trl:"):
        trl_worker(args)
        return 0
    if args.worker:
        worker(args)
        return 0
    deadline = time.monotonic() + args.budget_s
    if args.cpu_dry_run:
        args.model, args.seq, args.micro, args.global_batch = "tiny", 128, 2, 4
        args.steps, args.warmup, args.dtype = 2, 1, args.dtype or "fp32"
        args.precisions = "bf16" if args.precisions is None else args.precisions
        args.trl_warmup, args.trl_steps, args.hh_pairs, args.hh_micro = 1, 1, 4, 1
        args.hh_trl_micro, args.side_min_s = 2, 10.0
        # a 1 GFLOP/s "peak": exercises the MFU arithmetic with percentages far from 0 on any CPU
        args.peak_tflops = args.peak_tflops or 1e-3
    elif not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; nothing measured (run it on a GPU machine)")
        return 0
    args.dtype = args.dtype or "bf16"
    if args.precisions is None:
        args.precisions = ",".join(PRECISIONS)
    if args.quick:
        args.model, args.steps, args.warmup = "small", 3, 2
    shape = trl_shape(args, MODELS[args.model])
    runs = precision_runs(args, shape, deadline=deadline)
    result = {
        "model": args.model,
        "seq_length": args.seq,
        "micro_batch": args.micro,
        "global_batch": args.global_batch,
        "timed_steps": args.steps,
        "dtype": args.dtype,
        "attention": shape.attention or "the config's default",
        "runs": runs,
    }
    header = ["precision", "tokens/s/GPU", "vs bf16", "policy MFU", "ref MFU", "step MFU", "GiB"]
    if runs:
        print(table(summary_rows(result), header))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    if args.trl:
        result["trl"] = run_trl(args, shape, deadline=deadline)
        print_trl(result["trl"])
    failed = [n for n, x in runs.items() if "error" in x]
    failed += [n for n, x in result.get("trl", {}).get("sides", {}).items() if "error" in x]
    if failed:
        print(f"failed: {', '.join(failed)}")
    if args.cpu_dry_run and not args.out:
        print("cpu dry run: the pipeline works; nothing measured, nothing written")
        return 1 if failed else 0
    print(f"wrote {write_result('gpu', result, args.out)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
