"""``compat.final_hidden_states`` on the installed megatron-core (0.16.1 in the README's
environment, 0.19.2 in CI's "newest"): the tensor it returns is exactly what GPTModel's
output layer receives (its logits equal the stock forward's), and the model is left as
it was. A tiny GPT in this process (a gloo world of one, the CPU bridge)."""

from __future__ import annotations

import functools
from importlib.metadata import version

import pytest
import torch
from conftest import TINY, world_of_one
from megatron.core.models.gpt.gpt_model import GPTModel

from megatron_pwdpo.cli import DEFAULT_CONFIG
from megatron_pwdpo.config import load_config
from megatron_pwdpo.model.build import build_model
from megatron_pwdpo.platform import compat, cpu_bridge

# the path each CI-tested release takes (a release between them takes the one it has)
HOOK_BY_TESTED_RELEASE = {"0.16.1": False, "0.19.2": True}


@pytest.fixture(scope="module")
def world():
    with world_of_one():
        yield


def test_the_tested_releases_take_their_path():
    release = version("megatron-core")
    if release not in HOOK_BY_TESTED_RELEASE:
        pytest.skip(f"megatron-core {release} is not one CI tests")
    assert compat.gpt_forward_has_output_processor() is HOOK_BY_TESTED_RELEASE[release]


def test_final_hidden_states_are_the_output_layers_input(world):
    config = load_config(DEFAULT_CONFIG, TINY)
    cpu_bridge.install()
    cpu_bridge.manual_seed(0)
    model = build_model(config.model, config.parallel).eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.model.vocab_size, (2, 16), generator=g)
    positions = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        want = model(tokens, positions, None)  # [b, s, V]: the stock output layer's logits
        hidden = compat.final_hidden_states(
            model, functools.partial(GPTModel.forward, model), tokens, positions, None
        )
        got, _ = model.output_layer(hidden)
    assert hidden.shape == (16, 2, config.model.hidden_size)
    assert model.post_process is True
    torch.testing.assert_close(got.transpose(0, 1), want, rtol=0, atol=0)
