"""Core attention: ``model.attention=sdpa`` vs ``local`` (Megatron's unfused attention).

Point-wise DPO with a resident reference (the reference forward runs the attention too),
the same weights, rows and global batches on both sides; between the sides only the
layers' core attention modules are swapped (``common.set_core_attention``: neither
holds parameters). Time: alternating, one step per side per round. Three shapes:

* ``hh_padded``: 16 HH rows a step, padded (2 micro-batches of 8, ~200 positions wide);
* ``hh_packed``: the same rows packed (``data.packing=masked``: the block-diagonal mask);
* ``long``: 8 rows of 1024 positions (HH tokens laid end to end, ``common.long_rows``),
  where the attention's ``s x s`` part is a larger share of the step.

Memory (``long``, each side alone in its own process): the step peak, which for
``local`` holds the ``[b, heads, s, s]`` scores, their fp32 softmax and the gradients of
both, and for ``sdpa`` none of them. Target: ``sdpa`` no slower than ``local`` (ratio
>= 1) and a lower step peak at 1024.

    python bench/attention.py [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse

from common import (
    MEMORY_KEYS,
    MemoryTracker,
    alternate,
    common_args,
    global_batches,
    long_rows,
    median,
    ratio_stats,
    report,
    row_tokens,
    run_workers,
    session,
    set_core_attention,
    set_threads,
    with_packing,
    write_worker_result,
)

KINDS = ("local", "sdpa")
LONG = 1024
LONG_OVERRIDES = [
    f"model.max_seq_length={LONG}",
    f"data.seq_length={LONG}",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
]


def _chunks(s) -> list:
    return [*s.runner.policy, *getattr(s.runner.reference, "chunks", [])]


def _time_shape(s, batches, rounds: int, config=None) -> dict:
    runner = s.runner
    if config is not None:
        runner.config = config

    def side(kind):
        def step(k):
            set_core_attention(_chunks(s), kind)
            runner.train_step(s.stage, batches[k], k + 1, s.optimizer)

        return step

    t = alternate({kind: side(kind) for kind in KINDS}, rounds=rounds, warmup=1)
    useful = [row_tokens(b) for b in batches[1:]]
    ratio, noise, _ = ratio_stats(t.cpu["local"], t.cpu["sdpa"])
    wall, _, _ = ratio_stats(t.wall["local"], t.wall["sdpa"])
    out = {"rounds": rounds, "useful_tokens_per_step": median(useful)}
    for kind in KINDS:
        out[kind] = {
            "median_step_cpu_s": round(median(t.cpu[kind]), 4),
            "tokens_per_cpu_s": round(
                median([u / x for u, x in zip(useful, t.cpu[kind], strict=True)]), 1
            ),
            "step_cpu_s": [round(x, 4) for x in t.cpu[kind]],
        }
    out["speedup_sdpa_over_local"] = round(ratio, 3)
    out["speedup_noise"] = round(noise, 3)
    out["speedup_sdpa_over_local_wall"] = round(wall, 3)
    return out


def measure_time(rounds: int) -> dict:
    out = {}
    with session() as s:
        batches = global_batches(s.stage.examples, count=rounds + 1, size=16)
        base = s.config
        out["hh_padded"] = _time_shape(s, batches, rounds, with_packing(base, "none"))
        out["hh_packed"] = _time_shape(s, batches, rounds, with_packing(base, "masked"))
    with session(*LONG_OVERRIDES) as s:
        rows = long_rows(s.stage.examples, length=LONG + 1, count=8 * (rounds + 1))
        batches = [rows[8 * k : 8 * (k + 1)] for k in range(rounds + 1)]
        out["long"] = _time_shape(s, batches, rounds)
    return out


def worker(kind: str, steps: int, json_out: str | None) -> None:
    """``long`` shape, one attention, alone: the step peak over ``steps`` steps."""
    with session(*LONG_OVERRIDES, f"model.attention={kind}") as s:
        rows = long_rows(s.stage.examples, length=LONG + 1, count=8 * steps)
        batches = [rows[8 * k : 8 * (k + 1)] for k in range(steps)]
        tracker = MemoryTracker().start()
        for k, batch in enumerate(batches):
            s.runner.train_step(s.stage, batch, k + 1, s.optimizer)
        write_worker_result(json_out, {"side": kind, **tracker.stop()})


def measure(rounds: int, memory_steps: int) -> dict:
    out = measure_time(rounds)
    jobs = [
        {"script": "attention.py", "args": ["--worker", kind, "--steps", str(memory_steps)]}
        for kind in KINDS
    ]
    memory = dict(zip(KINDS, run_workers([{**j, "timeout": 900} for j in jobs]), strict=True))
    out["long_memory"] = {kind: {k: memory[kind][k] for k in MEMORY_KEYS} for kind in KINDS}
    out["long_memory"]["step_peak_local_over_sdpa"] = round(
        memory["local"]["anon_above_start_mib"] / memory["sdpa"]["anon_above_start_mib"], 3
    )
    return out


SHAPES = {
    "hh_padded": "16 HH rows padded",
    "hh_packed": "16 HH rows packed (mask)",
    "long": f"8 rows x {LONG}",
}


def checks(r: dict) -> list[dict]:
    """The targets ``run_all.py`` gates on: sdpa no slower, and lighter at 1024."""
    out = [
        {
            "name": f"sdpa vs local attention, {SHAPES[shape]}: speed",
            "value": r[shape]["speedup_sdpa_over_local"],
            "target": 1.0,
            "noise": r[shape]["speedup_noise"],
            "higher_is_better": True,
        }
        for shape in SHAPES
    ]
    out.append(
        {
            "name": f"sdpa vs local attention, 8 x {LONG}: step peak ratio",
            "value": r["long_memory"]["step_peak_local_over_sdpa"],
            "target": 1.0,
            "noise": 0.02,
            "higher_is_better": True,
        }
    )
    return out


def summary_rows(r: dict) -> list[list]:
    rows = []
    for shape, what in SHAPES.items():
        x = r[shape]
        rows.append(
            [
                f"sdpa vs local attention, point-wise DPO, resident reference, {what}",
                f"{x['sdpa']['tokens_per_cpu_s']:.0f} vs {x['local']['tokens_per_cpu_s']:.0f} "
                "tok/CPU-s",
                f"{x['speedup_sdpa_over_local']:.2f}x ± {x['speedup_noise']:.2f} "
                f"(wall {x['speedup_sdpa_over_local_wall']:.2f}x)",
                ">= 1",
                "yes" if x["speedup_sdpa_over_local"] >= 1 else "no",
            ]
        )
    m = r["long_memory"]
    rows.append(
        [
            f"sdpa vs local attention, step peak, 8 x {LONG}",
            f"{m['sdpa']['anon_above_start_mib']:.0f} vs "
            f"{m['local']['anon_above_start_mib']:.0f} MiB",
            f"{m['step_peak_local_over_sdpa']:.2f}x lower",
            "lower",
            "yes" if m["step_peak_local_over_sdpa"] > 1 else "no",
        ]
    )
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(parser)
    parser.add_argument("--steps", type=int, default=1, help="steps of a memory worker")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.worker:
        worker(args.worker, args.steps, args.json_out)
        return {}
    rounds = args.rounds or (3 if args.quick else 5)  # quick: >= 3 for the noise
    result = measure(rounds, args.steps)
    report("attention", result, summary_rows(result), args.out)
    return result


if __name__ == "__main__":
    main()
