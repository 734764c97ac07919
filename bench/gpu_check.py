"""The GPU check: one command that says whether the project works on this GPU, and how fast.

Run on a lent GPU (``bash bench/gpu_check.sh --out "$OUT"``; see ``bench/README.md``),
or with ``--dry-run`` on the CPU, where CI runs it (everything but the CUDA calls: a
tiny model, fp32, a few steps, one unit-test file). Parts, in order; each is timed and
recorded, a failing one does not stop the next:

1. ``wheels``: the wheels carried with the working tree (``--wheels``, default
   ``.whl``; ``bench/download_wheels.sh`` fetches them) installed into ``--site``,
   which every later part has on its ``PYTHONPATH``;
2. ``environment``: Python, torch, CUDA device, package versions, whether Transformer
   Engine is installed (the check runs without it and uses it where it is: the model's
   layer spec and the FP8 runs follow what is importable);
3. ``train``: the default run (``examples/tiny_cpu.yaml``) to completion in
   ``precision.dtype`` (bf16), checkpoints every ``--save-interval`` steps;
4. ``resume``: the same run killed mid-stage (``PWDPO_FAULT=exit@N``: the process dies
   before that step's update), then resumed: every step's loss and gradient norm and
   the held-out losses against the uninterrupted run (``--resume-rtol``);
5. ``tests``: ``pytest tests/unit tests/gpu`` with CUDA visible (``-n`` workers where
   pytest-xdist is installed); failures listed by name;
6. ``bench``: ``bench/gpu.py --trl``: tokens/s and MFU in bf16 (and FP8 where TE is),
   ours against TRL's DPOTrainer/KTOTrainer, issue #24's targets as pass/miss, and the
   top kernels of our step where a target is missed.

Everything runs inside ``--budget-s`` (default 450 s): each part's timeout is what is
left, ``tests`` leaves ``--bench-reserve-s`` to the bench, and the bench starts no
worker it cannot finish. Output, in ``--out``: ``summary.json`` (every part's status,
seconds, numbers and the tail of its log on failure), ``summary.md`` (the same to read)
and ``check.log`` (every command's output). Exit status 0 when every part passed or
was skipped.

This file imports nothing outside the standard library: it must start before the
carried wheels are installed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "tiny_cpu.yaml"
# the dry run's train/resume: the tests' tiny model (tests/conftest.py TINY), few steps
DRY_TRAIN = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.max_seq_length=128",
    "data.seq_length=128",
    "data.eval_rows=16",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.eval_interval=1000",
    "train.sft_steps=2",
    "train.steps=4",
]
DRY_TESTS = "tests/unit/losses/test_losses.py tests/gpu"
PARTS = ("wheels", "environment", "train", "resume", "tests", "bench")
LOG_TAIL = 4000


class PartFailed(Exception):
    """A part ran and did not pass; ``numbers`` are what it measured all the same."""

    def __init__(self, message: str, numbers: dict | None = None):
        super().__init__(message)
        self.numbers = numbers or {}


class Skip(Exception):
    """A part that cannot run here (the reason is reported)."""


class Check:
    """The state shared by the parts: options, the children's environment, the log."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.deadline = time.monotonic() + args.budget_s
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": self._pythonpath()}
        self.env.pop("PWDPO_FAULT", None)
        if args.dry_run:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, even on a machine with a GPU
            self.env.setdefault("OMP_NUM_THREADS", "1")
        self.facts: dict = {}  # what `environment` found (device, TE, config keys)
        self.log = open(self.out / "check.log", "w")  # noqa: SIM115 - closed by main

    def _pythonpath(self, site: Path | None = None) -> str:
        parts = [str(site)] if site else []
        parts += [str(REPO), os.environ.get("PYTHONPATH", "")]
        return os.pathsep.join(p for p in parts if p)

    def use_site(self, site: Path) -> None:
        self.env["PYTHONPATH"] = self._pythonpath(site)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(
        self, cmd: list[str], *, timeout: float, env: dict | None = None
    ) -> tuple[int | None, str]:
        """Run ``cmd`` in the repository in its own process group (killed on a timeout:
        no orphaned torch_dist writer outlives it); ``(exit code or None, output)``."""
        timeout = max(1.0, timeout)
        self.log.write(f"\n$ {shlex.join(cmd)}  (timeout {timeout:.0f} s)\n")
        self.log.flush()
        with tempfile.TemporaryFile("w+") as buf:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env={**self.env, **(env or {})},
                stdout=buf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            buf.seek(0)
            output = buf.read()
        self.log.write(output[-2_000_000:])
        self.log.write(f"[exit {code if code is not None else 'timed out'}]\n")
        self.log.flush()
        return code, output


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _tail(text: str) -> str:
    return text[-LOG_TAIL:]


