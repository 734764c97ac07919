"""Cost curves: step time and step-peak memory of point-wise DPO against sequence length
and rows per step, with and without chunked log-probs, ours and TRL's ``DPOTrainer``.

The tiny model (``examples/tiny_cpu.yaml``), full-length rows (HH tokens laid end to end
and cut, ``common.long_rows``: no padding on either side), a resident reference, 8 rows
per forward (micro-batch) on both sides, the global batch reached by gradient
accumulation. Points (an L through the grid, not the whole square, to fit a shared
2-core machine): sequence length 256, 512, 1024, 2048 at 8 rows a step, and 8, 16, 32,
64 rows a step at 256 positions. Sides:

* ``ours``: point-wise DPO, ``model.attention=auto`` (SDPA on CPU), whole-sequence
  log-probs;
* ``ours_chunked``: the same with ``parallel.logprob_chunk_size=128`` (the output layer
  and cross-entropy over 128 positions at a time, recomputed in the backward);
* ``trl``: TRL 1.16 ``DPOTrainer`` on pairs made of the same rows (row ``2i``'s prompt
  half, its response half as chosen and row ``2i+1``'s as rejected: the same positions
  through the policy and the reference as point-wise DPO on ``2n`` rows), SDPA, fp32.
  TRL has no chunked log-probs.

Each (point, side) runs alone in its own process, one after the other: step time is the
median CPU time of the steps after one warm-up step, memory the step peak of anonymous
RSS (``common.MemoryTracker``) over those steps (``--quick``: one step at 8 x 256,
ours and TRL, a smoke run of the workers; no plot). Writes ``bench/results/cost_curves.json``
and ``bench/results/cost_curves.png``.

    python bench/cost_curves.py [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

from common import (
    MEMORY_ENV,
    RESULTS,
    MemoryTracker,
    bench_config,
    common_args,
    long_rows,
    median,
    report,
    run_worker,
    session,
    set_threads,
    write_worker_result,
)

MICRO = 8  # rows per forward, both sides
CHUNK = 128
SEQS = (256, 512, 1024, 2048)
ROWS = (8, 16, 32, 64)
SIDES = ("ours", "ours_chunked", "trl")


def points(quick: bool) -> list[tuple[int, int]]:
    if quick:  # a smoke run of the workers: the cheapest point (not gated)
        return [(256, 8)]
    return [(seq, 8) for seq in SEQS] + [(256, rows) for rows in ROWS[1:]]


def _our_overrides(seq: int, rows: int, chunked: bool) -> list[str]:
    return [
        f"model.max_seq_length={seq}",
        f"data.seq_length={seq}",
        f"train.micro_batch_size={MICRO}",
        f"train.global_batch_size={rows}",
        f"parallel.logprob_chunk_size={CHUNK if chunked else 0}",
    ]


def _ours(seq: int, rows: int, steps: int, chunked: bool) -> dict:
    with session(*_our_overrides(seq, rows, chunked)) as s:
        every = long_rows(s.stage.examples, length=seq + 1, count=rows * (steps + 1))
        batches = [every[rows * k : rows * (k + 1)] for k in range(steps + 1)]
        s.runner.train_step(s.stage, batches[0], 1, s.optimizer)  # warm-up
        tracker, times = MemoryTracker().start(), []
        for k, batch in enumerate(batches[1:], start=2):
            start = time.process_time()
            s.runner.train_step(s.stage, batch, k, s.optimizer)
            times.append(time.process_time() - start)
        return {"step_cpu_s": times, **tracker.stop()}


def _trl(seq: int, rows: int, steps: int) -> dict:
    from transformers import TrainerCallback
    from trl_compare import trl_trainer

    from megatron_pwdpo.data.prepare import prepare_data
    from megatron_pwdpo.data.tokenize import TokenizedRow

    state: dict = {"times": []}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, st, control, **kwargs):
            if st.global_step == 1:  # after the warm-up step
                state["tracker"] = MemoryTracker().start()
            state["start"] = time.process_time()

        def on_step_end(self, args, st, control, **kwargs):
            if st.global_step >= 2:
                state["times"].append(time.process_time() - state["start"])

    with tempfile.TemporaryDirectory() as tmp:
        config = bench_config(tmp, *_our_overrides(seq, rows, False), "data.hh_mode=paired")
        config = replace(config, train=replace(config.train, global_batch_size=rows // 2))
        data = prepare_data(config.data, vocab_size=config.model.vocab_size)
        every = long_rows(data.train, length=seq + 1, count=rows * (steps + 1))
        pairs = []
        for c, r in zip(every[0::2], every[1::2], strict=True):
            rejected = TokenizedRow(
                row_index=r.row_index,
                input_ids=np_concat(c.input_ids[: c.prompt_len], r.input_ids[r.prompt_len :]),
                prompt_len=c.prompt_len,
                label=0.0,
                is_demo=False,
                id=r.id,
            )
            pairs.append((c, rejected))
        half = rows // 2
        batches = [pairs[half * k : half * (k + 1)] for k in range(steps + 1)]
        trainer = trl_trainer(
            "dpo",
            config,
            data,
            batches,
            steps=steps + 1,
            out_dir=tmp,
            callbacks=[Clock()],
            micro_batch=MICRO // 2,
        )
        trainer.train()
    return {"step_cpu_s": state["times"], **state["tracker"].stop()}


def np_concat(a, b):
    import numpy as np

    return np.concatenate([a, b])


def worker(side: str, seq: int, rows: int, steps: int, json_out: str | None) -> None:
    out = _trl(seq, rows, steps) if side == "trl" else _ours(seq, rows, steps, side != "ours")
    write_worker_result(json_out, {"side": side, "seq": seq, "rows": rows, **out})


def measure(plan: list[tuple[int, int]], steps: int, sides: tuple[str, ...]) -> dict:
    out: dict = {"steps": steps, "micro_batch_rows": MICRO, "chunk": CHUNK, "points": []}
    for seq, rows in plan:
        point: dict = {"seq": seq, "rows": rows, "tokens_per_step": seq * rows}
        for side in sides:
            args = ["--worker", side, "--seq", str(seq), "--rows", str(rows)]
            try:
                r = run_worker(
                    "cost_curves.py", [*args, "--steps", str(steps)], timeout=1200, env=MEMORY_ENV
                )
            except RuntimeError as err:
                point[side] = {"error": str(err)[-500:]}
                continue
            step = median(r["step_cpu_s"])
            point[side] = {
                "step_cpu_s": round(step, 4),
                "tokens_per_cpu_s": round(seq * rows / step, 1),
                "step_peak_anon_mib": r["anon_above_start_mib"],
                "peak_anon_mib": r["peak_anon_mib"],
            }
        if "ours" in point and "trl" in point and "error" not in point["trl"]:
            point["speed_ours_over_trl"] = round(
                point["trl"]["step_cpu_s"] / point["ours"]["step_cpu_s"], 3
            )
        out["points"].append(point)
    return out


def plot(r: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    styles = {"ours": "o-", "ours_chunked": "s--", "trl": "^-"}
    for col, (key, fixed, label) in enumerate(
        (
            ("seq", ("rows", 8), "sequence length (8 rows/step)"),
            ("rows", ("seq", 256), "rows per step (256 positions)"),
        )
    ):
        pts = [p for p in r["points"] if p[fixed[0]] == fixed[1]]
        pts.sort(key=lambda p: p[key])
        for side in SIDES:
            ok = [p for p in pts if side in p and "error" not in p[side]]
            if not ok:
                continue
            xs = [p[key] for p in ok]
            axes[0][col].plot(xs, [p[side]["step_cpu_s"] for p in ok], styles[side], label=side)
            axes[1][col].plot(
                xs, [p[side]["step_peak_anon_mib"] for p in ok], styles[side], label=side
            )
        for row, what in enumerate(("step CPU-seconds", "step peak MiB (anonymous RSS)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel(label)
            ax.set_ylabel(what)
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.suptitle("Point-wise DPO step (ours) vs TRL DPOTrainer, tiny model, 1 thread")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary_rows(r: dict) -> list[list]:
    rows = []
    for p in r["points"]:
        o, c, t = (p.get(side, {}) for side in SIDES)
        if "step_cpu_s" not in o:
            continue
        measured = f"ours {o['step_cpu_s']:.2f} s, {o['step_peak_anon_mib']:.0f} MiB"
        if "step_cpu_s" in c:
            measured += f"; chunked {c['step_cpu_s']:.2f} s, {c['step_peak_anon_mib']:.0f} MiB"
        if "step_cpu_s" in t:
            measured += f"; TRL {t['step_cpu_s']:.2f} s, {t['step_peak_anon_mib']:.0f} MiB"
        ratio = f"{p['speed_ours_over_trl']:.2f}x speed" if "speed_ours_over_trl" in p else ""
        rows.append(
            [
                f"cost curve: {p['rows']} rows x {p['seq']} (step CPU-s; step peak)",
                measured,
                ratio,
                "(a curve)",
                "",
            ]
        )
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(parser)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per point")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    steps = args.steps or (1 if args.quick else 2)
    if args.worker:
        worker(args.worker, args.seq, args.rows, steps, args.json_out)
        return {}
    from trl_compare import trl_available

    sides = SIDES if trl_available() is None else SIDES[:2]
    sides = ("ours", "trl") if args.quick and "trl" in sides else sides
    result = measure(points(args.quick), steps, sides)
    if not args.quick:
        plot(result, RESULTS / "cost_curves.png")
    report("cost_curves", result, summary_rows(result), args.out)
    return result


if __name__ == "__main__":
    main()
