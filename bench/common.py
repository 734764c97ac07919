"""What every CPU benchmark shares: the model, data and batches of both sides, timing
that alternates the sides, peak-memory measurement in separate processes, FLOP counts
and the JSON results.

Every benchmark compares sides on the same tiny Llama-style model (the default run's,
``examples/tiny_cpu.yaml``: 4 layers, width 128, 4 heads, 2 key/value groups, SwiGLU
352, vocabulary 2048), the same rows (the bundled HH-RLHF slice, sequences of 256) and
the same global batches, on the same machine:

* time: the sides run **alternately** in one process, round after round (the order
  rotates every round), on the same global batch within a round; the reported ratio
  is the median of the per-round ratios, which a slow minute on a shared machine
  affects equally on both sides;
* memory: each side runs alone in a fresh process; after its set-up the peak resident
  set size is reset (``/proc/self/clear_refs``) and ``VmHWM`` read after its steps.
  Absolute numbers include the Python/torch runtime (several hundred MiB).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from megatron_pwdpo.platform.launch import python_command, run_group

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CONFIG = REPO / "examples" / "tiny_cpu.yaml"

# ------------------------------------------------------------------------ the run


def bench_config(run_dir: str | Path, *overrides: str):
    """The tiny default run (``examples/tiny_cpu.yaml``) without its SFT stage or
    evaluations, writing into ``run_dir``."""
    from megatron_pwdpo.config import load_config

    return load_config(
        CONFIG,
        [
            f"run_dir={run_dir}",
            "train.sft_steps=0",
            "train.progress=false",
            "train.eval_interval=1000000",
            *overrides,
        ],
    )


_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class Session:
    """A one-process Megatron world with the run's data, policy and optimizer."""

    config: Any
    data: Any
    runner: Any
    stage: Any
    optimizer: Any


@contextlib.contextmanager
def session(*overrides: str, reference: bool = True, quiet: bool = True) -> Iterator[Session]:
    """Set up the tiny run in this process (world of one, gloo): data, policy (DDP),
    the main stage, Megatron's optimizer and, with ``reference``, the resident
    reference (``Runner.set_reference``, as a run does)."""
    import logging
    import warnings

    import torch

    from megatron_pwdpo.data.prepare import prepare_data
    from megatron_pwdpo.engine.setup import Layout, build_optimizer
    from megatron_pwdpo.platform import cpu_bridge, distributed
    from megatron_pwdpo.training.loop import Runner
    from megatron_pwdpo.training.observe import RunLog
    from megatron_pwdpo.training.plan import plan_stages

    if quiet:
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
    saved_env = {k: os.environ.get(k) for k in _RENDEZVOUS}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        config = bench_config(tmp, *overrides)
        data = prepare_data(config.data, vocab_size=config.model.vocab_size)
        stage = plan_stages(config, data)[-1]
        distributed.init_distributed(
            tensor_parallel=1, pipeline_parallel=1, virtual_pipeline=None, timeout_s=600
        )
        try:
            cpu_bridge.manual_seed(config.train.seed)
            log = RunLog(Path(tmp), enabled=False, progress=False)
            runner = Runner(config, data, Layout.current(), log)
            if reference and stage.loss.name != "sft":
                runner.set_reference(resumed=False)
            optimizer, _ = build_optimizer(
                runner.policy, config.train, lr=stage.lr, steps=max(stage.steps, 1)
            )
            torch.manual_seed(config.train.seed)
            yield Session(config, data, runner, stage, optimizer)
        finally:
            distributed.shutdown()
            for key, value in saved_env.items():  # init_distributed sets them
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def global_batches(examples: Sequence, *, count: int, size: int, seed: int = 1234) -> list[list]:
    """``count`` global batches of ``size`` examples, as the run's sampler draws them."""
    from megatron_pwdpo.data.sampler import GlobalBatchSampler

    sampler = GlobalBatchSampler(len(examples), global_batch_size=size, seed=seed)
    return [[examples[i] for i in sampler.global_batch(k * size)] for k in range(count)]


