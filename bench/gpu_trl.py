"""Ours against TRL's ``DPOTrainer`` and ``KTOTrainer`` on one GPU (``bench/gpu.py --trl``).

Four comparisons, each a pair of sides (every side in its own process on the GPU, so
its peak memory is its own; ``--cpu-dry-run`` runs them one after another in one
process on the CPU):

* ``dpo``: DPO with a resident reference (ours: Megatron-Core, ``loss.name=dpo``; TRL:
  ``DPOTrainer`` with a reference model), full rows of ``seq + 1`` tokens (half prompt,
  two different halves as chosen and rejected) cut from the HH slice's token stream;
* ``kto``: the same for KTO (unpaired rows, labels alternating; both sides run the
  mismatched KL rows: row ``k``'s prompt with row ``k + 1``'s response);
* ``cache``: DPO with precomputed reference log-probs (ours: ``CacheReference``, the
  table a ``reference.mode=cache`` run reads, filled by a forward pass before timing;
  TRL: ``precompute_ref_log_probs=True``, no reference model kept);
* ``packed``: DPO on the real HH rows (``examples/data``, our tokenizer), ours packed
  (``data.packing``: ``thd`` with Transformer Engine, else ``masked``) against TRL
  padded to each micro-batch's longest row.

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

Reported per side: useful tokens/s (the rows' own positions, no padding, no KL rows:
median over the timed steps, CUDA-synchronised), peak memory (GPU:
``max_memory_allocated`` over the steps; CPU dry run: peak anonymous RSS), first and
last loss; for our sides, a ``torch.profiler`` table of one more step's top kernels.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import tempfile
import time
import typing
from dataclasses import dataclass
from pathlib import Path

from common import MemoryTracker, global_batches, median, session
from trl_compare import hf_tokenizer, tokens_of, trl_available, trl_dataset

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
PROFILE_ROWS = 15


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
    from megatron_pwdpo.model import ModelConfig

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

    from megatron_pwdpo.precision import have_transformer_engine

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
    from megatron_pwdpo.run_plan import plan_stages

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


# ------------------------------------------------------------------ measuring


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Peak:
    """Peak memory over a region: the GPU's ``max_memory_allocated`` with CUDA, else the
    process's peak anonymous RSS (``common.MemoryTracker``)."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.kind = "cuda max_memory_allocated" if self.cuda else "cpu peak anonymous RSS"

    def start(self) -> Peak:
        import torch

        if self.cuda:
            _sync()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.tracker = MemoryTracker().start()
        return self

    def stop(self) -> float:
        """Peak GiB since :meth:`start`."""
        import torch

        if self.cuda:
            _sync()
            return torch.cuda.max_memory_allocated() / 2**30
        return self.tracker.stop()["peak_anon_mib"] / 1024


