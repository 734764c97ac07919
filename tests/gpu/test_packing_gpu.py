"""THD packing and chunked log-probs with Transformer Engine on one GPU.

* ``data.packing=thd`` (``PackedSeqParams``, TE's fused/flash attention over
  ``cu_seqlens``) trains like one padded row per sequence;
* ``parallel.logprob_chunk_size`` trains like the whole-sequence output layer.

TE's THD kernels need bf16 (its unfused fp32 attention has no THD format), so both
sides run in bf16, and the tolerance is bf16's rather than float32's. On CPU,
``tests/dist/test_logprob_layouts.py`` checks the same at float32 rounding, with a core
attention that honours ``cu_seqlens`` standing in for TE's kernel.
"""

import numpy as np
import pytest
import torch
from conftest import TINY, run_cli, train_curve

from megatron_pwdpo.model.precision import have_transformer_engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not have_transformer_engine(), reason="needs Transformer Engine"),
]

ARGS = ["train", *TINY, "train.sft_steps=2", "train.steps=2", "precision.dtype=bf16"]
RTOL = 2e-2  # bf16 activations; a mask that leaks across rows moves losses by far more


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("padded")
    run_cli([*ARGS, f"run_dir={run_dir}"])
    return run_dir


def _assert_close(a, b):
    for stage in ("sft", "pointwise_dpo"):
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(
                train_curve(b, stage, key),
                train_curve(a, stage, key),
                rtol=RTOL,
                err_msg=f"{stage} {key}",
            )


def test_thd_packed_run_matches_padded_run(padded, tmp_path):
    run_cli([*ARGS, "data.packing=thd", "train.micro_batch_size=1", f"run_dir={tmp_path}"])
    _assert_close(padded, tmp_path)


def test_chunked_log_probs_run_matches_whole_sequence(padded, tmp_path):
    run_cli([*ARGS, "parallel.logprob_chunk_size=32", f"run_dir={tmp_path}"])
    _assert_close(padded, tmp_path)