def with_packing(config, packing: str):
    """``config`` with ``data.packing`` replaced."""
    return replace(config, data=replace(config.data, packing=packing))


def row_tokens(rows) -> int:
    """Useful (non-padding) positions of rows: ``L - 1`` per row of ``L`` tokens."""
    out = 0
    for r in rows:
        for row in r if isinstance(r, tuple) else (r,):
            out += row.input_ids.size - 1
    return out


# ------------------------------------------------------------------------ timing


@dataclass
class Timings:
    """Seconds per call of each side, per recorded round: wall clock and this process's
    CPU time. With one intra-op thread the CPU time is the work done, and other jobs on
    a shared machine inflate it far less than the wall clock (they make a process wait,
    they do not make it compute more); both are reported, ratios use the CPU time."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]


def alternate(sides: dict[str, Callable[[int], Any]], *, rounds: int, warmup: int = 1) -> Timings:
    """Run ``sides[name](round)`` for every side, round after round, and time each call.

    The order of the sides rotates every round. The first ``warmup`` rounds are run but
    not recorded.
    """
    names = list(sides)
    out = Timings({name: [] for name in names}, {name: [] for name in names})
    for k in range(warmup + rounds):
        shift = k % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            sides[name](k)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if k >= warmup:
                out.wall[name].append(wall)
                out.cpu[name].append(cpu)
    return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio_of_rounds(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of ``a[k] / b[k]`` (both measured in round k)."""
    return median([x / y for x, y in zip(a, b, strict=True)])


def ratio_stats(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, list[float]]:
    """``(median, noise, per-round ratios)`` of ``a[k] / b[k]``.

    ``noise`` is the round-to-round spread of the ratio: 1.4826 x the median absolute
    deviation from the median (the standard deviation for normal noise, robust to one
    slow round on a shared machine); with fewer than 3 rounds, half their range.
    """
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    mid = median(ratios)
    if len(ratios) >= 3:
        noise = 1.4826 * median([abs(r - mid) for r in ratios])
    else:
        noise = (max(ratios) - min(ratios)) / 2
    return mid, noise, ratios


# ------------------------------------------------------------------------ memory


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_rss_mib() -> float:
    """Peak resident set size since the start or the last :func:`reset_peak_rss`."""
    return _status_kib("VmHWM") / 1024


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def anon_mib() -> float:
    """Anonymous resident memory (tensors, the heap; not the mapped library files, which
    the kernel may drop and fault back in at any time)."""
    return _status_kib("RssAnon") / 1024


MEMORY_KEYS = ("peak_rss_mib", "peak_above_start_mib", "peak_anon_mib", "anon_above_start_mib")


class MemoryTracker:
    """Peak memory of a region of this process, two ways:

    * ``peak_rss_mib``: ``VmHWM`` after a reset at :meth:`start` (all resident pages,
      shared library files included: it moves by tens of MiB with the page cache);
    * ``peak_anon_mib``: the largest anonymous RSS seen by a thread that reads it every
      ``interval`` seconds (torch ops release the GIL): what the tensors and the heap
      take, the number the ratios use.
    """

    def __init__(self, interval: float = 0.002):
        import threading

        self.interval, self.peak_anon = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, anon_mib())
            self._stop.wait(self.interval)

    def start(self) -> MemoryTracker:
        self.rss0, self.anon0 = rss_mib(), anon_mib()
        self.peak_anon = self.anon0
        reset_peak_rss()
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, anon_mib())
        peak = peak_rss_mib()
        return {
            "peak_rss_mib": round(peak, 1),
            "peak_above_start_mib": round(peak - self.rss0, 1),
            "peak_anon_mib": round(self.peak_anon, 1),
            "anon_above_start_mib": round(self.peak_anon - self.anon0, 1),
        }


