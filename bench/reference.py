"""Reference strategies: ``cache`` vs ``resident`` vs SFT (no reference at all).

Three sides train the same policy on the same global batches of 16 HH rows:

* ``sft``: the SFT loss, no reference: the floor any preference step can reach;
* ``resident``: point-wise DPO with a frozen reference copy, one reference forward
  per global batch (``reference.mode=resident``);
* ``cache``: point-wise DPO with the reference log-probs looked up by row
  (``reference.mode=cache``'s ``CacheReference``; the table is filled here by the
  resident reference over the benchmark's rows, as ``precompute-ref`` would do
  offline, since only the training step is timed).

Step time: alternating, one step per side per round. Peak memory: each side alone in
its own process (the ``cache`` process builds no reference model), on the tiny model
and on a 4x wider one (14M parameters, 8 rows per step), where the reference's weights
(53 MiB) are large enough to show above the runtime's RSS noise. Target: ``cache``
within 5% of SFT in step time and in peak memory.

The ceiling ratio (a CPU "MFU"): each side's model FLOPs per CPU-second
(``common.forward_flops`` over the positions its micro-batches run, padding included:
3 forward passes for the policy's forward and backward, plus 1 for a resident
reference) divided by the dense fp32 matmul FLOPs per CPU-second of the same process at
the same thread count, measured in the same run (``common.matmul_flops_per_cpu_s``).

    python bench/reference.py [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from common import (
    MEMORY_KEYS,
    MemoryTracker,
    alternate,
    common_args,
    forward_flops,
    global_batches,
    matmul_flops_per_cpu_s,
    median,
    num_parameters,
    ratio_of_rounds,
    ratio_stats,
    report,
    run_workers,
    session,
    set_threads,
    write_worker_result,
)

SIDES = ("sft", "resident", "cache")
# memory is measured on the tiny model and on a 4x wider one (14M parameters, 8 rows per
# step), whose reference weights (53 MiB) stand out of the runtime's RSS noise
MEMORY_MODELS = {
    "tiny": [],
    "wide": [
        "model.hidden_size=512",
        "model.ffn_hidden_size=1408",
        "model.num_attention_heads=8",
        "model.num_query_groups=4",
        "train.micro_batch_size=8",
        "train.global_batch_size=8",
    ],
}


def _cache_reference(runner, batches, reduction: str):
    """A ``CacheReference`` holding the current reference log-probs of ``batches``' rows."""
    import torch

    from megatron_pwdpo.reference.strategies import CacheReference

    rows = {r.row_index: r for batch in batches for r in batch}
    table = torch.full((max(rows) + 1,), float("nan"))
    for batch in batches:
        micro = runner._micro_batches(batch)
        for mb, logps in zip(
            micro, runner.reference.logps(micro, reduction=reduction), strict=True
        ):
            table[mb["row_index"]] = logps.float()
    return CacheReference(table, rebatch=runner._micro_batches, is_last_stage=True)


def _stages(stage):
    sft = replace(stage, loss=replace(stage.loss, name="sft", logp_reduction="mean"))
    return {"sft": sft, "resident": stage, "cache": stage}


def measure_time(rounds: int) -> dict:
    with session() as s:
        runner, stage = s.runner, s.stage
        batches = global_batches(
            stage.examples, count=rounds + 1, size=s.config.train.global_batch_size
        )
        references = {
            "sft": None,
            "resident": runner.reference,
            "cache": _cache_reference(runner, batches, stage.loss.logp_reduction),
        }
        stages = _stages(stage)

        def side(name):
            def step(k):
                runner.reference = references[name]
                runner.train_step(stages[name], batches[k], k + 1, s.optimizer)

            return step

        timings = alternate({name: side(name) for name in SIDES}, rounds=rounds, warmup=1)
        params = num_parameters(s.config.model)
        # the ceiling: dense matmul FLOPs per CPU-second, this process, same threads
        matmul = matmul_flops_per_cpu_s()
        shapes = [[m["tokens"].shape for m in runner._micro_batches(b)] for b in batches[1:]]
        model = s.config.model
    # model FLOPs of a step: forward + backward (3 x forward) of the policy over the
    # positions it runs (padding included; common.forward_flops), plus one reference
    # forward when resident
    forward = [sum(forward_flops(model, batch=b, seq=w) for b, w in mbs) for mbs in shapes]
    passes = {"sft": 3, "cache": 3, "resident": 4}
    mfu = {
        side: median(
            [passes[side] * f / x for f, x in zip(forward, timings.cpu[side], strict=True)]
        )
        / matmul
        for side in SIDES
    }
    positions = [sum(b * w for b, w in mbs) for mbs in shapes]
    return {
        "timings": timings,
        "matmul_gflops_per_cpu_s": round(matmul / 1e9, 2),
        "cpu_mfu": {side: round(v, 4) for side, v in mfu.items()},
        "positions_per_step": median(positions),
        "reference_parameters": params,
        "cache_table_bytes": 4 * (max(r.row_index for r in s.data.train) + 1),
    }


