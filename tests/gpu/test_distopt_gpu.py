"""The distributed optimizer on one GPU, with whatever Adam the machine has (TE's or
apex's fused Adam in an NGC container, torch's AdamW without them), in bf16: a run that
fails mid-stage resumes to the uninterrupted curve, and a checkpoint written before the
first update (a skipped NaN step) saves and resumes. The CPU suite runs the same on
gloo with torch's AdamW (``tests/dist/test_distributed_optimizer.py``)."""

import shutil

import numpy as np
import pytest
import torch
from conftest import TINY, read_metrics, run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

ARGS = [
    "train",
    *TINY,
    "train.sft_steps=3",
    "train.steps=3",
    "train.save_interval=1",
    "train.keep_checkpoints=10",
    "parallel.distributed_optimizer=true",
    "precision.dtype=bf16",
]


def _curve(run_dir):
    return {m["iteration"]: m for m in read_metrics(run_dir) if m.get("split", "train") == "train"}


@pytest.mark.parametrize(("fault", "resume_at"), [("exit@6", 5), ("nan@1", 1)])
def test_distributed_optimizer_resumes_on_gpu(tmp_path, fault, resume_at):
    full = tmp_path / "full"
    env = {"PWDPO_FAULT": fault} if fault.startswith("nan") else None
    run_cli([*ARGS, f"run_dir={full}"], env=env)
    resumed = tmp_path / "resumed"
    if fault.startswith("exit"):
        crashed = run_cli([*ARGS, f"run_dir={resumed}"], check=False, env={"PWDPO_FAULT": fault})
        assert crashed.returncode != 0
    else:
        shutil.copytree(full, resumed)
        (resumed / "checkpoints" / "latest.txt").write_text(f"{resume_at}\n")
    run_cli([*ARGS, f"run_dir={resumed}"])
    a, b = _curve(full), _curve(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for it in range(resume_at + 1, 7):
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(b[it][key], a[it][key], rtol=1e-5, err_msg=f"{it} {key}")
