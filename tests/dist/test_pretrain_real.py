"""Megatron-LM's real ``pretrain()`` trains the plugin (``examples/megatron_lm``).

Against the real ``megatron.training`` of the Megatron-LM checkout in
``MEGATRON_LM_ROOT`` (``.ci/run`` sets it to ``../shared/megatron-lm``, core_v0.16.1), on
CPU through ``examples/megatron_lm/cpu_training_bridge.py``:

* the README's commands run as written: the initial checkpoint and reference cache of
  ``megatron-pwdpo``, then ``pretrain_pwdpo.py`` under torchrun (DP=2, 3 iterations,
  saves at 2 and 3, TensorBoard);
* iteration 1 of ``pretrain()`` equals step 1 of ``megatron-pwdpo train`` (loss and
  gradient norm, relative difference <= 1e-6), both from that initial checkpoint, for
  point-wise DPO, ULMA, SFT, DPO (pairs: two items each) and KTO (its resident
  reference and KL point in the forward step; not at PP=2, refused), at 1 process,
  DP=2, TP=2 and PP=2, and SFT of a 4-layer model at PP=2 x VP=2 (Megatron-LM's
  interleaved schedule; one launch per world size: ``pretrain_real_worker.py``);
* a resume from the iteration-2 checkpoint reproduces iteration 3; the iteration-3
  checkpoint initialises ``megatron-pwdpo train`` (its held-out loss is Megatron-LM's);
* every metric, negative ones included, reaches the text log and TensorBoard;
* contradicting flags, a missing checkpoint and an unsupported loss stop the example
  before training, one line each.

Without ``MEGATRON_LM_ROOT`` these tests skip (``megatron.training`` is not on PyPI).
``triton``, which Megatron-LM imports and CPU torch lacks, is the stand-in of
``tests/stubs`` unless a real one is installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import read_metrics, run_python

ROOT = Path(__file__).resolve().parents[2]
MEGATRON_LM = os.environ.get("MEGATRON_LM_ROOT")
WORKER = Path(__file__).with_name("pretrain_real_worker.py")

pytestmark = [
    pytest.mark.dist,
    pytest.mark.skipif(
        not MEGATRON_LM,
        reason="MEGATRON_LM_ROOT is not set: it names a Megatron-LM checkout whose "
        "megatron/training these tests run (.ci/run sets ../shared/megatron-lm)",
    ),
]

ITERATION = re.compile(r"megatron-pwdpo \| iteration (\d+) \| (.*)")
FIELD = re.compile(r"(\w+) (-?(?:nan|inf|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?))")
VALIDATION = re.compile(r"validation loss at iteration (\d+) .*?\| loss value: (\S+) \|")


def _env() -> dict[str, str]:
    paths = [str(ROOT), str(MEGATRON_LM)]
    if importlib.util.find_spec("triton") is None:
        paths.append(str(ROOT / "tests" / "stubs"))
    return {"PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])}


def readme_commands() -> tuple[list[str], str]:
    """The section's setup commands (its first ``bash`` block) and its one-line
    ``pretrain_pwdpo.py`` command."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Training from your own Megatron-LM script")
    end = re.compile(r"\n#{2,3} ").search(readme, start + 3).start()
    section = readme[start:end]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    setup = blocks[0].strip().splitlines()
    line = [b.strip() for b in blocks if "pretrain_pwdpo.py" in b]
    assert len(line) == 1 and "\n" not in line[0], "one fenced line runs pretrain_pwdpo.py"
    return setup, line[0]


def _run(command: str | list[str], *, cwd: Path, timeout: float = 400):
    """A README command (``megatron-pwdpo ...`` or ``torchrun --nproc-per-node N ...``)."""
    words = shlex.split(command) if isinstance(command, str) else command
    if words[0] == "megatron-pwdpo":
        return run_python(["-m", "megatron_pwdpo.cli", *words[1:]], cwd=cwd, env=_env())
    assert words[:2] == ["torchrun", "--nproc-per-node"], words
    return run_python(words[3:], nproc=int(words[2]), cwd=cwd, env=_env(), timeout=timeout)


