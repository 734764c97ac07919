"""Ours against TRL's ``DPOTrainer`` and ``KTOTrainer`` on one GPU (``bench/gpu.py --trl``).

Four comparisons, each a pair of sides (every side in its own process on the GPU, so
its peak memory is its own; ``--cpu-dry-run`` runs them one after another in one
process on the CPU):

* ``dpo``: DPO with a resident reference (ours: Megatron-Core, ``loss.name=dpo``; TRL:
  ``DPOTrainer`` with a reference model), full rows of ``seq + 1`` tokens (half prompt,
  two different halves as chosen and rejected) cut from the HH slice's token stream;
* ``kto``: the same for KTO (unpaired rows, labels alternating; both sides run
  mismatched KL rows, each row's prompt with a neighbour's response);
* ``cache``: DPO with precomputed reference log-probs (ours: ``CacheReference``, the
  table a ``reference.mode=cache`` run reads, filled by a forward pass before timing;
  TRL: ``precompute_ref_log_probs=True``, no reference model kept);
* ``packed``: DPO on the real HH rows (``examples/data``, our tokenizer), ours packed
  (``data.packing``: ``thd`` with Transformer Engine, else ``masked``; ``--hh-micro``
  sequences of ``seq`` per micro-batch) against TRL padded to each micro-batch's
  longest row (``--hh-trl-micro`` pairs per micro-batch), the same pairs per step.

Both sides: the same weights (ours are built from the run's seed; the first of our
sides writes them through the project's Hugging Face conversion,
``convert.table.mcore_to_hf_state``, and TRL loads that folder), the same token ids
(TRL is handed ``prompt_ids``/``chosen_ids``/... and skips its tokenisation), the same
global batches in the same order and rows per forward (TRL: ``per_device_train_batch_size``
= our micro-batch, gradient accumulation up to the global batch), Adam (beta2 0.95),
the same learning rate, clipping 1.0, beta 0.1, summed log-probs. Precision: ours
``precision.dtype`` (bf16: Megatron's mixed-precision optimizer), TRL ``bf16=True``
(autocast, fp32 weights); attention: TRL SDPA, ours ``model.attention`` where the
config has that key (``--attention``). Each side records the log-probs of two probe
rows before training: equal on both sides (to bf16 rounding) shows the weights and
tokens are the same.

How each side is measured is in ``gpu_sides.py``. Reported per side: useful tokens/s
(the rows' own positions, no padding, no KL rows: median over the timed steps,
CUDA-synchronised), peak memory (GPU: ``max_memory_allocated`` over the steps; CPU dry
run: peak anonymous RSS), first and last loss; for our sides, a ``torch.profiler``
table of one more step's top kernels.
"""

from __future__ import annotations

import json
import tempfile
import time
import typing
from dataclasses import dataclass
from pathlib import Path

from common import global_batches, run_worker, table

BETA, LR = 0.1, 3e-4
COMPARISONS = {  # in the order they run (what a short time budget leaves out comes last)
    "dpo": ("ours_dpo", "trl_dpo"),
    "cache": ("ours_dpo_cache", "trl_dpo_precompute"),
    "packed": ("ours_hh_packed", "trl_hh_padded"),
    "kto": ("ours_kto", "trl_kto"),
}
SIDES = [side for pair in COMPARISONS.values() for side in pair]
# issue #24 item 7: (comparison, minimum speed ours/TRL, maximum memory ours/TRL or None)
TARGETS = (
    ("dpo", 1.0, 1.0),
    ("cache", 1.5, None),
    ("packed", 2.0, None),
    ("kto", 1.0, 1.0),
)


@dataclass(frozen=True)
class Shape:
    """What both sides of every comparison share (rows: sequences of the batch)."""

    model: list[str]  # our model overrides (common to both sides through the conversion)
    seq: int
    micro_rows: int
    global_rows: int
    hh_global_pairs: int
    hh_micro: int  # ours: packed sequences per micro-batch
    hh_trl_micro_pairs: int  # TRL: pairs per (padded) micro-batch
    warmup: int
    steps: int
    dtype: str
    attention: str | None  # our model.attention override, None = the config's default
    packing: str

    @property
    def steps_total(self) -> int:
        return self.warmup + self.steps


