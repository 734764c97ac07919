"""Against TRL: ``KTOTrainer`` (unpaired binary labels) and ``DPOTrainer`` (pairs).

TRL is a comparison dependency only (``pip install -e '.[bench]'``; this script says
so and stops if it is missing). Both sides get exactly the same work:

* the same model shape: the tiny Llama (``transformers.LlamaForCausalLM`` with our
  ModelConfig's sizes, RoPE base, RMSNorm epsilon, untied embeddings; fp32, TRL's
  default SDPA attention) and a frozen reference copy on each side;
* the same token ids in the same batches: our tokenisation of the HH slice (TRL is
  handed ``prompt_ids``/``completion_ids``, ``chosen_ids``/``rejected_ids`` and skips
  its own tokenisation), our sampler's global batches in order (TRL reads them
  sequentially), one forward per batch on both sides (KTO: 16 rows plus the 16
  mismatched rows of the KL estimate; DPO: 8 pairs), right-padded to the batch's
  longest row (ours rounds up to a multiple of 16);
* the same optimisation: Adam (beta2 0.95), lr 3e-4, clipping at 1.0, beta 0.1,
  log-probs summed over the response.

Two comparisons: **like-for-like** (the above: both padded, both with a resident
reference) and **best configuration each side** (``best_overrides``: ours packed with a
reference cache, pointwise DPO on the unpaired rows; TRL with
``precompute_ref_log_probs``; each precompute timed apart from the steps and also
amortised over one epoch of the timed rows). Target for the best rows: ours >= 1.5x
TRL's tokens/s at <= 0.8x its step-peak memory.

Time: in one process, TRL's ``Trainer.train()`` runs and a callback runs one step of
ours after each of TRL's steps (the TRL step is the time between its step ends minus
ours). Tokens/s counts the training rows' own tokens (no padding, no KL rows).
Memory: each side alone in its own process (each imports only its own framework).
``--quick``: the best rows only (the ones ``run_all.py`` gates on), 3 rounds, one
memory step.

    python bench/trl_compare.py [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import (
    MEMORY_KEYS,
    MemoryTracker,
    bench_config,
    common_args,
    global_batches,
    median,
    ratio_stats,
    report,
    run_workers,
    session,
    set_threads,
    write_worker_result,
)

LOSSES = ("kto", "dpo")
BETA, LR = 0.1, 3e-4


def trl_available() -> str | None:
    """None, or why TRL cannot be used."""
    try:
        import trl  # noqa: F401
    except ImportError as err:
        return (
            f"TRL is not installed ({err}); it is a comparison-only dependency: "
            "pip install -e '.[bench]' (next to a CPU torch: pip install trl --no-deps "
            "accelerate --no-deps)"
        )
    return None


def overrides(loss: str) -> list[str]:
    """Our side's config: the same batch as TRL's in one micro-batch."""
    common = [f"loss.name={loss}", f"loss.beta={BETA}", "loss.logp_reduction=sum"]
    common += [f"train.lr={LR}", "train.warmup_steps=0", "train.min_lr=0"]
    if loss == "kto":
        return [
            *common,
            "data.hh_mode=unpaired",
            "train.micro_batch_size=16",
            "train.global_batch_size=16",
        ]
    return [*common, "data.hh_mode=paired", "train.micro_batch_size=8", "train.global_batch_size=8"]


# Best configuration each side: ours packs the rows (``data.packing=masked``) and reads
# the reference from a precomputed cache (``reference.mode=cache``); TRL precomputes the
# reference log-probs (``precompute_ref_log_probs``, no reference model kept). For
# unpaired rows with binary labels ours runs point-wise DPO (the cache cannot serve KTO:
# its KL point needs the reference on mismatched rows, ``config/validation.py``), TRL its
# ``KTOTrainer`` (TRL has no point-wise DPO); for pairs both run DPO. TRL's padding-free
# mode does not run: TRL 1.16's ``DPOTrainer`` switches ``padding_free=True`` off with a
# warning ("temporarily unavailable after a refactor") and ``KTOTrainer`` has none.
OUR_BEST_LOSS = {"kto": "pointwise_dpo", "dpo": "dpo"}


def best_overrides(loss: str) -> list[str]:
    """Our side's best configuration for TRL's ``loss`` row (packing; the cache is set
    in-process, :func:`cache_reference`)."""
    out = [o for o in overrides(loss) if not o.startswith("loss.name=")]
    return [*out, f"loss.name={OUR_BEST_LOSS[loss]}", "data.packing=masked"]


def cache_reference(s, batches) -> tuple[object, float]:
    """A ``CacheReference`` over ``batches``' rows, filled by the production precompute
    (``row_logps.rows_logps`` with the session's resident reference, as
    ``megatron-pwdpo precompute-ref`` runs it), and the precompute's CPU seconds."""
    import torch

    from megatron_pwdpo.engine.setup import Layout
    from megatron_pwdpo.reference.row_logps import rows_logps
    from megatron_pwdpo.reference.strategies import CacheReference

    rows = list({r.row_index: r for b in batches for e in b for r in _rows(e)}.values())
    start = time.process_time()
    logps = rows_logps(
        rows,
        s.runner.reference.chunks,
        Layout.current(),
        pad_id=s.data.tokenizer.pad_id,
        micro_batch_size=s.config.train.micro_batch_size,
        reduction=s.config.loss.logp_reduction,
        seq_length=s.config.data.seq_length,
    )
    seconds = time.process_time() - start
    table = torch.full((max(r.row_index for r in rows) + 1,), float("nan"))
    table[[r.row_index for r in rows]] = logps.float()
    cache = CacheReference(table, rebatch=s.runner._micro_batches, is_last_stage=True)
    return cache, seconds