def _iterations(stdout: str) -> dict[int, dict[str, float]]:
    """The last rank's ``megatron-pwdpo | iteration N | key value | ...`` lines. Each value
    is read as the number it starts with: the ranks share one unbuffered stdout, where print
    writes a line's text and its newline apart, so another rank's output can end a line."""
    out = {}
    for number, fields in ITERATION.findall(stdout):
        pairs = (FIELD.match(field).groups() for field in fields.split(" | "))
        out[int(number)] = {key: float(value) for key, value in pairs}
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder laid out like a fresh clone (``examples`` is the repository's), after the
    README's setup commands; and one YAML per loss for 1-step comparisons."""
    from megatron_pwdpo.config import dump_yaml, load_config

    folder = tmp_path_factory.mktemp("megatron_lm")
    (folder / "examples").symlink_to(ROOT / "examples")
    setup, _ = readme_commands()
    for command in setup:
        _run(command, cwd=folder)
    yaml = folder / "examples" / "megatron_lm" / "tiny.yaml"
    base = load_config(yaml)
    absolute = [
        f"train.init_checkpoint={folder / base.train.init_checkpoint}",
        f"reference.cache_path={folder / base.reference.cache_path}",
        "train.steps=1",
    ]
    no_cache = ["reference.mode=resident", "reference.cache_path=null"]
    # KTO's policy starts one SFT step away from its reference (the initial weights), so
    # that its KL point is not 0 at iteration 1 and the test can tell a wrong one
    init = folder / base.train.init_checkpoint
    moved = folder / "runs" / "megatron-lm" / "kto-policy"
    _run(
        f"megatron-pwdpo train --config {yaml} loss.name=sft train.steps=1 "
        f"train.init_checkpoint={init} run_dir={moved} {' '.join(no_cache)}",
        cwd=folder,
    )
    kto = [*no_cache, f"train.init_checkpoint={moved / 'checkpoints'}",
           f"reference.checkpoint={init}"]  # fmt: skip
    losses = [("pointwise_dpo", []), ("ulma", []), ("sft", no_cache), ("dpo", []), ("kto", kto)]
    for loss, extra in losses:
        config = load_config(yaml, [*absolute, f"loss.name={loss}", *extra])
        (folder / f"{loss}.yaml").write_text(dump_yaml(config))
    # virtual pipelining (2 layers per pipeline rank): a 4-layer model's SFT
    init4 = folder / "runs" / "megatron-lm" / "init-4layers"
    _run(
        f"megatron-pwdpo train --config {yaml} loss.name=sft train.steps=0 "
        f"train.init_checkpoint=null model.num_layers=4 run_dir={init4} {' '.join(no_cache)}",
        cwd=folder,
    )
    four = ["model.num_layers=4", f"train.init_checkpoint={init4 / 'checkpoints'}"]
    config = load_config(yaml, [*absolute, "loss.name=sft", *no_cache, *four])
    (folder / "sft_4layers.yaml").write_text(dump_yaml(config))
    return folder


def _worker(work: Path, *, nproc: int, layouts: str, refusals: bool = False) -> list[dict]:
    """The worker's records (``kind`` result or refused) from every rank's file."""
    results = Path(tempfile.mkdtemp(prefix="results-", dir=work))
    program = [str(WORKER), "--work", str(work), "--layouts", layouts, "--results", str(results)]
    program += ["--refusals"] if refusals else []
    run_python(program, nproc=nproc, cwd=work, env=_env(), timeout=600)
    lines = [ln for f in sorted(results.glob("rank*.jsonl")) for ln in f.read_text().splitlines()]
    return [json.loads(line) for line in lines]


def _results(records: list[dict]) -> dict[tuple[str, str, str], dict]:
    rows = [r for r in records if r["kind"] == "result"]
    return {(r["layout"], r["loss"], r["loop"]): r for r in rows}


def _assert_equal_first_steps(results, layouts) -> None:
    for layout in layouts:
        for loss in ("pointwise_dpo", "ulma", "sft", "dpo", "kto"):
            if loss == "kto" and layout.startswith("pp2"):
                continue  # refused (its passes run outside the pipeline schedule)
            if layout == "pp2-vp2" and loss != "sft":
                continue  # a 4-layer model, without a reference cache of its own
            ours = results[(layout, loss, "megatron-pwdpo train")]
            theirs = results[(layout, loss, "pretrain()")]
            for key in ("value", "grad_norm", "kl") if loss == "kto" else ("value", "grad_norm"):
                rel = abs(theirs[key] - ours[key]) / abs(ours[key])
                assert rel <= 1e-6, (layout, loss, key, ours[key], theirs[key])
            if loss == "kto":
                assert ours["kl"] > 1e-3, ours  # the policy is not its reference


def test_one_process_iteration_1_equals_megatron_pwdpo_train_and_refusals(work):
    records = _worker(work, nproc=1, layouts="single", refusals=True)
    results = _results(records)
    _assert_equal_first_steps(results, ["single"])
    # SFT trains the demonstrations with the token mean (a per-token NLL near ln 2048),
    # not every row with the YAML's summed log-probs (hundreds)
    assert 5 < results[("single", "sft", "pretrain()")]["value"] < 10
    for loss in ("pointwise_dpo", "dpo"):  # the policy is its reference at iteration 1
        value = results[("single", loss, "pretrain()")]["value"]
        assert value == pytest.approx(math.log(2), rel=1e-6), loss
    refused = {r["case"]: r["message"] for r in records if r["kind"] == "refused"}
    flags = refused["flags"].splitlines()
    assert len(flags) == 3 and all(f.startswith("pretrain_pwdpo.py: error: ") for f in flags)
    assert flags[0].endswith("--hidden-size 256 differs from the YAML's model.hidden_size=64")
    assert "--context-parallel-size 2 is not supported" in flags[1]
    assert "--calculate-per-token-loss is not supported" in flags[2]
    missing = refused["missing_checkpoint"]
    assert "\n" not in missing and "nothing has no latest_checkpointed_iteration.txt" in missing
    assert refused["kto_pp2"].startswith(
        "pretrain_pwdpo.py: error: --pipeline-model-parallel-size 2 is not supported with "
        "loss.name=kto"
    )


def test_two_processes_iteration_1_equals_megatron_pwdpo_train_at_dp2_tp2_pp2_vp2(work):
    results = _results(_worker(work, nproc=2, layouts="dp2,tp2,pp2,pp2-vp2"))
    _assert_equal_first_steps(results, ["dp2", "tp2", "pp2", "pp2-vp2"])


def test_readme_command_saves_resumes_logs_every_metric_and_hands_over(work):
    _, command = readme_commands()
    first = _run(command, cwd=work).stdout
    logged = _iterations(first)
    assert sorted(logged) == [1, 2, 3]
    ckpts = work / "runs" / "megatron-lm" / "ckpts"
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "3"

    # every metric, negative ones too, in the text log and in TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(work / "runs" / "megatron-lm" / "tb"))
    events.Reload()
    metrics = {k: v for k, v in logged[3].items() if k != "grad_norm"}
    assert {"loss", "reward_desirable", "logratio", "accuracy"} <= set(metrics)
    assert any(v < 0 for i in (2, 3) for v in logged[i].values()), logged
    for key, value in metrics.items():
        (scalar,) = [e for e in events.Scalars(key) if e.step == 3]
        assert scalar.value == pytest.approx(value, rel=1e-6, abs=1e-9), key

    # resume from iteration 2: iteration 3 again
    resume = work / "runs" / "megatron-lm" / "resume"
    resume.mkdir()
    shutil.copytree(ckpts / "iter_0000002", resume / "iter_0000002")
    (resume / "latest_checkpointed_iteration.txt").write_text("2\n")
    words = shlex.split(command)
    load = words.index("--load")
    words[load : load + 2] = ["--load", str(resume)]
    for flag in ("--finetune", "--no-load-optim", "--no-load-rng"):
        words.remove(flag)
    words[words.index("--save") + 1] = str(resume)
    again = _iterations(_run(words, cwd=work).stdout)
    assert sorted(again) == [3]
    for key in ("loss", "grad_norm"):
        assert again[3][key] == pytest.approx(logged[3][key], rel=1e-6), key

    # the iteration-3 checkpoint initialises megatron-pwdpo train (steps=0: it evaluates
    # the held-out rows first), whose held-out loss is Megatron-LM's validation loss; the
    # reference stays the initial weights (those of the cache)
    (validation,) = [float(v) for i, v in VALIDATION.findall(first) if i == "3"]
    run_dir = work / "runs" / "megatron-lm" / "from-pretrain"
    _run(
        f"megatron-pwdpo train --config examples/megatron_lm/tiny.yaml train.steps=0 "
        f"train.init_checkpoint={ckpts} reference.checkpoint=runs/megatron-lm/init/checkpoints "
        f"run_dir={run_dir}",
        cwd=work,
    )
    (held_out,) = [m["loss"] for m in read_metrics(run_dir) if m.get("split") == "eval"]
    assert held_out == pytest.approx(validation, rel=1e-5)
