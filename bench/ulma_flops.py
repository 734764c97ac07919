"""ULMA's skipped reference forwards: reference FLOPs saved vs the share of demonstrations.

ULMA trains demonstrations with the SFT term alone, so the reference never runs on
them (``reference/strategies.py``: the other rows are re-batched and run). The same global
batches of 16 HH rows are given demonstration shares of 0, 1/4, 1/2, 3/4 and 1 (the
demonstrations at each share include those of the smaller shares); for each share the
reference pass of ``Reference.logps(..., rows=...)`` is timed (alternating the shares
round by round) and the positions the reference model actually ran are counted with a
forward hook, then turned into FLOPs (``common.forward_flops``).

Target: the reference FLOPs saved are at least the demonstrations' share of the tokens
(re-batching the remaining rows pads them to their own longest row, so the saving in
padded positions can be a little larger); at share 1 the reference does not run.

    python bench/ulma_flops.py [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
from common import (
    alternate,
    common_args,
    forward_flops,
    global_batches,
    median,
    report,
    row_tokens,
    session,
    set_threads,
    table,
)

SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


def with_demos(batch, share: float, order: np.ndarray) -> list:
    """The batch with its first ``share`` rows (in ``order``) made demonstrations
    (label 1) and the others feedback rows (their own labels)."""
    demos = set(order[: round(share * len(batch))].tolist())
    return [
        replace(r, is_demo=True, label=1.0) if i in demos else replace(r, is_demo=False)
        for i, r in enumerate(batch)
    ]


def measure(rounds: int) -> dict:
    from megatron_pwdpo.reference.strategies import unwrap

    with session("loss.name=ulma") as s:
        runner, stage, model = s.runner, s.stage, s.config.model
        size = s.config.train.global_batch_size
        rng = np.random.default_rng(0)
        batches = global_batches(stage.examples, count=rounds + 1, size=size)
        orders = [rng.permutation(len(b)) for b in batches]
        variants = {
            f: [with_demos(b, f, o) for b, o in zip(batches, orders, strict=True)] for f in SHARES
        }
        shapes: list[tuple[int, int]] = []

        def count(_module, args, kwargs):
            tokens = args[0] if args else kwargs["input_ids"]
            shapes.append(tuple(tokens.shape))

        hooks = [
            unwrap(c).register_forward_pre_hook(count, with_kwargs=True)
            for c in runner.reference.chunks
        ]
        flops = {f: [] for f in SHARES}
        positions = {f: [] for f in SHARES}

        def side(share):
            def run(k):
                rows = variants[share][k]
                micro = runner._micro_batches(rows)
                shapes.clear()
                runner.reference.logps(
                    micro,
                    reduction=stage.loss.logp_reduction,
                    rows={r.row_index: r for r in rows},
                )
                if k >= 1:
                    positions[share].append(sum(b * n for b, n in shapes))
                    flops[share].append(
                        sum(forward_flops(model, batch=b, seq=n) for b, n in shapes)
                    )

            return run

        times = alternate({f: side(f) for f in SHARES}, rounds=rounds, warmup=1).cpu
        for hook in hooks:
            hook.remove()
        demo_tokens = {
            f: sum(row_tokens([r for r in rows if r.is_demo]) for rows in variants[f][1:])
            / sum(row_tokens(rows) for rows in variants[f][1:])
            for f in SHARES
        }
    base_flops, base_time = sum(flops[0.0]), median(times[0.0])
    out = {"rounds": rounds, "global_batch_rows": size, "shares": []}
    for f in SHARES:
        saved = 1 - sum(flops[f]) / base_flops
        out["shares"].append(
            {
                "demo_share_rows": f,
                "demo_share_tokens": round(demo_tokens[f], 4),
                "reference_positions_per_batch": round(float(np.mean(positions[f])), 1),
                "reference_gflops_per_batch": round(float(np.mean(flops[f])) / 1e9, 4),
                "reference_flops_saved": round(saved, 4),
                "median_reference_pass_cpu_s": round(median(times[f]), 4),
                "reference_time_saved": round(1 - median(times[f]) / base_time, 4),
            }
        )
    # skipping saves at least the demonstrations' share of the tokens (the rest is padding)
    out["meets_target"] = all(
        x["reference_flops_saved"] >= x["demo_share_tokens"] - 0.02 for x in out["shares"]
    )
    return out


def checks(r: dict) -> list[dict]:
    """The targets ``run_all.py`` gates on: FLOPs are counted, not timed (no noise; the
    0.02 allows the rounding of shares to rows)."""
    return [
        {
            "name": f"ULMA: reference FLOPs saved at demo share {x['demo_share_rows']:.2f}",
            "value": x["reference_flops_saved"],
            "target": x["demo_share_tokens"],
            "noise": 0.02,
            "higher_is_better": True,
        }
        for x in r["shares"]
    ]


def summary_rows(r: dict) -> list[list]:
    half = next(x for x in r["shares"] if x["demo_share_rows"] == 0.5)
    every = ", ".join(
        f"{x['demo_share_rows']:.2f}->{x['reference_flops_saved']:.2f}" for x in r["shares"]
    )
    return [
        [
            "ULMA: reference FLOPs saved vs demo share (rows)",
            every,
            f"{half['reference_flops_saved']:.2f} at 1/2 (tokens {half['demo_share_tokens']:.2f})",
            ">= demo share of tokens",
            "yes" if r["meets_target"] else "no",
        ]
    ]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(parser)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 6)
    result = measure(rounds)
    rows = [
        [
            x["demo_share_rows"],
            x["demo_share_tokens"],
            x["reference_positions_per_batch"],
            x["reference_flops_saved"],
            x["reference_time_saved"],
        ]
        for x in result["shares"]
    ]
    print(
        table(
            rows, ["demo share", "demo token share", "ref positions", "FLOPs saved", "time saved"]
        )
    )
    report("ulma_flops", result, summary_rows(result), args.out)
    return result


if __name__ == "__main__":
    main()
