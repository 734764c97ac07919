"""Vocab-parallel log-probs vs gathering the full logits, and chunked log-probs: peak
memory at TP=2.

Three ways to get the per-token log-probs a preference loss needs from a model whose
output layer is split over 2 tensor-parallel ranks (``V/2`` vocabulary rows each):

* ``vocab_parallel`` (what ``logprobs.model_token_logps`` does): the model's
  vocab-parallel cross-entropy; each rank only ever holds ``[b, s, V/2]``;
* ``gathered``: all-gather the logits to ``[b, s, V]`` on every rank, then
  ``log_softmax`` and pick the targets (the straightforward way; its backward takes
  this rank's slice of the gradient);
* ``chunked``: ``vocab_parallel`` with ``parallel.logprob_chunk_size`` (512 positions
  per chunk of the output layer and cross-entropy, recomputed in the backward): only
  one chunk's ``[512, b, V/2]`` logits at a time.

The model is the tiny default one with a 65536-row output layer (between the 32k and
128k vocabularies of Llama 2 and 3; the tokenizer uses the first 2048 rows), so that the
logits weigh about what they do at scale relative to the rest of the step.

Each method runs alone under ``torch.distributed.run`` (2 gloo processes, the tiny
model, HH-slice tokens cut into sequences), one forward and backward of the summed
log-probs per step, at the training shape (16 x 256) and at a long sequence
(1 x 4096; the same 4096 tokens; ``--quick``: the long sequence only). Reported: the
larger of the two ranks' peak memory during the steps (anonymous RSS, see
``common.MemoryTracker``; ``VmHWM`` too), and the size of one fp32 copy of the full
logits.

    python bench/logprobs_memory.py [--quick]
"""

from __future__ import annotations

import argparse

from common import (
    MEMORY_KEYS,
    MemoryTracker,
    bench_config,
    common_args,
    report,
    run_workers,
    set_threads,
    write_worker_result,
)

METHODS = ("vocab_parallel", "gathered", "chunked")
SHAPES = ((16, 256), (1, 4096))  # (sequences, length): 4096 tokens each
# --quick: the long shape only, whose three runs give every gated ratio (vocab-parallel
# vs gathered, and chunked vs whole-sequence); each run is two fresh ranks, ~8 CPU-s of
# start-up apiece, so the training shape's three runs would double the benchmark
QUICK_SHAPES = ((1, 4096),)
VOCAB = 65536
CHUNK = 512


def _gather_last_dim():
    import torch
    import torch.distributed as dist

    class GatherLastDim(torch.autograd.Function):
        """All-gather along the last dimension; the backward keeps this rank's slice."""

        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, x.contiguous(), group=group)
            return torch.cat(parts, dim=-1)

        @staticmethod
        def backward(ctx, grad):
            rank, size = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
            return grad.chunk(size, dim=-1)[rank].contiguous(), None

    return GatherLastDim.apply


def worker(method: str, batch: int, seq: int, steps: int, json_out: str | None) -> None:
    import warnings

    import numpy as np
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_pwdpo.data.prepare import prepare_data
    from megatron_pwdpo.model.build import ParallelConfig, build_model
    from megatron_pwdpo.model.logprobs import model_token_logps
    from megatron_pwdpo.platform import cpu_bridge, distributed

    warnings.filterwarnings("ignore")
    config = bench_config("/tmp/unused", f"model.max_seq_length={seq}", f"model.vocab_size={VOCAB}")
    data = prepare_data(config.data, vocab_size=config.model.vocab_size)
    stream = torch.from_numpy(np.concatenate([r.input_ids for r in data.train])).long()
    need = batch * (seq + 1)
    ids = stream[:need].view(batch, seq + 1)
    tokens, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    positions = torch.arange(seq).expand(batch, seq).contiguous()
    distributed.init_distributed(
        tensor_parallel=2, pipeline_parallel=1, virtual_pipeline=None, timeout_s=600
    )
    cpu_bridge.manual_seed(1234)
    chunk = CHUNK if method == "chunked" else 0
    model = build_model(config.model, ParallelConfig(tensor_parallel=2, logprob_chunk_size=chunk))
    group = ps.get_tensor_model_parallel_group()
    gather = _gather_last_dim()
    tracker = MemoryTracker().start()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        if method in ("vocab_parallel", "chunked"):
            token_logps = model_token_logps(model, tokens, positions, targets)  # [b, s]
        else:
            logits = model(tokens, positions, None)  # [b, s, V/2]
            full = gather(logits, group)  # [b, s, V] on every rank
            logp = torch.log_softmax(full.float(), dim=-1)
            token_logps = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        loss = -token_logps.sum() / token_logps.numel()
        loss.backward()
    report = {"rank": dist.get_rank(), **tracker.stop()}
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    if dist.get_rank() == 0:
        vocab = model.output_layer.weight.shape[0] * 2
        write_worker_result(
            json_out,
            {
                "method": method,
                "batch": batch,
                "seq": seq,
                "ranks": reports,
                **{k: max(r[k] for r in reports) for k in MEMORY_KEYS},
                "full_logits_mib": round(batch * seq * vocab * 4 / 2**20, 1),
                "loss": float(loss),
            },
        )
    distributed.shutdown()


