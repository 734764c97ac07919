"""``compat.pretrain`` against the real ``megatron.training`` of the Megatron-LM that pairs
with the installed megatron-core (``MEGATRON_LM_ROOT``, else ``../shared/megatron-lm`` for
0.16.x and ``../shared/megatron-lm-0.19`` for 0.19.x beside the checkout): what it passes
binds to that release's ``pretrain`` signature, and on core_v0.19.0 the config container
is built from real flags (Megatron-LM's own parser, validation and global args). Runs in
a subprocess: Megatron-LM's parser sets process-wide globals. Training itself is run by
the real-``pretrain()`` tests."""

from __future__ import annotations

import importlib.util
import os
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import run_python

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
RELEASE = version("megatron-core")

SCRIPT = r"""
import inspect, sys
from megatron.core.enums import ModelType
import megatron.training as mt
from megatron_pwdpo.platform import compat

real = mt.pretrain
calls = []

def recording(*args, **kwargs):
    inspect.signature(real).bind(*args, **kwargs)  # TypeError if the shim passes wrong
    calls.append((args, kwargs))

recording.__signature__ = inspect.signature(real)  # what the shim inspects
mt.pretrain = recording
sys.argv = ["x", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-3",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--pwdpo-x", "b"]

def extra(parser):
    parser.add_argument_group("pwdpo").add_argument("--pwdpo-x", default="a")
    return parser

def datasets(n): ...
def provider(pre_process=True, post_process=True, vp_stage=None, **kw): ...
def step(it, model): ...

compat.pretrain(datasets, provider, ModelType.encoder_or_decoder, step,
                extra_args_provider=extra, args_defaults={"exit_interval": 7})
(args, kwargs), = calls
if compat.pretrain_takes_config_container(real):
    from megatron.training import get_args
    container = args[0]
    assert type(container).__name__ == "PretrainConfigContainer", type(container)
    assert container.model is None  # the provider builds the model
    assert container.train.train_iters == 3 and container.train.global_batch_size == 4
    assert container.optimizer.lr == 1e-3
    assert args[1:] == (datasets, ModelType.encoder_or_decoder, step), args
    assert kwargs == {"model_provider": provider}, kwargs
    assert get_args().pwdpo_x == "b" and get_args().exit_interval == 7
    print("container path")
else:
    assert args == (datasets, provider, ModelType.encoder_or_decoder, step), args
    assert kwargs == {"extra_args_provider": extra, "args_defaults": {"exit_interval": 7}}, kwargs
    print("flags path")
"""


def _megatron_lm_root() -> Path:
    if os.environ.get("MEGATRON_LM_ROOT"):
        return Path(os.environ["MEGATRON_LM_ROOT"])
    name = "megatron-lm-0.19" if RELEASE.startswith("0.19.") else "megatron-lm"
    return ROOT.parent / "shared" / name


def test_pretrain_call_fits_the_paired_megatron_lm(tmp_path):
    root = _megatron_lm_root()
    if not (root / "megatron" / "training").is_dir():
        pytest.skip(f"no Megatron-LM checkout at {root} (set MEGATRON_LM_ROOT)")
    want = {"0.16.1": "flags path", "0.19.2": "container path"}.get(RELEASE)
    paths = [str(ROOT), str(root)]
    if importlib.util.find_spec("triton") is None:  # CPU torch: megatron.training imports it
        paths.append(str(ROOT / "tests" / "stubs"))  # the stand-in the pretrain tests use
    path = os.pathsep.join(paths)
    proc = run_python(["-c", SCRIPT], env={"PYTHONPATH": path}, cwd=tmp_path, timeout=300)
    if want is not None:
        assert want in proc.stdout
