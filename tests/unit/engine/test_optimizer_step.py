"""``engine.setup.optimizer_step`` (prepare_grads and the grad norm once, then the clip
with that norm and ``step_with_ready_grads``) against Megatron's stock ``optimizer.step()``:
a tiny GPT in this process (a gloo world of one, the CPU bridge), two copies from the same
seed, the same gradients written into their DDP grad buffers."""

from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch
from conftest import TINY, world_of_one

from megatron_pwdpo.cli import DEFAULT_CONFIG
from megatron_pwdpo.config import load_config
from megatron_pwdpo.engine.setup import build_chunks, build_optimizer, optimizer_step
from megatron_pwdpo.platform import cpu_bridge

STEPS = 2


@pytest.fixture(scope="module")
def mopt():
    """megatron.core.optimizer.optimizer, with a world of one initialised around the tests."""
    with world_of_one():
        yield importlib.import_module("megatron.core.optimizer.optimizer")


KINDS = {  # config overrides -> the optimizer class get_megatron_optimizer chains
    "fp32": ([], "FP32Optimizer"),
    "bf16": (["precision.dtype=bf16"], "Float16OptimizerWithFloat16Params"),
    "distopt": (["parallel.distributed_optimizer=true"], "DistributedOptimizer"),
    "distopt-bf16": (
        ["parallel.distributed_optimizer=true", "precision.dtype=bf16"],
        "DistributedOptimizer",
    ),
}


def _build(clip_grad: float, kind: str = "fp32"):
    config = load_config(DEFAULT_CONFIG, [*TINY, *KINDS[kind][0]])
    cpu_bridge.manual_seed(0)
    chunks = build_chunks(config, wrap_ddp=True)
    train = dataclasses.replace(config.train, clip_grad=clip_grad, warmup_steps=0)
    optimizer, _ = build_optimizer(chunks, train, lr=1e-2, steps=STEPS)
    return chunks, optimizer


def _params(chunks) -> list[torch.Tensor]:
    return [p.detach().clone() for c in chunks for p in c.parameters()]


def _write_grads(chunks, optimizer, step: int, *, poison: float | None = None) -> None:
    """Zero the grad buffers and fill every main_grad from a seeded generator (what the
    backward pass and finalize_model_grads leave behind); ``poison`` goes into one entry."""
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    g = torch.Generator().manual_seed(100 + step)
    for c in chunks:
        for p in c.parameters():
            p.main_grad.copy_(torch.randn(p.shape, generator=g))
    if poison is not None:
        next(iter(chunks[0].parameters())).main_grad.view(-1)[3] = poison


def _adam_state(optimizer) -> list[torch.Tensor]:
    out = []
    for part in optimizer.chained_optimizers:
        for state in part.optimizer.state.values():
            out += [v for _, v in sorted(state.items()) if isinstance(v, torch.Tensor)]
    return out


def _assert_bitwise(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    assert len(got) == len(want) and got, what
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), f"{what} {i}: max diff {(a - b).abs().max()}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("clip_grad", [1e-3, 1e9, 0.0], ids=["clips", "no-clip", "clip-off"])
def test_same_update_and_norm_as_the_stock_step(mopt, monkeypatch, clip_grad, kind):
    stock_chunks, stock_opt = _build(clip_grad, kind)
    ours_chunks, ours_opt = _build(clip_grad, kind)
    # what get_megatron_optimizer returns here: a ChainedOptimizer over one optimizer of
    # the kind the config asks for (bf16: fp32 main weights; distributed: sharded state)
    assert isinstance(ours_opt, mopt.ChainedOptimizer)
    assert [type(o).__name__ for o in ours_opt.chained_optimizers] == [KINDS[kind][1]]
    _assert_bitwise(_params(ours_chunks), _params(stock_chunks), "initial weights")

    # count the work and see which clip runs (looked up in the optimizer module, both ways)
    if not torch.cuda.is_available():
        assert mopt.clip_grad_by_total_norm_fp32 is cpu_bridge._cpu_clip_grad_by_total_norm_fp32
    clips, norms = [], []
    clip_fn, norm_fn = mopt.clip_grad_by_total_norm_fp32, mopt.get_grad_norm_fp32

    def spy_clip(params, max_norm, total_norm, use_decoupled_grad=False):
        clips.append((max_norm, total_norm))
        return clip_fn(params, max_norm, total_norm, use_decoupled_grad)

    def spy_norm(*args, **kwargs):
        norms.append(1)
        return norm_fn(*args, **kwargs)

    monkeypatch.setattr(mopt, "clip_grad_by_total_norm_fp32", spy_clip)
    monkeypatch.setattr(mopt, "get_grad_norm_fp32", spy_norm)
    prepared = []
    prepare = ours_opt.prepare_grads
    monkeypatch.setattr(ours_opt, "prepare_grads", lambda: prepared.append(1) or prepare())

    for step in range(STEPS):
        _write_grads(stock_chunks, stock_opt, step)
        _write_grads(ours_chunks, ours_opt, step)
        raw = [p.main_grad.clone() for c in ours_chunks for p in c.parameters()]

        clips.clear(), norms.clear()
        ok, want_norm, _ = stock_opt.step()
        stock_clips, stock_norms = list(clips), len(norms)
        clips.clear(), norms.clear(), prepared.clear()
        updated, got_norm = optimizer_step(ours_opt, loss_is_finite=True)

        assert ok and updated is True
        assert isinstance(got_norm, float) and got_norm == want_norm and math.isfinite(got_norm)
        assert len(prepared) == 1 and len(norms) == 1 == stock_norms
        assert clips == stock_clips == ([] if clip_grad == 0.0 else [(clip_grad, got_norm)])
        coeff = clip_grad / (got_norm + 1e-6)
        if kind == "fp32":  # the update used the model's own grads: clipped, or left alone
            used = [p.grad for c in ours_chunks for p in c.parameters()]
            stock_used = [p.grad for c in stock_chunks for p in c.parameters()]
            _assert_bitwise(used, stock_used, "grads")
            for g, r in zip(used, raw, strict=True):
                assert torch.equal(g, r * coeff if 0 < coeff < 1 else r)
        _assert_bitwise(_params(ours_chunks), _params(stock_chunks), f"step {step} weights")
        _assert_bitwise(_adam_state(ours_opt), _adam_state(stock_opt), f"step {step} Adam")
    if clip_grad == 1e-3:
        assert coeff < 1e-4  # clipping really was active