def profile_table(step) -> list[dict]:
    """``torch.profiler`` over one call of ``step``: the top kernels by self device
    time (CPU ops on the CPU), with their share of the total."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        _sync()
    events = prof.key_averages()

    def self_time(e) -> float:
        if cuda:
            return float(
                getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            )
        return float(e.self_cpu_time_total)

    total = sum(self_time(e) for e in events) or 1.0
    top = sorted(events, key=self_time, reverse=True)[:PROFILE_ROWS]
    return [
        {
            "name": e.key[:90],
            "self_ms": round(self_time(e) / 1e3, 3),
            "share": round(self_time(e) / total, 4),
            "calls": int(e.count),
        }
        for e in top
    ]


def _result(side: str, shape: Shape, batches, times, peak_gib, peak_kind, losses) -> dict:
    tokens = [tokens_of(b) for b in batches]
    timed = list(zip(tokens[shape.warmup :], times[shape.warmup :], strict=True))
    return {
        "side": side,
        "steps_timed": len(timed),
        "tokens_per_step": median([n for n, _ in timed]),
        "median_step_s": round(median([t for _, t in timed]), 4),
        "tokens_per_s": round(median([n / t for n, t in timed]), 1),
        "peak_gib": round(peak_gib, 3),
        "memory": peak_kind,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


# ------------------------------------------------------------------ our side


def export_hf(runner, model_config, out_dir: Path, *, dtype: str) -> None:
    """The policy's weights as a Hugging Face folder, through the project's conversion
    (``mcore_to_hf_state``): what TRL's side loads (``bf16`` runs' weights are bf16
    values: stored as such, half the bytes, loaded back as float32 exactly)."""
    import json

    import torch
    from safetensors.torch import save_file

    from megatron_pwdpo.convert.mcore_to_hf import hf_config_from_model
    from megatron_pwdpo.convert.table import mcore_to_hf_state, spec_of
    from megatron_pwdpo.reference import unwrap

    own = unwrap(runner.policy[0]).state_dict()
    state = mcore_to_hf_state(own, model_config, spec=spec_of(list(own)))
    stored = torch.bfloat16 if dtype == "bf16" else torch.float32
    state = {k: v.to(device="cpu", dtype=stored) for k, v in state.items()}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config_from_model(model_config, dtype=str(stored).removeprefix("torch."))
    # TRL feeds whole rows (seq + 1 tokens; ours drops the last input token)
    config["max_position_embeddings"] = model_config.max_seq_length + 1
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tmp.rename(out_dir)  # whole or absent: a TRL side never reads half a folder


def our_probe_logps(runner, rows) -> list[float]:
    """Summed response log-probs of ``rows`` under our policy (forward only, one
    unpacked micro-batch)."""
    import torch

    from megatron_pwdpo.batches import rank_micro_batches
    from megatron_pwdpo.step import run_logps

    micro = rank_micro_batches(
        rows, dp_rank=0, dp_size=1, micro_batch_size=len(rows), pad_id=runner.data.tokenizer.pad_id
    )
    with torch.no_grad():
        (logps,) = run_logps(
            runner.fb,
            runner.policy,
            micro,
            reduction="sum",
            seq_length=runner.config.data.seq_length,
        )
    return [float(x) for x in logps.float().cpu()]


def _cache_table(runner, stage, batches):
    """Reference log-probs of every row of ``batches`` by row index, from the policy as
    it is before training (the reference): what ``precompute-ref`` writes."""
    import torch

    from megatron_pwdpo.step import run_logps

    rows = [x for b in batches for e in b for x in (e if isinstance(e, tuple) else (e,))]
    table = torch.full((max(r.row_index for r in rows) + 1,), float("nan"))
    with torch.no_grad():
        for batch in batches:
            micro = runner._micro_batches(batch)
            logps = run_logps(
                runner.fb,
                runner.policy,
                micro,
                reduction=stage.loss.logp_reduction,
                seq_length=runner.config.data.seq_length,
            )
            for mb, values in zip(micro, logps, strict=True):
                table[mb["row_index"].cpu()] = values.float().cpu()
    return table


def resident_reference(runner):
    """A frozen copy of the policy, as ``reference.build_reference`` makes for
    ``reference.mode=resident``, without saving it as a checkpoint (a run does that once
    per stage; at the 1B shape it would cost each side seconds of writing)."""
    from megatron_pwdpo.reference import ResidentReference, unwrap
    from megatron_pwdpo.training_setup import build_chunks

    chunks = build_chunks(runner.config, wrap_ddp=False)
    for chunk, policy in zip(chunks, runner.policy, strict=True):
        chunk.load_state_dict(unwrap(policy).state_dict(), strict=True)
    return ResidentReference(
        chunks,
        forward_backward_func=runner.fb,
        seq_length=runner.config.data.seq_length,
        rebatch=runner._micro_batches,
        is_last_stage=True,
    )


def ours(side: str, shape: Shape, hf_dir: Path | None) -> dict:
    import torch

    from megatron_pwdpo.reference import CacheReference

    cache = side.endswith("_cache")
    with session(*overrides(side, shape), reference=False) as s:
        runner, stage = s.runner, s.stage
        if not cache:
            runner.reference = resident_reference(runner)
        batches = side_batches(side, shape, s.config, s.data)
        if hf_dir is not None and not hf_dir.exists():
            export_hf(runner, s.config.model, hf_dir, dtype=shape.dtype)
        probe = our_probe_logps(runner, probe_rows(batches))
        if cache:
            table = _cache_table(runner, stage, batches)
            runner.reference = CacheReference(
                table, rebatch=runner._micro_batches, is_last_stage=True
            )
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        peak = Peak().start()
        times, losses = [], []
        for k, batch in enumerate(batches):
            _sync()
            start = time.perf_counter()
            metrics, _, _, _ = runner.train_step(stage, batch, k + 1, s.optimizer)
            _sync()
            times.append(time.perf_counter() - start)
            losses.append(float(metrics["loss"]))
        peak_gib = peak.stop()
        profile = profile_table(
            lambda: runner.train_step(stage, batches[-1], len(batches) + 1, s.optimizer)
        )
        out = _result(side, shape, batches, times, peak_gib, peak.kind, losses)
        weights = sum(p.numel() for c in runner.policy for p in c.parameters())
    return {**out, "parameters": weights, "probe_logps": probe, "profile": profile}


# ------------------------------------------------------------------ TRL's side


def _trl_args(loss: str, config, shape: Shape, *, precompute: bool, out_dir: str, cuda: bool):
    from trl import DPOConfig, KTOConfig

    t = config.train
    extra = {"loss_type": ["sigmoid"]} if loss == "dpo" else {}
    if precompute:
        extra["precompute_ref_log_probs"] = True
    micro = t.micro_batch_size
    return (KTOConfig if loss == "kto" else DPOConfig)(
        output_dir=out_dir,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=t.global_batch_size // micro,
        max_steps=shape.steps_total,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        max_grad_norm=t.clip_grad,
        beta=BETA,
        max_length=config.data.seq_length + 1,
        train_sampling_strategy="sequential",
        use_cpu=not cuda,
        bf16=shape.dtype == "bf16",
        fp16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=t.seed,
        **extra,
    )


def hf_probe_logps(model, rows, *, bf16: bool) -> list[float]:
    """Summed response log-probs of ``rows`` under the Hugging Face model (each row
    alone, no padding)."""
    import torch

    out = []
    device = next(model.parameters()).device
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )
    with torch.no_grad(), autocast:
        for r in rows:
            ids = torch.as_tensor(r.input_ids, device=device)[None]
            logits = model(ids).logits.float()[0, :-1]
            token = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            out.append(float(token[r.prompt_len - 1 :].sum()))
    return out


def trl_side(side: str, shape: Shape, hf_dir: Path) -> dict:
    import torch
    from transformers import LlamaForCausalLM, TrainerCallback
    from trl import DPOTrainer, KTOTrainer

    cuda = torch.cuda.is_available()
    loss, precompute = _loss(side), side.endswith("_precompute")
    times: list[float] = []
    losses: list[float] = []
    state: dict = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            state["peak"] = Peak().start()

        def on_step_begin(self, *args, **kwargs):
            _sync()
            state["t0"] = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            _sync()
            times.append(time.perf_counter() - state["t0"])

        def on_log(self, args, st, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    base = KTOTrainer if loss == "kto" else DPOTrainer

    class Pretokenised(base):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already TRL's tokenised columns (trl_compare.trl_dataset)

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_DATASETS_CACHE"] = str(Path(tmp) / "datasets")  # no stale precompute
        config, data, batches = side_data(side, shape, tmp)
        if hf_dir.exists():
            weights = "converted from ours (mcore_to_hf_state)"
            model = LlamaForCausalLM.from_pretrained(
                hf_dir, dtype=torch.float32, attn_implementation="sdpa"
            )
        else:  # our side failed before writing them: TRL's numbers are still worth having
            weights = "random (our side wrote no converted weights)"
            model = random_hf_model(config.model, seed=config.train.seed)
        if cuda:
            model = model.cuda()
        probe = hf_probe_logps(model, probe_rows(batches), bf16=shape.dtype == "bf16")
        ref = None if precompute else copy.deepcopy(model).eval().requires_grad_(False)
        args = _trl_args(loss, config, shape, precompute=precompute, out_dir=tmp, cuda=cuda)
        args.logging_strategy, args.logging_steps = "steps", 1
        start = time.perf_counter()
        trainer = Pretokenised(
            model=model,
            ref_model=ref,
            args=args,
            train_dataset=trl_dataset(loss, batches),
            processing_class=hf_tokenizer(data.tokenizer),
            callbacks=[Clock()],
        )
        setup_s = time.perf_counter() - start  # with precompute: the reference pass
        trainer.train()
        peak_gib = state["peak"].stop()
        out = _result(side, shape, batches, times, peak_gib, state["peak"].kind, losses)
    return {**out, "probe_logps": probe, "setup_s": round(setup_s, 2), "weights": weights}


def random_hf_model(model_config, *, seed: int):
    """A Hugging Face Llama of our model's shape with fresh weights (SDPA, fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_pwdpo.convert.mcore_to_hf import hf_config_from_model

    config = hf_config_from_model(model_config, dtype="float32")
    config["max_position_embeddings"] = model_config.max_seq_length + 1
    torch.manual_seed(seed)
    hf = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures",)})
    return LlamaForCausalLM._from_config(hf, attn_implementation="sdpa", dtype=torch.float32)


# ------------------------------------------------------------------ the comparison


def run_side(side: str, shape: Shape, hf_dir: Path) -> dict:
    """One side (our sides write the Hugging Face weights if ``hf_dir`` is missing)."""
    if side.startswith("ours"):
        return ours(side, shape, hf_dir)
    missing = trl_available()
    if missing:
        return {"side": side, "skipped": missing}
    return trl_side(side, shape, hf_dir)


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
            why = [s.get("error") or s.get("skipped") or "not run" for s in (x, y)]
            row["not_compared"] = "; ".join(f"{n}: {w}" for n, w in zip((a, b), why, strict=True))
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