def attention_override(requested: str) -> str | None:
    """``model.attention`` to pass to our side, or None where the config has no such key.

    ``auto`` picks ``sdpa`` when ``ModelConfig`` has an ``attention`` field that allows
    it (SDPA is what TRL runs); ``none`` passes nothing."""
    from megatron_pwdpo.model.build import ModelConfig

    if requested == "none":
        return None
    hints = typing.get_type_hints(ModelConfig)
    if "attention" not in hints:
        if requested != "auto":
            raise SystemExit(f"--attention {requested}: ModelConfig has no 'attention' field")
        return None
    if requested == "auto":
        return "sdpa" if "sdpa" in typing.get_args(hints["attention"]) else None
    return requested


def packing_kind(requested: str) -> str:
    """``thd`` with Transformer Engine on a GPU, else ``masked`` (``auto``)."""
    import torch

    from megatron_pwdpo.model.precision import have_transformer_engine

    if requested != "auto":
        return requested
    return "thd" if torch.cuda.is_available() and have_transformer_engine() else "masked"


# ------------------------------------------------------------------ the rows


def _loss(side: str) -> str:
    return "kto" if "kto" in side else "dpo"


def overrides(side: str, shape: Shape) -> list[str]:
    """Our config for a side (the TRL side reads its data and sizes from the same)."""
    loss = _loss(side)
    hh = "hh" in side
    seq = shape.seq
    out = [
        *shape.model,
        f"model.max_seq_length={seq}",
        f"data.seq_length={seq}",
        f"precision.dtype={shape.dtype}",
        f"loss.name={loss}",
        f"loss.beta={BETA}",
        "loss.logp_reduction=sum",
        f"train.lr={LR}",
        "train.warmup_steps=0",
        "train.min_lr=0",
        "data.hh_mode=" + ("unpaired" if loss == "kto" else "paired"),
    ]
    if shape.attention:
        out.append(f"model.attention={shape.attention}")
    if hh:
        out += [
            f"data.packing={shape.packing}" if side.startswith("ours") else "data.packing=none",
            "train.micro_batch_size="
            + str(shape.hh_micro if side.startswith("ours") else shape.hh_trl_micro_pairs),
            f"train.global_batch_size={shape.hh_global_pairs}",
        ]
    else:
        per = 1 if loss == "kto" else 2  # rows per example
        out += [
            f"train.micro_batch_size={shape.micro_rows // per}",
            f"train.global_batch_size={shape.global_rows // per}",
        ]
    return out


def synthetic_examples(rows, *, loss: str, seq: int, count: int) -> list:
    """``count`` examples of full rows (``seq + 1`` tokens) cut from the rows' token
    stream: KTO rows (half prompt, labels alternating 1/0) or DPO pairs (one prompt,
    two different responses)."""
    import numpy as np

    from megatron_pwdpo.data.tokenize import TokenizedRow

    stream = np.concatenate([r.input_ids for r in rows])
    n, p = seq + 1, (seq + 1) // 2
    if loss == "kto":
        stream = np.resize(stream, count * n)
        return [
            TokenizedRow(k, stream[k * n : (k + 1) * n].copy(), p, float(k % 2), False, f"g{k}")
            for k in range(count)
        ]
    r = n - p
    unit = p + 2 * r
    stream = np.resize(stream, count * unit)
    out = []
    for k in range(count):
        prompt, a, b = np.split(stream[k * unit : (k + 1) * unit], [p, p + r])
        chosen = TokenizedRow(2 * k, np.concatenate([prompt, a]), p, 1.0, False, f"g{k}c")
        rejected = TokenizedRow(2 * k + 1, np.concatenate([prompt, b]), p, 0.0, False, f"g{k}r")
        out.append((chosen, rejected))
    return out


