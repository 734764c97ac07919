"""Run under torchrun by ``test_pretrain_real.py``: for each layout, step 1 of
``megatron-pwdpo train`` and iteration 1 of Megatron-LM's real ``pretrain()`` (the
example's ``main()``) for point-wise DPO, ULMA, SFT, DPO and KTO (not at PP=2: refused),
from one initial checkpoint; with virtual pipelining (a 4-layer model), SFT.

Everything runs in one launch per world size (starting Python, torch and Megatron-LM is
most of a run's cost on CPU), on one gloo process group: between runs Megatron's
parallel state and Megatron-LM's globals are torn down as a fresh process has them. The last
rank writes one ``{"kind": "result", ...}`` JSON line per run (layout, loss, loop, loss value,
grad norm) to ``--results``; with ``--refusals``, rank 0 then writes what the example refuses
(``{"kind": "refused", ...}``). A file, not stdout: the ranks share one stdout pipe, where
another rank's progress output can land inside a line (seen on CI: ``{...}........ 2``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "megatron_lm" / "pretrain_pwdpo.py"
# (tensor, pipeline, virtual pipeline) parallel sizes
LAYOUTS = {
    "single": (1, 1, None),
    "dp2": (1, 1, None),
    "tp2": (2, 1, None),
    "pp2": (1, 2, None),
    "pp2-vp2": (1, 2, 2),
}
LOSSES = ("pointwise_dpo", "ulma", "sft", "dpo", "kto")
ONE_STAGE = ("kto",)  # refused at PP > 1
# the interleaved schedule needs 2 layers per pipeline rank: a 4-layer model (SFT only,
# no reference cache of its own); the YAML is sft_4layers.yaml
VIRTUAL_LOSSES = ("sft",)
LINE = re.compile(r"megatron-pwdpo \| iteration 1 \| loss (\S+) .*\| grad_norm (\S+)")
KL = re.compile(r"megatron-pwdpo \| iteration 1 \| .*\| kl (\S+)")


def _last_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


RESULTS: Path | None = None  # set by main(): this rank's JSON-lines file


def _record(kind: str, **fields) -> None:
    """Append one JSON line to this rank's results file (each rank owns its file)."""
    with RESULTS.open("a") as out:
        out.write(json.dumps({"kind": kind, **fields}) + "\n")


def _emit(**result) -> None:
    _record("result", **result)


def run_train(yaml: Path, layout: str, run_dir: Path) -> None:
    """``megatron-pwdpo train`` for one step; rank 0 reads its metrics.jsonl."""
    from megatron_pwdpo.config import load_config
    from megatron_pwdpo.training.loop import train

    tp, pp, vp = LAYOUTS[layout]
    overrides = [
        f"parallel.tensor_parallel={tp}",
        f"parallel.pipeline_parallel={pp}",
        f"parallel.virtual_pipeline={vp or 'null'}",
        "train.steps=1",
        f"run_dir={run_dir}",
    ]
    config = load_config(yaml, overrides)
    train(config)
    if torch.distributed.get_rank() == 0:  # rank 0 writes metrics.jsonl
        step = next(
            m
            for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if m.get("split", "train") == "train" and m.get("step") == 1
        )
        _emit(layout=layout, loss=config.loss.name, loop="megatron-pwdpo train",
              value=step["loss"], grad_norm=step["grad_norm"], kl=step.get("kl"))  # fmt: skip


def _reset_megatron_lm() -> None:
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.core.rerun_state_machine import destroy_rerun_state_machine
    from megatron.training import global_vars

    global_vars.destroy_global_vars()
    destroy_num_microbatches_calculator()
    destroy_rerun_state_machine()
    parallel_state.destroy_model_parallel()


def _keep_the_process_group() -> None:
    """``megatron-pwdpo train`` ends by destroying the process group; here it only tears
    down Megatron's groups, so that one gloo group serves every run (gloo cannot reliably
    start a second default group on torchrun's store)."""
    from megatron.core import parallel_state

    from megatron_pwdpo.platform import distributed

    distributed.shutdown = parallel_state.destroy_model_parallel


def run_pretrain(example, yaml: Path, layout: str, loss: str) -> None:
    """The example under Megatron-LM's ``pretrain()`` for one iteration, from the YAML's
    initial checkpoint (``--load``, weights only)."""
    from megatron_pwdpo.config import load_config

    init = load_config(yaml).train.init_checkpoint
    tp, pp, vp = LAYOUTS[layout]
    virtual = ["--num-virtual-stages-per-pipeline-rank", str(vp)] if vp else []
    argv = [*virtual,
        "--pwdpo-config", str(yaml),
        "--tensor-model-parallel-size", str(tp),
        "--pipeline-model-parallel-size", str(pp),
        "--load", str(init), "--finetune", "--no-load-optim", "--no-load-rng",
        "--train-iters", "1", "--eval-iters", "0", "--num-workers", "0",
    ]  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        example.main(argv)
    text = out.getvalue()
    sys.stdout.write(text[-3000:])
    if _last_rank():
        found = LINE.search(text)
        if found is None:
            raise RuntimeError(f"no iteration-1 line in pretrain()'s log:\n{text[-3000:]}")
        kl = KL.search(text)
        _emit(layout=layout, loss=loss, loop="pretrain()", value=float(found[1]),
              grad_norm=float(found[2]), kl=kl and float(kl[1]))  # fmt: skip
    _reset_megatron_lm()


def refusals(example, work: Path) -> None:
    """What the example refuses before training, as ``refused`` records (rank 0)."""
    pointwise = str(work / "pointwise_dpo.yaml")
    cases = {
        "flags": ["--pwdpo-config", pointwise, "--hidden-size", "256",
                  "--context-parallel-size", "2", "--calculate-per-token-loss"],
        "missing_checkpoint": ["--pwdpo-config", pointwise, "--load", str(work / "nothing")],
        "kto_pp2": ["--pwdpo-config", str(work / "kto.yaml"),
                    "--pipeline-model-parallel-size", "2"],
    }  # fmt: skip
    for case, argv in cases.items():
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                example.main(argv)
                message = None
            except SystemExit as stop:
                message = str(stop.code)
        if torch.distributed.get_rank() == 0:
            _record("refused", case=case, message=message)
    _reset_megatron_lm()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True, help="the test's folder")
    parser.add_argument("--layouts", required=True, help="comma-separated, of LAYOUTS")
    parser.add_argument("--refusals", action="store_true", help="then the refusals")
    parser.add_argument("--results", type=Path, required=True, help="folder for rank*.jsonl")
    args = parser.parse_args()
    if "RANK" not in os.environ:  # one process, started without torchrun
        from megatron_pwdpo.platform.launch import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
    torch.distributed.init_process_group("gloo")
    _keep_the_process_group()
    global RESULTS
    RESULTS = args.results / f"rank{torch.distributed.get_rank()}.jsonl"
    spec = importlib.util.spec_from_file_location("pretrain_pwdpo", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for layout in args.layouts.split(","):
        _, pp, vp = LAYOUTS[layout]
        for loss in VIRTUAL_LOSSES if vp else LOSSES:
            if loss in ONE_STAGE and pp > 1:
                continue
            yaml = args.work / (f"{loss}_4layers.yaml" if vp else f"{loss}.yaml")
            run_train(yaml, layout, args.work / f"train-{layout}-{loss}")
            run_pretrain(example, yaml, layout, loss)
    if args.refusals:
        refusals(example, args.work)


if __name__ == "__main__":
    main()