def worker(side: str, steps: int, model: str, json_out: str) -> None:
    """One side alone: set up (a ``cache`` side builds no reference model), reset the
    peak memory, train ``steps`` steps, report the peak."""
    with session(*MEMORY_MODELS[model], reference=side == "resident") as s:
        runner, stage = s.runner, s.stage
        batches = global_batches(stage.examples, count=steps, size=s.config.train.global_batch_size)
        if side == "cache":
            # a table of placeholder log-probs: a lookup costs the same whatever it holds,
            # and filling it with a forward pass here would leave that pass's freed
            # activations in this process's RSS
            import torch

            from megatron_pwdpo.reference.strategies import CacheReference

            size = max(r.row_index for r in s.data.train) + 1
            runner.reference = CacheReference(
                torch.zeros(size), rebatch=runner._micro_batches, is_last_stage=True
            )
        stages = _stages(stage)
        tracker = MemoryTracker().start()
        for k, batch in enumerate(batches):
            runner.train_step(stages[side], batch, k + 1, s.optimizer)
        memory = tracker.stop()
        weights = sum(p.numel() * p.element_size() for c in runner.policy for p in c.parameters())
        write_worker_result(
            json_out,
            {
                "side": side,
                "model": model,
                "weights_mib": round(weights / 2**20, 2),
                **memory,
            },
        )


def measure(rounds: int, memory_steps: int) -> dict:
    timing = measure_time(rounds)
    t = timing["timings"]
    jobs = [
        {
            "script": "reference.py",
            "args": ["--worker", side, "--steps", str(memory_steps), "--model", model],
            "timeout": 900,
        }
        for model in MEMORY_MODELS
        for side in SIDES
    ]
    runs = iter(run_workers(jobs, parallel=3))
    memory = {model: {side: next(runs) for side in SIDES} for model in MEMORY_MODELS}
    out = {"rounds": rounds, "memory_steps": memory_steps}
    for side in SIDES:
        out[side] = {
            "median_step_s": round(median(t.wall[side]), 4),
            "median_step_cpu_s": round(median(t.cpu[side]), 4),
            "step_s": [round(x, 4) for x in t.wall[side]],
            "step_cpu_s": [round(x, 4) for x in t.cpu[side]],
        }
    for a, b in (("cache", "sft"), ("resident", "sft"), ("resident", "cache")):
        out[f"step_time_{a}_over_{b}"] = round(ratio_of_rounds(t.cpu[a], t.cpu[b]), 3)
        out[f"step_time_{a}_over_{b}_wall"] = round(ratio_of_rounds(t.wall[a], t.wall[b]), 3)
    out["memory"] = {}
    for model, runs_of in memory.items():
        m = {side: {k: runs_of[side][k] for k in MEMORY_KEYS} for side in SIDES}
        m["reference_weights_mib"] = runs_of["sft"]["weights_mib"]
        for side in ("resident", "cache"):
            m[f"peak_{side}_over_sft"] = round(
                runs_of[side]["peak_anon_mib"] / runs_of["sft"]["peak_anon_mib"], 3
            )
            m[f"peak_{side}_minus_sft_mib"] = round(
                runs_of[side]["peak_anon_mib"] - runs_of["sft"]["peak_anon_mib"], 1
            )
        out["memory"][model] = m
    out["cache_table_mib"] = round(timing["cache_table_bytes"] / 2**20, 4)
    out["step_time_cache_over_sft_noise"] = round(ratio_stats(t.cpu["cache"], t.cpu["sft"])[1], 3)
    for key in ("matmul_gflops_per_cpu_s", "cpu_mfu", "positions_per_step"):
        out[key] = timing[key]
    out["target_cache_over_sft"] = 1.05
    out["meets_target"] = out["step_time_cache_over_sft"] <= 1.05 and all(
        m["peak_cache_over_sft"] <= 1.05 for m in out["memory"].values()
    )
    return out