def side_data(side: str, shape: Shape, run_dir: str):
    """``(config, data, global batches)`` of a side, without building a model (TRL's)."""
    from common import bench_config

    from megatron_pwdpo.data.prepare import prepare_data

    config = bench_config(run_dir, *overrides(side, shape))
    data = prepare_data(config.data, vocab_size=config.model.vocab_size)
    return config, data, side_batches(side, shape, config, data)


def side_batches(side: str, shape: Shape, config, data) -> list[list]:
    """The global batches of a side, from its config and prepared data: the same on our
    side and on TRL's."""
    from megatron_pwdpo.training.plan import plan_stages

    size = config.train.global_batch_size
    if "hh" in side:
        stage = plan_stages(config, data)[-1]
        batches = global_batches(stage.examples, count=shape.steps_total, size=size)
    else:
        flat = synthetic_examples(
            data.train, loss=_loss(side), seq=shape.seq, count=size * shape.steps_total
        )
        batches = [flat[k * size : (k + 1) * size] for k in range(shape.steps_total)]
    return batches


def probe_rows(batches) -> list:
    """The first two rows of the first batch: both sides report their log-probs."""
    first = batches[0]
    rows = [x for e in first for x in (e if isinstance(e, tuple) else (e,))]
    return rows[:2]


# ------------------------------------------------------------------ the comparison


def compare(sides: dict[str, dict]) -> dict:
    """Per comparison: speed and memory ratios (ours / TRL) and the probe agreement."""
    out = {}
    for name, (a, b) in COMPARISONS.items():
        x, y = sides.get(a, {}), sides.get(b, {})
        row: dict = {"ours": a, "trl": b}
        if "tokens_per_s" in x and "tokens_per_s" in y:
            row["speed_ours_over_trl"] = round(x["tokens_per_s"] / y["tokens_per_s"], 3)
            if y["peak_gib"] > 0:
                row["memory_ours_over_trl"] = round(x["peak_gib"] / y["peak_gib"], 3)
            pa, pb = x["probe_logps"], y["probe_logps"]
            row["probe_max_rel_diff"] = max(
                abs(u - v) / max(abs(v), 1e-9) for u, v in zip(pa, pb, strict=True)
            )
            if x.get("last_loss") is not None and y.get("last_loss") is not None:
                # the same weights, rows and optimizer: the curves agree to rounding
                row["last_loss_rel_diff"] = abs(x["last_loss"] - y["last_loss"]) / max(
                    abs(y["last_loss"]), 1e-9
                )
            row["trl_weights"] = y.get("weights")
        else:
            why = [
                f"{n}: {s.get('error') or s.get('skipped') or 'not run'}"
                for n, s in ((a, x), (b, y))
                if "tokens_per_s" not in s
            ]
            row["not_compared"] = "; ".join(why)
        out[name] = row
    return out


def targets(comparisons: dict, sides: dict) -> list[dict]:
    """Issue #24 item 7's targets, each ``pass``, ``miss`` or ``not measured``; a miss
    carries our side's profile (the top kernels of one step)."""
    out = []
    for name, speed_min, memory_max in TARGETS:
        c = comparisons[name]
        want = f"speed >= {speed_min}x TRL" + (
            f", memory <= {memory_max}x TRL" if memory_max else ""
        )
        row = {"comparison": name, "target": want}
        if "speed_ours_over_trl" not in c:
            row.update(status="not measured", why=c.get("not_compared", ""))
        else:
            misses = []
            if c["speed_ours_over_trl"] < speed_min:
                misses.append(f"speed {c['speed_ours_over_trl']:.2f}x < {speed_min}x")
            memory = c.get("memory_ours_over_trl")
            if memory_max and (memory is None or memory > memory_max):
                misses.append(f"memory {memory}x > {memory_max}x")
            row.update(status="miss" if misses else "pass", measured=c, misses=misses)
            if misses:
                row["profile"] = sides[c["ours"]].get("profile", [])
        out.append(row)
    return out