def _rows(example) -> tuple:
    return example if isinstance(example, tuple) else (example,)


# ------------------------------------------------------------------ the TRL side


def hf_tokenizer(tokenizer):
    """A ``transformers`` tokenizer over our vocabulary (TRL needs one for its pad id and
    eos; it never tokenises here)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    pieces = {tokenizer._sp.id_to_piece(i): i for i in range(tokenizer.vocab_size)}
    piece = tokenizer._sp.id_to_piece
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(pieces, unk_token=piece(0))),
        bos_token=piece(tokenizer.bos_id),
        eos_token=piece(tokenizer.eos_id),
        pad_token=piece(tokenizer.pad_id),
        unk_token=piece(0),
    )


def hf_model(model, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups or model.num_attention_heads,
        max_position_embeddings=model.max_seq_length + 1,
        rms_norm_eps=model.norm_epsilon,
        rope_theta=float(model.rotary_base),
        initializer_range=model.init_method_std,
        tie_word_embeddings=not model.untie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    return LlamaForCausalLM(config).float()


def trl_dataset(loss: str, batches: list[list]):
    """Our global batches, in order, as TRL's tokenised columns."""
    from datasets import Dataset

    records = []
    for batch in batches:
        if loss == "kto":
            part = [
                {
                    "prompt_ids": r.input_ids[: r.prompt_len].tolist(),
                    "completion_ids": r.input_ids[r.prompt_len :].tolist(),
                    "label": bool(r.label > 0.5),
                }
                for r in batch
            ]
            # TRL's own KL rows: completions rotated by one within the batch
            completions = [p["completion_ids"] for p in part]
            for p, kl in zip(part, completions[-1:] + completions[:-1], strict=True):
                p["KL_completion_ids"] = kl
            records += part
        else:
            records += [
                {
                    "prompt_ids": c.input_ids[: c.prompt_len].tolist(),
                    "chosen_ids": c.input_ids[c.prompt_len :].tolist(),
                    "rejected_ids": r.input_ids[r.prompt_len :].tolist(),
                }
                for c, r in batch
            ]
    return Dataset.from_list(records)