def checks(r: dict) -> list[dict]:
    """The targets ``run_all.py`` gates on."""
    out = [
        {
            "name": "reference cache vs SFT: step time",
            "value": r["step_time_cache_over_sft"],
            "target": r["target_cache_over_sft"],
            "noise": r["step_time_cache_over_sft_noise"],
            "higher_is_better": False,
        }
    ]
    for model, m in r["memory"].items():
        out.append(
            {
                "name": f"reference cache vs SFT: peak memory, {model} model",
                "value": m["peak_cache_over_sft"],
                "target": r["target_cache_over_sft"],
                "noise": 0.01,  # the memory numbers repeat to within ~1 MiB of ~500
                "higher_is_better": False,
            }
        )
    return out


def summary_rows(r: dict) -> list[list]:
    ms = {side: 1000 * r[side]["median_step_cpu_s"] for side in SIDES}
    rows = [
        [
            "reference cache vs SFT (step time)",
            f"{ms['cache']:.0f} vs {ms['sft']:.0f} CPU-ms/step",
            f"{r['step_time_cache_over_sft']:.3f} (wall {r['step_time_cache_over_sft_wall']:.3f})",
            "<= 1.05",
            "yes" if r["step_time_cache_over_sft"] <= 1.05 else "no",
        ],
        [
            "reference resident vs SFT (step time)",
            f"{ms['resident']:.0f} vs {ms['sft']:.0f} CPU-ms/step",
            f"{r['step_time_resident_over_sft']:.3f} "
            f"(wall {r['step_time_resident_over_sft_wall']:.3f})",
            "(what cache removes)",
            "",
        ],
    ]
    if "cpu_mfu" in r:
        mfu = r["cpu_mfu"]
        rows.append(
            [
                "CPU 'MFU': step model FLOPs per CPU-s / dense matmul FLOPs per CPU-s "
                "(SFT / point-wise DPO with cache / resident reference)",
                f"matmul {r['matmul_gflops_per_cpu_s']:.1f} GFLOP/CPU-s (512x512 fp32, "
                f"1 thread); {r['positions_per_step']:.0f} positions/step",
                f"{mfu['sft']:.3f} / {mfu['cache']:.3f} / {mfu['resident']:.3f}",
                "(a ceiling ratio)",
                "",
            ]
        )
    for model, m in r["memory"].items():
        rows.append(
            [
                f"reference peak memory, {model} model: SFT / resident / cache",
                f"{m['sft']['peak_anon_mib']:.0f} / {m['resident']['peak_anon_mib']:.0f} / "
                f"{m['cache']['peak_anon_mib']:.0f} MiB (reference weights "
                f"{m['reference_weights_mib']:.1f} MiB)",
                f"{m['peak_resident_over_sft']:.3f} / {m['peak_cache_over_sft']:.3f}",
                "cache <= 1.05",
                "yes" if m["peak_cache_over_sft"] <= 1.05 else "no",
            ]
        )
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(parser)
    parser.add_argument("--steps", type=int, default=2, help="steps of a memory worker")
    parser.add_argument("--model", choices=sorted(MEMORY_MODELS), default="tiny")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.worker:
        worker(args.worker, args.steps, args.model, args.json_out)
        return {}
    rounds = args.rounds or (3 if args.quick else 8)  # quick: >= 3 for the noise
    result = measure(rounds, 1 if args.quick else args.steps)
    report("reference", result, summary_rows(result), args.out)
    return result


if __name__ == "__main__":
    main()