# ------------------------------------------------------------------ the TRL comparison


def trl_shape(args, model: list[str]) -> Shape:
    """The comparison's shape from ``bench/gpu.py``'s arguments."""
    return Shape(
        model=model,
        seq=args.seq,
        micro_rows=args.micro,
        global_rows=args.global_batch,
        hh_global_pairs=args.hh_pairs,
        hh_micro=args.hh_micro,
        hh_trl_micro_pairs=args.hh_trl_micro,
        warmup=args.trl_warmup,
        steps=args.trl_steps,
        dtype=args.dtype,
        attention=attention_override(args.attention),
        packing=packing_kind(args.packing),
    )


def run_trl(args, shape, *, deadline: float) -> dict:
    """Every side of the comparison (each in its own process; the dry run's in one),
    then the ratios and targets."""
    from dataclasses import asdict

    wanted = [s for name in args.comparisons.split(",") for s in COMPARISONS[name]]
    sides = [s for s in SIDES if s in wanted]
    groups = [sides] if args.cpu_dry_run else [[s] for s in sides]
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu-trl-") as tmp:
        hf_dir = Path(tmp) / "hf"  # our first side writes it, TRL's sides read it
        for group in groups:
            left = deadline - time.monotonic()
            if left < args.side_min_s:
                results.update({s: {"side": s, "skipped": "out of the time budget"} for s in group})
                continue
            passed = ["--shape", json.dumps(asdict(shape)), "--hf-dir", str(hf_dir)]
            try:
                got = run_worker(
                    "gpu.py", ["--worker", "trl:" + ",".join(group), *passed], timeout=left
                )
                results.update(got["sides"])
            except RuntimeError as err:  # the process died or timed out: say so per side
                results.update({s: {"side": s, "error": str(err)[-3000:]} for s in group})
    comparisons = compare(results)
    return {
        "shape": asdict(shape),
        "sides": results,
        "comparisons": comparisons,
        "targets": targets(comparisons, results),
    }


def trl_rows(r: dict) -> list[list]:
    rows = []
    for name, c in r["comparisons"].items():
        x, y = r["sides"].get(c["ours"], {}), r["sides"].get(c["trl"], {})
        if "not_compared" in c:
            rows.append([name, c["not_compared"][:300], "", "", "", "", "", ""])
            continue
        rows.append(
            [
                name,
                f"{x['tokens_per_s']:.0f}",
                f"{y['tokens_per_s']:.0f}",
                f"{c['speed_ours_over_trl']:.2f}x",
                f"{x['peak_gib']:.2f}",
                f"{y['peak_gib']:.2f}",
                f"{c.get('memory_ours_over_trl', float('nan')):.2f}x",
                f"{c['probe_max_rel_diff']:.1e}",
            ]
        )
    return rows


TRL_HEADER = [
    "comparison",
    "ours tokens/s",
    "TRL tokens/s",
    "speed",
    "ours GiB",
    "TRL GiB",
    "memory",
    "probe logp rel. diff",
]


def target_rows(r: dict) -> list[list]:
    rows = []
    for t in r["targets"]:
        why = "; ".join(t.get("misses", [])) or t.get("why", "")
        rows.append([t["comparison"], t["target"], t["status"], why])
    return rows


def profile_markdown(profile: list[dict]) -> str:
    rows = [[p["name"], f"{p['self_ms']:.2f}", f"{p['share']:.1%}", p["calls"]] for p in profile]
    return table(rows, ["kernel / op", "self ms", "share", "calls"])


def print_trl(r: dict) -> None:
    print(table(trl_rows(r), TRL_HEADER))
    print(table(target_rows(r), ["comparison", "target", "status", "why"]))
    for t in r["targets"]:
        if t.get("profile"):
            print(f"\nour step's top kernels ({t['comparison']}, target missed):")
            print(profile_markdown(t["profile"]))
