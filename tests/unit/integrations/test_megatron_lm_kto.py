"""KTO in Megatron-LM's pretrain(): ``KtoForwardStep`` takes the iteration's micro-batches,
gives every row its reference log-prob and every micro-batch the KL point of the
mismatched rows of the whole global batch, then serves them one per call; checked against
a naive formula with stand-in models whose log-probs are known. The real pretrain() runs
it in tests/dist/test_pretrain_real.py."""

import types

import numpy as np
import pytest
import torch

from megatron_pwdpo.config import LossConfig
from megatron_pwdpo.data.tokenize import TokenizedRow
from megatron_pwdpo.integrations.megatron_lm import PointwiseRowDataset
from megatron_pwdpo.integrations.megatron_lm_kto import KtoForwardStep
from megatron_pwdpo.losses import pointwise as losses

SCALE = {"policy": 1.0, "reference": 1.3}


class _Model(torch.nn.Linear):
    def __init__(self, name: str):
        super().__init__(1, 1)
        self.name = name


def _token_logps(model, tokens, positions, targets, mask=None, **_):
    """Depends on the model, each target token and the row's first token (so a response
    after another prompt scores differently); padding width does not matter."""
    return -0.1 * SCALE[model.name] * ((targets + tokens[:, :1]) % 7 + 1).float()


def _naive(row_ids, prompt_len, model):
    first = row_ids[0]
    return float(sum(-0.1 * SCALE[model] * ((t + first) % 7 + 1) for t in row_ids[prompt_len:]))


class _NextOnly:  # Megatron-LM's RerunDataIterator: __next__ only
    def __init__(self, source):
        self.source = source

    def __next__(self):
        return next(self.source)


def test_kto_step_matches_a_naive_reference_point_and_loss(monkeypatch):
    g = np.random.default_rng(3)
    rows = [
        TokenizedRow(i, g.integers(4, 50, size=int(g.integers(6, 12))), 3, float(i % 2), False,
                     f"k{i}")
        for i in range(4)
    ]  # fmt: skip
    loss_cfg = LossConfig(name="kto", beta=0.4, logp_reduction="sum")
    dataset = PointwiseRowDataset(
        rows, seq_length=16, pad_id=0, global_batch_size=4, loss_name="kto", mismatched=True
    )
    monkeypatch.setattr("megatron_pwdpo.engine.step.model_token_logps", _token_logps)
    monkeypatch.setattr(
        "megatron_pwdpo.integrations.megatron_lm_kto.model_token_logps", _token_logps
    )
    config = types.SimpleNamespace(loss=loss_cfg, precision=None)
    step = KtoForwardStep(
        lambda: config, num_microbatches=lambda training: 2, data_parallel_group=lambda: None
    )
    step.config, step.reference = config, _Model("reference")  # built from a checkpoint in use
    policy = _Model("policy")
    loader = _NextOnly(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))

    # naive: row k's prompt with row k+1's response, under both models
    shifted = [
        np.concatenate([rows[k].input_ids[:3], rows[(k + 1) % 4].input_ids[3:]]) for k in range(4)
    ]
    ratio = [_naive(ids, 3, "policy") - _naive(ids, 3, "reference") for ids in shifted]
    z = max(0.0, float(np.mean(ratio)))
    assert z > 0  # the test can tell a wrong reference point from 0
    logps = torch.tensor([_naive(r.input_ids, 3, "policy") for r in rows], dtype=torch.float64)
    refs = torch.tensor([_naive(r.input_ids, 3, "reference") for r in rows], dtype=torch.float64)
    desirable = torch.tensor([r.label > 0.5 for r in rows])
    expected, _ = losses.kto_loss(logps, refs, desirable, torch.tensor(z, dtype=torch.float64),
                                  beta=0.4)  # fmt: skip

    for j in range(2):
        output, loss_of = step(loader, policy)
        batch = loss_of.keywords["batch"]
        assert batch["kl"].item() == pytest.approx(z, rel=1e-6)
        torch.testing.assert_close(batch["ref_logps"].double(), refs[2 * j : 2 * j + 2])
        loss, report = loss_of(output)
        assert report["loss"][0].item() == pytest.approx(expected[2 * j : 2 * j + 2].sum().item(),
                                                         rel=1e-5)  # fmt: skip
        # weight 1/4 per row, times the grad scale (2 micro-batches, 1 rank)
        assert loss.item() == pytest.approx(expected[2 * j : 2 * j + 2].sum().item() / 4 * 2,
                                            rel=1e-5)  # fmt: skip
    assert not step.pending  # the next call starts the next iteration