@pytest.mark.parametrize(
    ("poison", "loss_is_finite"),
    [(float("nan"), True), (float("inf"), True), (None, False)],
    ids=["nan-grad", "inf-grad", "nan-loss"],
)
def test_non_finite_step_is_skipped(mopt, poison, loss_is_finite):
    chunks, optimizer = _build(1.0)
    before = _params(chunks)
    _write_grads(chunks, optimizer, 0, poison=poison)
    updated, grad_norm = optimizer_step(optimizer, loss_is_finite=loss_is_finite)
    assert updated is False
    if poison is None:
        assert math.isfinite(grad_norm) and grad_norm > 0
    else:
        assert not math.isfinite(grad_norm)
    _assert_bitwise(_params(chunks), before, "weights after a skipped step")
    assert _adam_state(optimizer) == []  # Adam never ran
    # the next, finite step updates
    _write_grads(chunks, optimizer, 1)
    updated, grad_norm = optimizer_step(optimizer, loss_is_finite=True)
    assert updated is True and math.isfinite(grad_norm)
    assert not torch.equal(_params(chunks)[0], before[0])


def test_an_optimizer_with_its_own_step_is_refused(mopt):
    class OwnStep(mopt.ChainedOptimizer):
        def step(self):
            raise AssertionError("not reached")

    with pytest.raises(TypeError, match="OwnStep overrides"):
        optimizer_step(OwnStep([]), loss_is_finite=True)


@pytest.mark.parametrize("kind", ["bf16", "distopt-bf16"])
def test_bf16_model_weights_with_fp32_master_weights(mopt, kind):
    chunks, optimizer = _build(1.0, kind)
    params = [p for c in chunks for p in c.parameters()]
    assert params and all(p.dtype == torch.bfloat16 for p in params)
    (part,) = optimizer.chained_optimizers
    main = [p for group in part.optimizer.param_groups for p in group["params"]]
    assert main and all(p.dtype == torch.float32 for p in main)
    _write_grads(chunks, optimizer, 0)
    assert optimizer_step(optimizer, loss_is_finite=True)[0]
    # the bf16 weights are the fp32 master weights rounded (the copy back after the step)
    if kind == "bf16":
        for model_group, main_group in zip(
            part.float16_groups, part.fp32_from_float16_groups, strict=True
        ):
            for p, m in zip(model_group, main_group, strict=True):
                assert torch.equal(p, m.to(torch.bfloat16))


@pytest.mark.parametrize("kind", ["fp32", "distopt"])
def test_adam_state_made_before_the_first_step_changes_nothing(mopt, kind):
    """A save or resume before the first step creates torch Adam's state early
    (``checkpoint.materialise_adam_state``): the steps that follow are bitwise the same."""
    from megatron_pwdpo.engine.checkpoint import materialise_adam_state

    lazy_chunks, lazy_opt = _build(1.0, kind)
    early_chunks, early_opt = _build(1.0, kind)
    assert _adam_state(early_opt) == []
    assert materialise_adam_state(early_opt) > 0
    assert materialise_adam_state(early_opt) == 0  # only where there is none
    for step in range(STEPS):
        for chunks, opt in ((lazy_chunks, lazy_opt), (early_chunks, early_opt)):
            _write_grads(chunks, opt, step)
            optimizer_step(opt, loss_is_finite=True)
        _assert_bitwise(_params(early_chunks), _params(lazy_chunks), f"step {step} weights")
        _assert_bitwise(_adam_state(early_opt), _adam_state(lazy_opt), f"step {step} Adam")