# ------------------------------------------------------------------ the parts


def part_wheels(c: Check) -> dict:
    wheels = sorted(Path(c.args.wheels).glob("*.whl")) if c.args.wheels else []
    if not wheels:
        raise Skip(f"no wheels in {c.args.wheels}: the installed packages are used")
    site = Path(c.args.site)
    cmd = python("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile")
    cmd += ["--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]
    code, output = c.run(cmd, timeout=min(120, c.left()))
    if code != 0:
        raise PartFailed(f"pip install exited {code}:\n{_tail(output)}")
    c.use_site(site)
    # the distributions' names, as `environment` reports their versions from the site
    c.env["GPU_CHECK_CARRIED"] = ",".join(w.name.split("-")[0] for w in wheels)
    return {"site": str(site), "installed": [w.name for w in wheels]}


ENVIRONMENT = r"""
import json, platform, sys, typing
from importlib.metadata import PackageNotFoundError, version
import torch
facts = {"python": platform.python_version(), "torch": torch.__version__,
         "cuda": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
if facts["cuda"]:
    facts["device"] = torch.cuda.get_device_name()
    facts["capability"] = list(torch.cuda.get_device_capability())
    facts["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
for name in ("megatron-core", "transformers", "trl", "accelerate", "datasets",
             "transformer-engine", "pytest", "pytest-xdist", "numpy"):
    try:
        facts[name] = version(name)
    except PackageNotFoundError:
        facts[name] = None
from megatron_pwdpo.model.precision import have_transformer_engine
from megatron_pwdpo.model.build import ModelConfig
facts["transformer_engine"] = have_transformer_engine()
hints = typing.get_type_hints(ModelConfig)
facts["model_attention_choices"] = (
    list(typing.get_args(hints["attention"])) if "attention" in hints else None)
import megatron.core, megatron_pwdpo
facts["megatron_pwdpo"] = megatron_pwdpo.__file__
carried = {}
for name in filter(None, __import__("os").environ.get("GPU_CHECK_CARRIED", "").split(",")):
    try:
        carried[name] = version(name)
    except PackageNotFoundError:
        carried[name] = None
facts["carried"] = carried
print("FACTS " + json.dumps(facts))
"""


def part_environment(c: Check) -> dict:
    code, output = c.run(python("-c", ENVIRONMENT), timeout=min(120, c.left()))
    line = next((x for x in output.splitlines() if x.startswith("FACTS ")), None)
    if code != 0 or line is None:
        raise PartFailed(f"the environment does not import:\n{_tail(output)}")
    c.facts = json.loads(line[len("FACTS ") :])
    try:  # the device machine's copy of the tree may have no git
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    c.facts["git_commit"] = commit or None
    if not c.args.dry_run and not c.facts["cuda"]:
        raise PartFailed("no CUDA device visible (use --dry-run on a CPU)", c.facts)
    return c.facts


def attention_override(c: Check) -> list[str]:
    """``model.attention=...`` for our runs: ``--attention`` (``auto``: ``sdpa`` where
    the config has that key and value; nothing otherwise)."""
    want, choices = c.args.attention, c.facts.get("model_attention_choices")
    if want == "none" or (want == "auto" and (not choices or "sdpa" not in choices)):
        return []
    return [f"model.attention={'sdpa' if want == 'auto' else want}"]


def train_args(c: Check, run_dir: Path) -> list[str]:
    args = ["-m", "megatron_pwdpo.cli", "train", "--config", str(CONFIG)]
    args += [f"run_dir={run_dir}", f"precision.dtype={c.args.dtype}", "train.progress=false"]
    args += [f"train.save_interval={c.args.save_interval}", *attention_override(c)]
    return args + (DRY_TRAIN if c.args.dry_run else [])


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def train_entries(run_dir: Path) -> dict[int, dict]:
    return {m["iteration"]: m for m in read_metrics(run_dir) if m.get("split", "train") == "train"}


def run_numbers(run_dir: Path, seconds: float) -> dict:
    """Steps, last loss of each stage and the last held-out losses of a run."""
    metrics = read_metrics(run_dir)
    train = [m for m in metrics if m.get("split", "train") == "train"]
    out: dict = {"iterations": len(train), "seconds": round(seconds, 1)}
    rates: dict[str, list[float]] = {}
    for m in train:
        out[f"{m['stage']}_last_loss"] = m.get("loss")
        rates.setdefault(m["stage"], []).append(m.get("tokens_per_s") or 0.0)
    for stage, xs in rates.items():  # the run's own timing of each step
        out[f"{stage}_median_tokens_per_s"] = round(sorted(xs)[len(xs) // 2], 1)
    for m in metrics:
        if m.get("split") == "eval":
            out[f"{m['stage']}_eval_loss"] = m.get("loss")
    return out


def part_train(c: Check) -> dict:
    run_dir = c.work / "full"
    start = time.monotonic()
    code, output = c.run(python(*train_args(c, run_dir)), timeout=min(300, c.left()))
    numbers = run_numbers(run_dir, time.monotonic() - start)
    if code != 0:
        what = "timed out" if code is None else f"exited {code}"
        raise PartFailed(f"train {what}:\n{_tail(output)}", numbers)
    c.facts["full_run"] = run_dir
    return numbers


def _stage_steps(c: Check) -> tuple[int, int]:
    """(SFT steps, preference steps) of the run (the dry run's or the YAML's)."""
    if c.args.dry_run:
        steps = dict(x.split("=") for x in DRY_TRAIN)
        return int(steps["train.sft_steps"]), int(steps["train.steps"])
    text = CONFIG.read_text()
    values = {}
    for key in ("sft_steps", "steps"):
        line = next(x for x in text.splitlines() if x.strip().startswith(f"{key}:"))
        values[key] = int(line.split(":")[1].split("#")[0])
    return values["sft_steps"], values["steps"]


def part_resume(c: Check) -> dict:
    full = c.facts.get("full_run")
    if full is None:
        raise Skip("needs the completed run of `train`")
    sft, steps = _stage_steps(c)
    save = c.args.save_interval
    if steps <= save + 1:
        raise Skip(f"the preference stage ({steps} steps) has no checkpoint inside it")
    crash_at = sft + save + 1  # dies before this update; the checkpoint at sft + save is kept
    run_dir = c.work / "resumed"
    args = python(*train_args(c, run_dir))
    code, output = c.run(args, timeout=min(300, c.left()), env={"PWDPO_FAULT": f"exit@{crash_at}"})
    latest_file = run_dir / "checkpoints" / "latest.txt"
    latest = int(latest_file.read_text()) if latest_file.exists() else None
    numbers: dict = {"killed_at_iteration": crash_at, "resumed_from_iteration": latest}
    if code == 0 or latest != sft + save:
        raise PartFailed(
            f"the interrupted run exited {code} with checkpoint {latest} (expected a crash "
            f"and {sft + save}):\n{_tail(output)}",
            numbers,
        )
    start = time.monotonic()
    code, output = c.run(args, timeout=min(300, c.left()))
    numbers["resume_seconds"] = round(time.monotonic() - start, 1)
    if code != 0:
        raise PartFailed(f"the resumed run exited {code}:\n{_tail(output)}", numbers)
    a, b = train_entries(full), train_entries(run_dir)
    if sorted(a) != sorted(b):
        raise PartFailed(f"iterations differ: {sorted(a)} vs {sorted(b)}", numbers)
    diffs = [
        abs(b[it][key] - a[it][key]) / max(abs(a[it][key]), 1e-12)
        for it in a
        for key in ("loss", "grad_norm")
    ]
    evals = [
        [m["loss"] for m in read_metrics(d) if m.get("split") == "eval"] for d in (full, run_dir)
    ]
    if len(evals[0]) != len(evals[1]):
        raise PartFailed("the held-out evaluations differ in number", numbers)
    diffs += [abs(y - x) / max(abs(x), 1e-12) for x, y in zip(*evals, strict=True)]
    numbers.update(steps_compared=len(a), max_rel_diff=max(diffs), bitwise_equal=max(diffs) == 0.0)
    if max(diffs) > c.args.resume_rtol:
        raise PartFailed(
            f"resumed run differs from the uninterrupted one by {max(diffs):.2e} "
            f"(> {c.args.resume_rtol})",
            numbers,
        )
    return numbers


def _junit_counts(path: Path) -> dict | None:
    if not path.exists():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors")}
    counts["skipped"] = sum(int(s.get("skipped", 0)) for s in suites)
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = failed[:50]
    return counts


def _verbose_counts(output: str) -> dict:
    """Counts from ``pytest -v`` lines (what is left when pytest was killed)."""
    counts = {"passed": 0, "failures": 0, "skipped": 0, "errors": 0}
    failed = []
    for line in output.splitlines():
        for word, key in (("PASSED", "passed"), ("FAILED", "failures"), ("SKIPPED", "skipped")):
            if f" {word}" in line and "::" in line:
                counts[key] += 1
                if word == "FAILED":
                    failed.append(line.strip()[:200])
    counts["failed_tests"] = failed[:50]
    return counts


def part_tests(c: Check) -> dict:
    junit = c.work / "junit.xml"
    cmd = python("-m", "pytest", "-v", "-p", "no:cacheprovider", f"--junitxml={junit}")
    workers = c.args.pytest_workers
    if workers is None:
        workers = 0 if c.args.dry_run or not c.facts.get("pytest-xdist") else 8
    if workers:
        cmd += ["-n", str(workers)]
    cmd += shlex.split(c.args.tests)
    timeout = min(c.args.tests_timeout_s, c.left() - c.args.bench_reserve_s)
    if timeout < 30:
        raise Skip("out of the time budget")
    code, output = c.run(cmd, timeout=timeout)
    counts = _junit_counts(junit) or _verbose_counts(output)
    counts["workers"] = workers
    counts["cuda_visible"] = c.facts.get("cuda", False)
    if code is None:
        raise PartFailed(f"pytest timed out after {timeout:.0f} s", counts)
    if code != 0 or counts["failures"] or counts["errors"]:
        summary = [x for x in output.splitlines() if x.startswith(("FAILED", "ERROR"))]
        raise PartFailed(f"pytest exited {code}:\n" + "\n".join(summary)[-LOG_TAIL:], counts)
    return counts


def part_bench(c: Check) -> dict:
    out = c.work / "gpu.json"
    budget = c.left() - 15
    if budget < 60:
        raise Skip("out of the time budget")
    # gpu.py starts no worker past its budget; 30 s are left for its start and its JSON
    cmd = python("bench/gpu.py", "--trl", "--out", str(out), "--budget-s", str(int(budget - 30)))
    cmd += ["--attention", c.args.attention, "--dtype", c.args.dtype]
    if c.args.dry_run:
        cmd.append("--cpu-dry-run")
    cmd += shlex.split(c.args.bench_args)
    code, output = c.run(cmd, timeout=budget + 10)
    if not out.exists():
        what = f"timed out after {budget + 10:.0f} s" if code is None else f"exited {code}"
        raise PartFailed(f"bench/gpu.py {what}, no results:\n{_tail(output)}")
    result = json.loads(out.read_text())
    if code != 0:
        failed = [n for n, x in result.get("trl", {}).get("sides", {}).items() if "error" in x]
        failed += [n for n, x in result.get("runs", {}).items() if "error" in x]
        raise PartFailed(f"bench/gpu.py exited {code}; failed: {', '.join(failed)}", result)
    return result


RUNNERS: dict[str, Callable[[Check], dict]] = {
    "wheels": part_wheels,
    "environment": part_environment,
    "train": part_train,
    "resume": part_resume,
    "tests": part_tests,
    "bench": part_bench,
}


def run_part(c: Check, name: str) -> dict:
    start = time.monotonic()
    record: dict = {"status": "passed"}
    try:
        if name in c.args.skip:
            raise Skip("--skip")
        record["numbers"] = RUNNERS[name](c)
    except Skip as why:
        record.update(status="skipped", why=str(why))
    except PartFailed as err:
        record.update(status="failed", error=_tail(str(err)), numbers=err.numbers)
    except Exception as err:  # noqa: BLE001 - the check reports and goes on
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
    record["seconds"] = round(time.monotonic() - start, 1)
    print(f"[gpu-check] {name}: {record['status']} ({record['seconds']} s)", flush=True)
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench/results/gpu_check"))
    p.add_argument(
        "--dry-run",
        "--cpu-dry-run",
        action="store_true",
        help="everything but the CUDA calls, on the CPU: tiny model, fp32, a few steps",
    )
    p.add_argument(
        "--budget-s", type=float, default=None, help="the whole check's seconds (450; dry run 1500)"
    )
    p.add_argument("--wheels", default=str(REPO / ".whl"), help="carried wheels ('' = none)")
    p.add_argument("--site", default="/tmp/gpu-check-site", help="where the wheels go")
    p.add_argument("--dtype", default=None, help="precision.dtype (default bf16; dry run fp32)")
    p.add_argument("--attention", default="auto", help="model.attention: auto, none or a value")
    p.add_argument("--save-interval", type=int, default=None, help="default 50 (dry run 2)")
    p.add_argument("--resume-rtol", type=float, default=1e-4)
    p.add_argument(
        "--tests",
        default=None,
        help=f"pytest paths (default tests/unit tests/gpu; dry run {DRY_TESTS})",
    )
    p.add_argument("--pytest-workers", type=int, default=None, help="default 8 with xdist")
    p.add_argument("--tests-timeout-s", type=float, default=180.0)
    p.add_argument("--bench-reserve-s", type=float, default=230.0, help="kept for the bench")
    p.add_argument(
        "--bench-args",
        default="--precisions bf16,delayed,tensorwise --steps 4 --warmup 2",
        help="more arguments for bench/gpu.py",
    )
    p.add_argument("--skip", default="", help=f"comma-separated parts of {', '.join(PARTS)}")
    return p


def main(argv: list[str] | None = None) -> int:
    import gpu_check_report

    args = build_parser().parse_args(argv)
    args.skip = set(filter(None, args.skip.split(",")))
    if unknown := args.skip - set(PARTS):
        raise SystemExit(f"--skip: unknown parts {sorted(unknown)} (parts: {', '.join(PARTS)})")
    args.dtype = args.dtype or ("fp32" if args.dry_run else "bf16")
    # the dry run's budget allows for a loaded 2-core CI machine (~70 s of CPU time)
    args.budget_s = args.budget_s or (1500.0 if args.dry_run else 450.0)
    args.save_interval = args.save_interval or (2 if args.dry_run else 50)
    args.tests = args.tests or (DRY_TESTS if args.dry_run else "tests/unit tests/gpu")
    if args.dry_run:
        args.bench_reserve_s = min(args.bench_reserve_s, 60.0)
    check = Check(args)
    started = datetime.datetime.now(datetime.UTC)
    parts = {}
    try:
        for name in PARTS:
            parts[name] = run_part(check, name)
    finally:
        check.log.close()
        shutil.rmtree(check.work, ignore_errors=True)
    failed = [n for n, p in parts.items() if p["status"] == "failed"]
    summary = {
        "check": "bench/gpu_check.py",
        "dry_run": args.dry_run,
        "result": "failed: " + ", ".join(failed) if failed else "passed",
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "total_s": round((datetime.datetime.now(datetime.UTC) - started).total_seconds(), 1),
        "budget_s": args.budget_s,
        "options": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()},
        "parts": parts,
    }
    as_json, as_md = gpu_check_report.write(check.out, summary)
    print(as_md.read_text())
    print(f"[gpu-check] {summary['result']}; wrote {as_json}, {as_md}, {check.out / 'check.log'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
