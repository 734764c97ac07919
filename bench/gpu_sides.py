"""The sides of ``gpu_trl.py``'s comparison, each measured alone: ours (Megatron-Core,
``runner.train_step``) and TRL's (``DPOTrainer``/``KTOTrainer``).

Each side builds its model, reports the summed log-probs of two probe rows before
training, then runs ``shape.warmup + shape.steps`` steps on its global batches, timing
each (CUDA-synchronised) and tracking the peak memory over all of them (GPU:
``max_memory_allocated``; CPU dry run: peak anonymous RSS). Our sides also profile one
more step (``torch.profiler``, the top kernels by self device time). The first of our
sides writes its initial weights as a Hugging Face folder through the project's
conversion; TRL's sides load it, so both train the same weights.
``trl_worker`` is the process ``bench/gpu.py --worker trl:SIDE[,SIDE...]`` starts for them.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

from common import MemoryTracker, median, session, write_worker_result
from gpu_trl import BETA, LR, Shape, _loss, overrides, probe_rows, side_batches, side_data
from trl_compare import hf_tokenizer, tokens_of, trl_available, trl_dataset

PROFILE_ROWS = 15


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
    from megatron_pwdpo.reference.strategies import unwrap

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

    from megatron_pwdpo.engine.batches import rank_micro_batches
    from megatron_pwdpo.engine.step import run_logps

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

    from megatron_pwdpo.engine.step import run_logps

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
    from megatron_pwdpo.engine.setup import build_chunks
    from megatron_pwdpo.reference.strategies import ResidentReference, unwrap

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

    from megatron_pwdpo.reference.strategies import CacheReference

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


def run_side(side: str, shape: Shape, hf_dir: Path) -> dict:
    """One side (our sides write the Hugging Face weights if ``hf_dir`` is missing)."""
    if side.startswith("ours"):
        return ours(side, shape, hf_dir)
    missing = trl_available()
    if missing:
        return {"side": side, "skipped": missing}
    return trl_side(side, shape, hf_dir)


def trl_worker(args) -> None:
    """``--worker trl:SIDE[,SIDE...]``: the sides one after another in this process."""
    from dataclasses import fields

    shape = Shape(**{f.name: json.loads(args.shape)[f.name] for f in fields(Shape)})
    out = {}
    for side in args.worker.split(":", 1)[1].split(","):
        try:
            out[side] = run_side(side, shape, Path(args.hf_dir))
        except Exception as err:  # noqa: BLE001 - one side's failure is reported, not fatal
            trace = traceback.format_exc()[-3000:]
            out[side] = {"side": side, "error": f"{type(err).__name__}: {err}", "trace": trace}
    write_worker_result(args.json_out, {"sides": out})