def trl_trainer(
    loss: str,
    config,
    data,
    batches,
    *,
    steps: int,
    out_dir: str,
    callbacks=(),
    precompute: bool = False,
    timings: dict | None = None,
    micro_batch: int | None = None,
):
    """TRL's trainer on our rows; ``precompute``: ``precompute_ref_log_probs`` (no
    reference model kept), its CPU seconds added to ``timings["precompute_cpu_s"]``;
    ``micro_batch``: rows (KTO) or pairs (DPO) per forward, the global batch reached by
    gradient accumulation (default: the whole global batch at once)."""
    import copy

    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    base, config_cls = (KTOTrainer, KTOConfig) if loss == "kto" else (DPOTrainer, DPOConfig)
    timings = {} if timings is None else timings

    class Pretokenised(base):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already TRL's tokenised columns (trl_dataset)

        def _precompute_ref_logps(self, *args, **kwargs):
            start = time.process_time()
            try:
                return super()._precompute_ref_logps(*args, **kwargs)
            finally:
                spent = time.process_time() - start
                timings["precompute_cpu_s"] = timings.get("precompute_cpu_s", 0.0) + spent

    t = config.train
    extra = {"loss_type": ["sigmoid"]} if loss == "dpo" else {}
    args = config_cls(
        output_dir=out_dir,
        per_device_train_batch_size=micro_batch or t.global_batch_size,
        gradient_accumulation_steps=t.global_batch_size // (micro_batch or t.global_batch_size),
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        max_grad_norm=t.clip_grad,
        beta=BETA,
        max_length=config.data.seq_length + 1,
        precompute_ref_log_probs=precompute,
        train_sampling_strategy="sequential",
        use_cpu=True,
        bf16=False,
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
    model = hf_model(config.model, t.seed)
    # with precompute TRL runs the reference pass with the (initial) policy and keeps none
    ref = None if precompute else copy.deepcopy(model).eval().requires_grad_(False)
    return Pretokenised(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=trl_dataset(loss, batches),
        processing_class=hf_tokenizer(data.tokenizer),
        callbacks=list(callbacks),
    )


def tokens_of(batch) -> int:
    """The rows' own positions (L - 1 per row of L tokens), the same on both sides."""
    rows = [x for e in batch for x in (e if isinstance(e, tuple) else (e,))]
    return sum(r.input_ids.size - 1 for r in rows)


# ------------------------------------------------------------------ measurements


def _prepared(loss: str, run_dir: str, count: int):
    """Config, data and ``count`` global batches, without building a model."""
    import warnings

    from megatron_pwdpo.data.prepare import prepare_data
    from megatron_pwdpo.training.plan import plan_stages

    warnings.filterwarnings("ignore")
    config = bench_config(run_dir, *overrides(loss))
    data = prepare_data(config.data, vocab_size=config.model.vocab_size)
    stage = plan_stages(config, data)[-1]
    return (
        config,
        data,
        global_batches(stage.examples, count=count, size=config.train.global_batch_size),
    )


def measure_time(loss: str, rounds: int, *, best: bool = False) -> dict:
    """Both sides on the same ``rounds`` (+1 warm-up) global batches, alternating.

    ``best``: each side's best configuration (:func:`best_overrides`; TRL with
    ``precompute_ref_log_probs``); both precomputes timed apart from the steps.
    """
    from transformers import TrainerCallback

    ours: dict = {}
    # seconds per step, wall clock and CPU time of this process (see common.Timings)
    trl_t: dict[str, list[float]] = {"wall": [], "cpu": []}
    our_t: dict[str, list[float]] = {"wall": [], "cpu": []}
    trl_precompute: dict[str, float] = {}

    def clocks() -> dict[str, float]:
        return {"wall": time.perf_counter(), "cpu": time.process_time()}

    class Interleave(TrainerCallback):
        """After each TRL step, one step of ours on the same global batch."""

        def on_train_begin(self, *args, **kwargs):
            self.last = clocks()

        def on_step_end(self, args, state, control, **kwargs):
            now = clocks()
            for c in now:
                trl_t[c].append(now[c] - self.last[c])
            k, s = state.global_step - 1, ours["session"]
            start = clocks()
            s.runner.train_step(s.stage, batches[k], k + 1, s.optimizer)
            end = clocks()
            for c in end:
                our_t[c].append(end[c] - start[c])
            self.last = clocks()

    with tempfile.TemporaryDirectory() as tmp:
        config, data, batches = _prepared(loss, tmp, rounds + 1)
        # TRL (Accelerate) first: it then sees a single process, as when run alone;
        # our one-process gloo world starts after it
        trainer = trl_trainer(
            loss,
            config,
            data,
            batches,
            steps=rounds + 1,
            out_dir=tmp,
            callbacks=[Interleave()],
            precompute=best,
            timings=trl_precompute,
        )
        assert trainer.accelerator.distributed_type == "NO", trainer.accelerator.distributed_type
        with session(*(best_overrides(loss) if best else overrides(loss))) as s:
            if best:
                s.runner.reference, ours["precompute_cpu_s"] = cache_reference(s, batches)
            ours["session"] = s
            trainer.train()
    tokens = [tokens_of(b) for b in batches[1:]]
    out = {
        "rounds": rounds,
        "batch": config.train.global_batch_size,
        "tokens_per_step": median(tokens),
    }
    if best:
        out["our_loss"] = OUR_BEST_LOSS[loss]
        out["trl_padding_free"] = "not available in TRL 1.16 (see OUR_BEST_LOSS)"
    for c, unit in (("cpu", "cpu_s"), ("wall", "s")):
        ours_c, trl_c = our_t[c][1:], trl_t[c][1:]  # round 0 is the warm-up
        for name, xs in (("ours", ours_c), ("trl", trl_c)):
            rates = [n / x for n, x in zip(tokens, xs, strict=True)]
            out[f"{name}_tokens_per_{unit}"] = round(median(rates), 1)
            out[f"{name}_step_{unit}"] = [round(x, 4) for x in xs]
        suffix = "" if c == "cpu" else "_wall"
        ratio, noise, _ = ratio_stats(trl_c, ours_c)
        out[f"speed_ours_over_trl{suffix}"] = round(ratio, 3)
        out[f"speed_noise{suffix}"] = round(noise, 3)
    if best:
        # the precompute covers every row of the rounds + 1 batches once: amortised over
        # one epoch it adds precompute / (rounds + 1) to each step
        steps = rounds + 1
        for name, spent in (("ours", ours["precompute_cpu_s"]), ("trl", trl_precompute)):
            spent = spent if isinstance(spent, float) else spent["precompute_cpu_s"]
            step = median(our_t["cpu"][1:] if name == "ours" else trl_t["cpu"][1:])
            out[f"{name}_precompute_cpu_s"] = round(spent, 3)
            out[f"{name}_precompute_tokens_per_cpu_s"] = round(
                sum(tokens_of(b) for b in batches) / spent, 1
            )
            out[f"{name}_amortised_tokens_per_cpu_s"] = round(
                median(tokens) / (step + spent / steps), 1
            )
        out["amortised_speed_ours_over_trl"] = round(
            out["ours_amortised_tokens_per_cpu_s"] / out["trl_amortised_tokens_per_cpu_s"], 3
        )
    return out


def worker(side: str, steps: int, json_out: str | None) -> None:
    """One framework alone: set up, track memory over ``steps`` steps, report.

    ``side``: ``{ours,trl}_{kto,dpo}``, or ``{ours,trl}best_{kto,dpo}`` for the best
    configurations (ours: packed, a cache table and no reference model; TRL: precomputed
    reference log-probs and no reference model; the tracker starts after the precompute).
    """
    framework, loss = side.split("_")
    best = framework.endswith("best")
    if framework.startswith("ours"):
        with session(*(best_overrides(loss) if best else overrides(loss)), reference=not best) as s:
            batches = global_batches(
                s.stage.examples, count=steps, size=s.config.train.global_batch_size
            )
            if best:
                # placeholder log-probs: a lookup costs the same whatever it holds (as in
                # reference.py's memory worker)
                import torch

                from megatron_pwdpo.reference.strategies import CacheReference

                size = max(r.row_index for r in s.data.train) + 1
                s.runner.reference = CacheReference(
                    torch.zeros(size), rebatch=s.runner._micro_batches, is_last_stage=True
                )
            tracker = MemoryTracker().start()
            for k, batch in enumerate(batches):
                s.runner.train_step(s.stage, batch, k + 1, s.optimizer)
            report = tracker.stop()
    else:
        from transformers import TrainerCallback

        state = {}

        class Reset(TrainerCallback):
            def on_train_begin(self, *args, **kwargs):
                state["tracker"] = MemoryTracker().start()

        with tempfile.TemporaryDirectory() as tmp:
            config, data, batches = _prepared(loss, tmp, steps)
            trainer = trl_trainer(
                loss,
                config,
                data,
                batches,
                steps=steps,
                out_dir=tmp,
                callbacks=[Reset()],
                precompute=best,
            )
            trainer.train()
            report = state["tracker"].stop()
    write_worker_result(json_out, {"side": side, **report})


SIDES = {"like": ("ours", "trl"), "best": ("oursbest", "trlbest")}


def measure(rounds: int, memory_steps: int, modes=tuple(SIDES)) -> dict:
    """``modes``: ``like`` and/or ``best`` (``--quick``: ``best`` only, the gated rows;
    the like-for-like rows would double the time and the memory processes)."""
    out: dict = {"memory_steps": memory_steps, "modes": list(modes)}
    timings = {
        (mode, loss): measure_time(loss, rounds, best=mode == "best")
        for mode in modes
        for loss in LOSSES
    }
    jobs = [
        {
            "script": "trl_compare.py",
            "args": ["--worker", f"{fw}_{loss}", "--steps", str(memory_steps)],
            "timeout": 900,
        }
        for mode in modes
        for loss in LOSSES
        for fw in SIDES[mode]
    ]
    done = iter(run_workers(jobs, parallel=2))
    for mode in modes:
        for loss in LOSSES:
            memory = dict(zip(("ours", "trl"), (next(done), next(done)), strict=True))
            x = {
                **timings[mode, loss],
                **{f"{fw}_{k}": memory[fw][k] for fw in ("ours", "trl") for k in MEMORY_KEYS},
            }
            x["step_peak_ours_over_trl"] = round(
                x["ours_anon_above_start_mib"] / x["trl_anon_above_start_mib"], 3
            )
            out[loss if mode == "like" else f"best_{loss}"] = x
    out["best_targets"] = {"speed_at_least": SPEED_TARGET, "step_peak_at_most": MEMORY_TARGET}
    return out


SPEED_TARGET, MEMORY_TARGET = 1.5, 0.8


def checks(r: dict) -> list[dict]:
    """The targets ``run_all.py`` gates on: the best-each-side rows."""
    out = []
    for loss in LOSSES:
        x = r[f"best_{loss}"]
        out.append(
            {
                "name": f"best each side vs TRL {loss}: speed",
                "value": x["speed_ours_over_trl"],
                "target": SPEED_TARGET,
                "noise": x["speed_noise"],
                "higher_is_better": True,
            }
        )
        out.append(
            {
                "name": f"best each side vs TRL {loss}: step-peak memory",
                "value": x["step_peak_ours_over_trl"],
                "target": MEMORY_TARGET,
                "noise": 0.05,  # memory repeats within a few MiB (README)
                "higher_is_better": False,
            }
        )
    return out


def summary_rows(r: dict) -> list[list]:
    rows = []
    for loss, name in (("kto", "KTOTrainer"), ("dpo", "DPOTrainer")):
        x = r.get(loss)
        if x is None:  # --quick: the best rows only
            continue
        rows.append(
            [
                f"ours vs TRL {name} ({loss}, like-for-like: padded, resident reference; "
                "tokens/s; peak memory)",
                f"{x['ours_tokens_per_cpu_s']:.0f} vs {x['trl_tokens_per_cpu_s']:.0f} tok/CPU-s; "
                f"{x['ours_peak_anon_mib']:.0f} vs {x['trl_peak_anon_mib']:.0f} MiB "
                f"(step peak {x['ours_anon_above_start_mib']:.0f} vs "
                f"{x['trl_anon_above_start_mib']:.0f})",
                f"{x['speed_ours_over_trl']:.2f}x speed "
                f"(wall {x['speed_ours_over_trl_wall']:.2f}x)",
                "(comparison)",
                "",
            ]
        )
    for loss, name in (("kto", "KTOTrainer"), ("dpo", "DPOTrainer")):
        x = r.get(f"best_{loss}")
        if x is None:
            continue
        met = x["speed_ours_over_trl"] >= SPEED_TARGET and (
            x["step_peak_ours_over_trl"] <= MEMORY_TARGET
        )
        rows.append(
            [
                f"best each side: ours {x['our_loss']} packed + reference cache vs TRL {name} "
                "+ precompute_ref_log_probs (tokens/s; step peak)",
                f"{x['ours_tokens_per_cpu_s']:.0f} vs {x['trl_tokens_per_cpu_s']:.0f} tok/CPU-s "
                f"(precompute amortised over one epoch: {x['ours_amortised_tokens_per_cpu_s']:.0f}"
                f" vs {x['trl_amortised_tokens_per_cpu_s']:.0f}); step peak "
                f"{x['ours_anon_above_start_mib']:.0f} vs {x['trl_anon_above_start_mib']:.0f} "
                "MiB",
                f"{x['speed_ours_over_trl']:.2f}x ± {x['speed_noise']:.2f} speed (wall "
                f"{x['speed_ours_over_trl_wall']:.2f}x; amortised "
                f"{x['amortised_speed_ours_over_trl']:.2f}x), "
                f"{x['step_peak_ours_over_trl']:.2f}x step peak",
                f">= {SPEED_TARGET}x speed, <= {MEMORY_TARGET}x step peak",
                "yes" if met else "no",
            ]
        )
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(parser)
    parser.add_argument("--steps", type=int, default=2, help="steps of a memory worker")
    args = parser.parse_args(argv)
    missing = trl_available()
    if missing:
        print(f"bench/trl_compare.py: skipped: {missing}")
        return {"skipped": missing}
    set_threads(args.threads)
    if args.worker:
        worker(args.worker, args.steps, args.json_out)
        return {}
    if args.quick:  # >= 3 rounds: the gate's noise is a spread over rounds
        result = measure(args.rounds or 3, 1, modes=("best",))
    else:
        result = measure(args.rounds or 5, args.steps)
    report("trl_compare", result, summary_rows(result), args.out)
    return result


if __name__ == "__main__":
    main()