def run_worker(
    script: str,
    args: Sequence[str],
    *,
    timeout: float,
    nproc: int = 1,
    threads: int | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    """Run ``bench/<script> --worker ... --json-out F`` in a fresh process group (under
    ``torch.distributed.run`` with ``nproc`` > 1) and return the JSON it wrote.

    The process group is killed when the worker ends or times out
    (``megatron_pwdpo.platform.launch.run_group``), so a hung worker (or an orphaned grandchild)
    never outlives the benchmark.
    """
    # a fresh world: not this process's rendezvous (init_distributed sets these)
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS} | (env or {})
    env["PYTHONUNBUFFERED"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with (
        tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp,
        tempfile.TemporaryFile("w+") as log,
    ):
        out = Path(tmp) / "result.json"
        program = [str(REPO / "bench" / script), *args, "--json-out", str(out)]
        code = run_group(python_command(program, nproc=nproc), stdout=log, env=env, timeout=timeout)
        if code != 0 or not out.exists():
            log.seek(0)
            tail = log.read()[-4000:]
            what = "timed out" if code is None else f"exited {code}"
            raise RuntimeError(f"{script} {' '.join(args)} {what}:\n{tail}")
        return json.loads(out.read_text())


# glibc serves allocations of 128 KiB and more with their own mmap and unmaps them when
# freed (a fixed threshold: glibc otherwise raises it as the process frees large blocks,
# which then stay in the heap). Resident memory then follows the live tensors, step
# after step, instead of the heap's history.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_workers(jobs: Sequence[dict], *, parallel: int = 2) -> list[dict]:
    """:func:`run_worker` for each memory job (its keyword arguments), ``parallel`` at a
    time, with :data:`MEMORY_ENV`.

    Only for memory measurements: a process's peak memory does not depend on what else
    runs, its time does.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(lambda job: run_worker(env=MEMORY_ENV, **job), jobs))


def write_worker_result(path: str | None, result: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(result))


# ------------------------------------------------------------------------ FLOPs


def forward_flops(model, *, batch: int, seq: int, vocab: int | None = None) -> float:
    """Matmul FLOPs of one forward pass of ``batch`` sequences of ``seq`` positions.

    Per layer and position: q/k/v and output projections ``2 h (h + 2 g d) + 2 h h``
    (``g`` query groups of width ``d``), attention scores and the weighted sum
    ``4 s h`` (the full ``s x s`` square, as the local attention computes it and as
    Megatron's MFU counts it), the SwiGLU MLP ``6 h f``; plus the output layer ``2 h V``.
    A backward pass costs twice its forward.
    """
    h, f = model.hidden_size, model.ffn_hidden_size
    d = model.kv_channels or h // model.num_attention_heads
    g = model.num_query_groups or model.num_attention_heads
    v = vocab or model.vocab_size
    q_width = model.num_attention_heads * d
    per_layer = 2 * h * (q_width + 2 * g * d) + 2 * q_width * h + 4 * seq * q_width + 6 * h * f
    return float(batch * seq * (model.num_layers * per_layer + 2 * h * v))


def num_parameters(model, *, vocab: int | None = None) -> int:
    """Parameters of the Llama-style model (untied embeddings unless configured)."""
    h, f = model.hidden_size, model.ffn_hidden_size
    d = model.kv_channels or h // model.num_attention_heads
    g = model.num_query_groups or model.num_attention_heads
    v = vocab or model.vocab_size
    q_width = model.num_attention_heads * d
    per_layer = h * (q_width + 2 * g * d) + q_width * h + 3 * h * f + 2 * h
    embeddings = v * h * (2 if model.untie_embeddings else 1)
    return model.num_layers * per_layer + embeddings + h


# ------------------------------------------------------------------------ results


def machine() -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
            ).stdout.rstrip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "--short", "HEAD").strip()
    # uncommitted changes to the package (the code measured is not exactly the commit's)
    dirty = git("status", "--porcelain", "--", "megatron_pwdpo")
    try:
        from importlib.metadata import version

        mcore = version("megatron-core")
    except Exception:  # noqa: BLE001 - informative only
        mcore = "?"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": mcore,
        "git_commit": commit,
        "package_uncommitted_changes": dirty.splitlines(),
    }


def write_result(name: str, result: dict, out: str | Path | None = None) -> Path:
    """Write ``result`` (plus the machine) as JSON to ``out`` or ``bench/results/NAME.json``."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), **result}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


SUMMARY_HEADER = ["benchmark", "measured", "ratio", "target", "met"]


def report(name: str, result: dict, rows: Sequence[Sequence[Any]], out=None) -> Path:
    """Write ``result`` (:func:`write_result`), print its summary ``rows`` as a table
    under :data:`SUMMARY_HEADER` and where it was written; the written path."""
    path = write_result(name, result, out)
    print(table(rows, SUMMARY_HEADER))
    print(f"wrote {path}")
    return path


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def common_args(parser) -> None:
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per side")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads per process (default 1: on a shared 2-core machine, 2 "
        "threads made every small op wait for a descheduled thread, ~10x slower)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/)")
    parser.add_argument("--worker", default=None, help=argparse_hidden())
    parser.add_argument("--json-out", default=None, help=argparse_hidden())


def set_threads(threads: int) -> None:
    """Intra-op threads of this process and of the workers it starts."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


# ------------------------------------------------------------------------ shapes


def long_rows(examples: Sequence, *, length: int, count: int) -> list:
    """``count`` point-wise rows of exactly ``length`` tokens (``length - 1`` positions),
    cut from the HH rows' tokens laid end to end (repeated if needed); the first half of
    each is its prompt, labels alternate 1, 0. For shapes the bundled rows (~150 tokens)
    do not reach."""
    import numpy as np

    from megatron_pwdpo.data.tokenize import TokenizedRow

    tokens = np.concatenate([r.input_ids for r in examples])
    tokens = np.resize(tokens, max(tokens.size, length * count))
    return [
        TokenizedRow(
            row_index=i,
            input_ids=tokens[i * length : (i + 1) * length].copy(),
            prompt_len=length // 2,
            label=float(1 - i % 2),
            is_demo=False,
            id=f"long-{i}",
        )
        for i in range(count)
    ]


def set_core_attention(chunks, kind: str) -> None:
    """Replace every layer's core attention in ``chunks`` by ``SDPAttention`` (``sdpa``)
    or Megatron's ``DotProductAttention`` (``local``), built from the same arguments.
    Neither holds parameters, so the model's weights are untouched: one model serves
    both sides of an alternating timing."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_pwdpo.model.attention import SDPAttention

    cls = {"sdpa": SDPAttention, "local": DotProductAttention}[kind]
    for chunk in chunks:
        for module in chunk.modules():
            core = getattr(module, "core_attention", None)
            if core is None or type(core) is cls:
                continue
            module.core_attention = cls(
                core.config,
                layer_number=core.layer_number,
                attn_mask_type=core.attn_mask_type,
                attention_type=core.attention_type,
                pg_collection=core.pg_collection,
            ).train(core.training)


def matmul_flops_per_cpu_s(n: int = 512, min_cpu_s: float = 0.5) -> float:
    """Dense fp32 matmul FLOPs per CPU-second of this process at its current thread count
    (``n x n`` by ``n x n``, ``2 n^3`` FLOPs each, repeated for ``min_cpu_s``; the best of
    three such runs): the ceiling a step's model FLOPs per CPU-second is compared with."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up
    best = 0.0
    for _ in range(3):
        calls, start = 0, time.process_time()
        while (spent := time.process_time() - start) < min_cpu_s:
            torch.mm(a, b, out=out)
            calls += 1
        best = max(best, 2 * n**3 * calls / spent)
    return best