def measure(steps: int, shapes=SHAPES) -> dict:
    out = {"tensor_parallel": 2, "steps": steps, "shapes": []}
    jobs = [
        {
            "script": "logprobs_memory.py",
            "args": ["--worker", m, "--batch", str(b), "--seq", str(n), "--steps", str(steps)],
            "timeout": 900,
            "nproc": 2,
            "threads": 1,
        }
        for b, n in shapes
        for m in METHODS
    ]
    done = iter(run_workers(jobs, parallel=2))
    for batch, seq in shapes:
        runs = {m: next(done) for m in METHODS}
        vp, ga, ch = runs["vocab_parallel"], runs["gathered"], runs["chunked"]
        out["shapes"].append(
            {
                "batch": batch,
                "seq": seq,
                "vocab": VOCAB,
                "chunk": CHUNK,
                "full_logits_mib": vp["full_logits_mib"],
                "same_loss": abs(vp["loss"] - ga["loss"]) < 1e-4
                and abs(vp["loss"] - ch["loss"]) < 1e-4,
                **{m: {k: runs[m][k] for k in MEMORY_KEYS} for m in METHODS},
                "peak_gathered_over_vocab_parallel": round(
                    ga["peak_anon_mib"] / vp["peak_anon_mib"], 3
                ),
                "step_peak_gathered_over_vocab_parallel": round(
                    ga["anon_above_start_mib"] / vp["anon_above_start_mib"], 3
                ),
                "saved_mib": round(ga["peak_anon_mib"] - vp["peak_anon_mib"], 1),
                "step_peak_vocab_parallel_over_chunked": round(
                    vp["anon_above_start_mib"] / ch["anon_above_start_mib"], 3
                ),
                "chunking_saved_mib": round(vp["peak_anon_mib"] - ch["peak_anon_mib"], 1),
            }
        )
    out["meets_target"] = all(s["saved_mib"] > 0 and s["same_loss"] for s in out["shapes"]) and all(
        s["chunking_saved_mib"] > 0 for s in out["shapes"] if s["seq"] > CHUNK
    )
    return out


def checks(r: dict) -> list[dict]:
    """The targets ``run_all.py`` gates on (memory repeats to within a few MiB: 2%)."""
    out = []
    for s in r["shapes"]:
        shape = f"{s['batch']}x{s['seq']}"
        out.append(
            {
                "name": f"vocab-parallel vs gathered logits {shape}: step peak ratio",
                "value": s["step_peak_gathered_over_vocab_parallel"],
                "target": 1.0,
                "noise": 0.02,
                "higher_is_better": True,
            }
        )
        if s["seq"] > s.get("chunk", CHUNK):
            out.append(
                {
                    "name": f"chunked vs whole-sequence log-probs {shape}: step peak ratio",
                    "value": s["step_peak_vocab_parallel_over_chunked"],
                    "target": 1.0,
                    "noise": 0.02,
                    "higher_is_better": True,
                }
            )
    return out


def summary_rows(r: dict) -> list[list]:
    rows = []
    for s in r["shapes"]:
        vp, ga = s["vocab_parallel"], s["gathered"]
        rows.append(
            [
                f"vocab-parallel vs gathered logits, TP=2, {s['batch']}x{s['seq']} (peak/rank)",
                f"{vp['peak_anon_mib']:.0f} vs {ga['peak_anon_mib']:.0f} "
                f"MiB (step peak {vp['anon_above_start_mib']:.0f} vs "
                f"{ga['anon_above_start_mib']:.0f}; full logits "
                f"{s['full_logits_mib']:.0f} MiB)",
                f"{s['step_peak_gathered_over_vocab_parallel']:.2f}x step peak",
                "vocab-parallel lower",
                "yes" if s["saved_mib"] > 0 else "no",
            ]
        )
        if s["seq"] <= s.get("chunk", CHUNK):
            continue  # one chunk: nothing to chunk
        ch = s["chunked"]
        rows.append(
            [
                f"chunked ({s['chunk']}) vs whole-sequence log-probs, TP=2, "
                f"{s['batch']}x{s['seq']} (peak/rank)",
                f"{ch['peak_anon_mib']:.0f} vs {vp['peak_anon_mib']:.0f} MiB (step peak "
                f"{ch['anon_above_start_mib']:.0f} vs {vp['anon_above_start_mib']:.0f})",
                f"{s['step_peak_vocab_parallel_over_chunked']:.2f}x step peak",
                "chunked lower",
                "yes" if s["chunking_saved_mib"] > 0 else "no",
            ]
        )
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(parser)
    parser.add_argument("--steps", type=int, default=1, help="forward+backward steps")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.worker:
        worker(args.worker, args.batch, args.seq, args.steps, args.json_out)
        return {}
    result = measure(1, QUICK_SHAPES) if args.quick else measure(args.steps)
    report("logprobs_memory", result, summary_rows(result), args.out)
    return result


if __name__ == "__main__":
    main()
