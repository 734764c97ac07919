"""Unit tests of megatron_pwdpo.losses.pointwise: naive formulas, gradients, DESIGN §1 facts,
metrics."""

import ast
import math
from pathlib import Path

import pytest
import torch

from megatron_pwdpo.losses import pointwise as losses
from megatron_pwdpo.losses.pointwise import (
    LOSS_NAMES,
    PAIRWISE_LOSSES,
    dpo_loss,
    ipo_loss,
    kto_loss,
    log1m_exp,
    pointwise_dpo_loss,
    sft_loss,
    ulma_loss,
    unlikelihood_loss,
)

N = 7
F64 = torch.float64


def _rand(*shape: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=gen, dtype=F64)


def _soft_labels(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=gen, dtype=F64)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------- naive references
# Written element by element with math.*, never with torch's logsigmoid.


def naive_pointwise(logps, ref_logps, label, beta, mode, log_z):
    out = []
    for lp, rl, z in zip(logps.tolist(), ref_logps.tolist(), label.tolist(), strict=True):
        r = beta * (lp - rl) + log_z
        if mode == "bce":
            out.append(-(z * math.log(_sigmoid(r)) + (1 - z) * math.log(1 - _sigmoid(r))))
        else:
            out.append((z - r) ** 2)
    return torch.tensor(out, dtype=F64)


def naive_ulma(logps, ref_logps, label, beta, sft_weight, log_z):
    out = []
    for lp, rl, z in zip(logps.tolist(), ref_logps.tolist(), label.tolist(), strict=True):
        value = -z * sft_weight * lp
        if z != 1:
            r = beta * (lp - rl) + log_z
            value += -(1 - z) * math.log(1 - _sigmoid(r))
        out.append(value)
    return torch.tensor(out, dtype=F64)


def naive_ulma_mse(logps, ref_logps, label, beta, sft_weight, log_z):
    """The authors' continuous ULMA: SFT on score-1 rows, squared error on the others."""
    out = []
    for lp, rl, z in zip(logps.tolist(), ref_logps.tolist(), label.tolist(), strict=True):
        out.append(-sft_weight * lp if z == 1 else (z - (beta * (lp - rl) + log_z)) ** 2)
    return torch.tensor(out, dtype=F64)


def naive_unlikelihood(token_logps, mask, label, reduction):
    """-z sum_t log p_t - (1 - z) sum_t log(1 - p_t), token by token with math.*."""
    out = []
    for row, m, z in zip(token_logps.tolist(), mask.tolist(), label.tolist(), strict=True):
        kept = [lp for lp, keep in zip(row, m, strict=True) if keep]
        like = sum(kept)
        unlike = sum(math.log(1.0 - math.exp(lp)) for lp in kept)
        if reduction == "mean":
            like, unlike = like / len(kept), unlike / len(kept)
        out.append(-z * like - (1 - z) * unlike)
    return torch.tensor(out, dtype=F64)


def naive_dpo(cw, crw, cl, crl, beta, eps):
    out = []
    for a, b, c, d in zip(cw.tolist(), crw.tolist(), cl.tolist(), crl.tolist(), strict=True):
        p = _sigmoid(beta * ((a - b) - (c - d)))
        out.append(-(1 - eps) * math.log(p) - eps * math.log(1 - p))
    return torch.tensor(out, dtype=F64)


def naive_ipo(cw, crw, cl, crl, beta):
    out = []
    for a, b, c, d in zip(cw.tolist(), crw.tolist(), cl.tolist(), crl.tolist(), strict=True):
        out.append(((a - b) - (c - d) - 1 / (2 * beta)) ** 2)
    return torch.tensor(out, dtype=F64)


def naive_kto(logps, ref_logps, desirable, kl, beta, w_d, w_u):
    kl = max(float(kl), 0.0)
    out = []
    for lp, rl, good in zip(logps.tolist(), ref_logps.tolist(), desirable.tolist(), strict=True):
        d = lp - rl
        if good:
            out.append(w_d * (1 - _sigmoid(beta * (d - kl))))
        else:
            out.append(w_u * (1 - _sigmoid(beta * (kl - d))))
    return torch.tensor(out, dtype=F64)


# ------------------------------------------------------------- values vs naive


@pytest.mark.parametrize("mode", ["bce", "mse"])
@pytest.mark.parametrize("log_z", [0.0, -0.7])
@pytest.mark.parametrize("beta", [0.1, 1.3])
def test_pointwise_dpo_matches_naive(mode, log_z, beta):
    logps, ref = _rand(N, seed=1), _rand(N, seed=2)
    label = _soft_labels(N, seed=3)
    label[:2] = torch.tensor([0.0, 1.0], dtype=F64)  # hard labels too
    loss, _ = pointwise_dpo_loss(logps, ref, label, beta=beta, mode=mode, log_z=log_z)
    expected = naive_pointwise(logps, ref, label, beta, mode, log_z)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sft_weight", [1.0, 0.3])
@pytest.mark.parametrize("log_z", [0.0, 0.4])
def test_ulma_matches_naive(sft_weight, log_z):
    logps, ref = _rand(N, seed=4), _rand(N, seed=5)
    label = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.25, 0.8, 0.0], dtype=F64)
    loss, _ = ulma_loss(logps, ref, label, beta=0.5, sft_weight=sft_weight, log_z=log_z)
    expected = naive_ulma(logps, ref, label, 0.5, sft_weight, log_z)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("log_z", [0.0, 0.4])
def test_ulma_mse_hybrid_matches_naive(log_z):
    logps, ref = _rand(N, seed=4), _rand(N, seed=5)
    label = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.25, 0.8, 0.0], dtype=F64)
    ref[0] = ref[2] = float("nan")  # demonstrations need no reference in this mode either
    logps.requires_grad_(True)
    loss, _ = ulma_loss(logps, ref, label, beta=0.5, sft_weight=0.7, log_z=log_z, mode="mse")
    expected = naive_ulma_mse(logps, ref, label, 0.5, 0.7, log_z)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    loss.sum().backward()
    assert torch.isfinite(logps.grad).all()
    # the score-1 rows are SFT rows, not squared errors (what pointwise_dpo's mse does)
    assert loss[0].item() == pytest.approx(-0.7 * logps[0].item())


def test_ulma_rejects_unknown_mode():
    x = torch.zeros(2, dtype=F64)
    with pytest.raises(ValueError, match="mode"):
        ulma_loss(x, x, x, beta=0.1, mode="hinge")


def _token_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    token_logps = torch.log(torch.rand(4, 6, generator=gen, dtype=F64) * 0.98 + 0.01)
    mask = torch.tensor(
        [[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]],
        dtype=F64,
    )
    return token_logps, mask


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_unlikelihood_matches_naive(reduction):
    from megatron_pwdpo.model.logprobs import sequence_logps

    token_logps, mask = _token_inputs(seed=60)
    label = torch.tensor([1.0, 0.0, 0.0, 0.3], dtype=F64)
    logps = sequence_logps(token_logps, mask, reduction=reduction)
    unlikely = sequence_logps(log1m_exp(token_logps), mask, reduction=reduction)
    loss, metrics = unlikelihood_loss(logps, unlikely, label, ref_logps=torch.zeros(4, dtype=F64))
    expected = naive_unlikelihood(token_logps, mask, label, reduction)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    assert set(metrics) == POINTWISE_KEYS


def test_log1m_exp_is_stable_and_floored():
    x = torch.tensor([-1e-12, -1e-4, -0.5, -0.7, -1.0, -30.0, -800.0, 0.0], dtype=F64)
    x.requires_grad_(True)
    got = log1m_exp(x)
    for value, lp in zip(got.tolist()[1:6], x.tolist()[1:6], strict=True):
        assert value == pytest.approx(math.log(-math.expm1(lp)), rel=1e-12)
    assert got[6].item() == 0.0  # log1p(-exp(-800)), no underflow to -inf
    # p = 1 (and padding with log-prob 0): floored at log(1e-5), finite, no gradient
    assert got[0].item() == got[7].item() == pytest.approx(math.log(1e-5), rel=1e-6)
    got.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[0] == x.grad[7] == 0.0
    # d/dx log(1 - e^x) = -e^x / (1 - e^x)
    assert x.grad[2].item() == pytest.approx(-math.exp(-0.5) / -math.expm1(-0.5), rel=1e-10)


def test_unlikelihood_pushes_undesirable_tokens_down():
    token_logps, mask = _token_inputs(seed=61)
    token_logps.requires_grad_(True)
    from megatron_pwdpo.model.logprobs import sequence_logps

    logps = sequence_logps(token_logps, mask, reduction="sum")
    unlikely = sequence_logps(log1m_exp(token_logps), mask, reduction="sum")
    label = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)
    loss, _ = unlikelihood_loss(logps, unlikely, label)
    loss.sum().backward()
    grad = token_logps.grad
    kept = mask.bool()
    # gradient descent raises desirable tokens' log-probs and lowers undesirable ones'
    assert (grad[0][kept[0]] < 0).all() and (grad[2][kept[2]] < 0).all()
    assert (grad[1][kept[1]] > 0).all() and (grad[3][kept[3]] > 0).all()
    assert (grad[~kept] == 0).all()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_matches_naive(eps):
    cw, crw, cl, crl = (_rand(N, seed=s) for s in (6, 7, 8, 9))
    loss, _ = dpo_loss(cw, crw, cl, crl, beta=0.2, label_smoothing=eps)
    torch.testing.assert_close(loss, naive_dpo(cw, crw, cl, crl, 0.2, eps), rtol=1e-10, atol=0)


@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_ipo_matches_naive(beta):
    cw, crw, cl, crl = (_rand(N, seed=s, scale=0.5) for s in (10, 11, 12, 13))
    loss, _ = ipo_loss(cw, crw, cl, crl, beta=beta)
    torch.testing.assert_close(loss, naive_ipo(cw, crw, cl, crl, beta), rtol=1e-10, atol=0)


@pytest.mark.parametrize("kl", [0.0, 0.3, -0.5])
def test_kto_matches_naive(kl):
    logps, ref = _rand(N, seed=14), _rand(N, seed=15)
    desirable = torch.tensor([True, False, True, True, False, False, True])
    loss, _ = kto_loss(
        logps,
        ref,
        desirable,
        torch.tensor(kl, dtype=F64),
        beta=0.4,
        desirable_weight=1.5,
        undesirable_weight=0.7,
    )
    expected = naive_kto(logps, ref, desirable, kl, 0.4, 1.5, 0.7)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


def test_sft_matches_naive():
    logps = -_rand(N, seed=16).abs()
    loss, metrics = sft_loss(logps)
    torch.testing.assert_close(loss, torch.tensor([-v for v in logps.tolist()], dtype=F64))
    torch.testing.assert_close(metrics["nll"], torch.tensor([-logps.sum().item(), float(N)]))


def test_pointwise_dpo_rejects_unknown_mode():
    x = torch.zeros(2, dtype=F64)
    with pytest.raises(ValueError, match="mode"):
        pointwise_dpo_loss(x, x, x, beta=0.1, mode="hinge")


def test_bce_is_stable_for_large_rewards():
    logps = torch.tensor([500.0, -500.0], dtype=F64)
    loss, _ = pointwise_dpo_loss(logps, torch.zeros(2, dtype=F64), torch.tensor([0.0, 1.0]), beta=1)
    torch.testing.assert_close(loss, torch.tensor([500.0, 500.0], dtype=F64))


# ------------------------------------------------------------- gradients


def _pairwise_inputs(seed):
    return [_rand(5, seed=seed + i, scale=0.5).requires_grad_() for i in range(4)]


GRADCHECK_CASES = {
    "pointwise_dpo_bce": (
        lambda lp, rl: pointwise_dpo_loss(lp, rl, _soft_labels(5, 20), beta=0.7, log_z=0.2)[0],
        2,
    ),
    "pointwise_dpo_mse": (
        lambda lp, rl: pointwise_dpo_loss(lp, rl, _soft_labels(5, 21), beta=0.7, mode="mse")[0],
        2,
    ),
    "ulma": (
        lambda lp, rl: ulma_loss(
            lp, rl, torch.tensor([1.0, 0.0, 0.4, 1.0, 0.0], dtype=F64), beta=0.7, sft_weight=0.5
        )[0],
        2,
    ),
    "kto": (
        lambda lp, rl: kto_loss(
            lp, rl, torch.tensor([True, False, True, False, True]), torch.tensor(0.1), beta=0.7
        )[0],
        2,
    ),
    "dpo": (lambda *a: dpo_loss(*a, beta=0.7, label_smoothing=0.1)[0], 4),
    "ipo": (lambda *a: ipo_loss(*a, beta=0.7)[0], 4),
    "sft": (lambda lp: sft_loss(lp)[0], 1),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK_CASES))
def test_gradcheck(name):
    fn, n_inputs = GRADCHECK_CASES[name]
    inputs = _pairwise_inputs(seed=30)[:n_inputs]
    assert torch.autograd.gradcheck(fn, inputs)


def _grad_wrt_logps(name, beta):
    logps = _rand(N, seed=40).requires_grad_()
    ref = _rand(N, seed=41)
    label = _soft_labels(N, seed=42)
    if name == "pointwise_dpo":
        loss, _ = pointwise_dpo_loss(logps, ref, label, beta=beta)
    elif name == "pointwise_dpo_mse":
        loss, _ = pointwise_dpo_loss(logps, ref, label, beta=beta, mode="mse")
    elif name == "dpo":
        loss, _ = dpo_loss(logps, ref, _rand(N, seed=43), _rand(N, seed=44), beta=beta)
    else:
        loss, _ = kto_loss(logps, ref, label > 0.5, torch.tensor(0.2), beta=beta)
    (grad,) = torch.autograd.grad(loss.sum(), logps)
    return grad


@pytest.mark.parametrize("name", ["pointwise_dpo", "pointwise_dpo_mse", "dpo", "kto"])
def test_gradients_vanish_as_beta_goes_to_zero(name):
    assert _grad_wrt_logps(name, beta=1e-8).abs().max() < 1e-7
    assert _grad_wrt_logps(name, beta=1.0).abs().max() > 1e-3  # the check can fail


# ------------------------------------------------------------- DESIGN §1 facts


@pytest.mark.parametrize("label", [0.0, 1.0, 0.5, 0.13])
def test_pointwise_bce_is_log2_at_step_zero(label):
    logps = _rand(N, seed=50)
    loss, metrics = pointwise_dpo_loss(
        logps, logps.clone(), torch.full((N,), label, dtype=F64), beta=0.3
    )
    torch.testing.assert_close(loss, torch.full((N,), math.log(2.0), dtype=F64))
    torch.testing.assert_close(metrics["accuracy"], torch.tensor([N / 2, float(N)]))


@pytest.mark.parametrize("log_z", [0.0, 0.6])
def test_label_flip_mirrors_reward(log_z):
    logps, ref, label = _rand(N, seed=51), _rand(N, seed=52), _soft_labels(N, seed=53)
    loss, _ = pointwise_dpo_loss(logps, ref, label, beta=0.8, log_z=log_z)
    # Swapping policy and reference (and negating log_z) maps r -> -r.
    mirrored, _ = pointwise_dpo_loss(ref, logps, 1 - label, beta=0.8, log_z=-log_z)
    torch.testing.assert_close(loss, mirrored, rtol=1e-12, atol=1e-12)
    unflipped, _ = pointwise_dpo_loss(ref, logps, label, beta=0.8, log_z=-log_z)
    assert not torch.allclose(loss, unflipped)


@pytest.mark.parametrize("sft_weight", [1.0, 2.5])
def test_ulma_demonstration_term_is_sft(sft_weight):
    logps, ref = _rand(N, seed=54), _rand(N, seed=55)
    label = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0], dtype=F64)
    loss, _ = ulma_loss(logps, ref, label, beta=0.3, sft_weight=sft_weight)
    demo = label == 1
    torch.testing.assert_close(loss[demo], sft_weight * sft_loss(logps)[0][demo])
    # ...and its negative term is point-wise DPO's with z = 0.
    pdpo, _ = pointwise_dpo_loss(logps, ref, torch.zeros(N, dtype=F64), beta=0.3)
    torch.testing.assert_close(loss[~demo], pdpo[~demo])


@pytest.mark.parametrize("missing", ["nan", "inf", "none"])
def test_ulma_demos_need_no_reference(missing):
    label = (
        torch.ones(N, dtype=F64) if missing == "none" else torch.tensor([1, 0, 1, 0.3, 1, 0, 1.0])
    )
    demo = label == 1
    finite_ref = _rand(N, seed=56)

    def run(ref):
        logps = _rand(N, seed=57).requires_grad_()
        loss, metrics = ulma_loss(logps, ref, label, beta=0.5)
        (grad,) = torch.autograd.grad(loss.sum(), logps)
        return loss.detach(), grad, metrics

    if missing == "none":
        holey = None
    else:
        holey = finite_ref.clone()
        holey[demo] = float(missing)
    loss, grad, metrics = run(holey)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())
    other_ref = finite_ref.clone()
    other_ref[demo] = 123.0  # any finite value on demo rows gives the same result
    loss_ref, grad_ref, _ = run(other_ref)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)


def test_ulma_gradcheck_with_nan_reference_on_demos():
    label = torch.tensor([1.0, 0.0, 1.0, 0.5], dtype=F64)
    ref = torch.tensor([float("nan"), 0.3, float("nan"), -0.2], dtype=F64, requires_grad=True)
    logps = _rand(4, seed=58).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda lp, rl: ulma_loss(lp, rl, label, beta=0.9)[0], (logps, ref)
    )
    loss, _ = ulma_loss(logps, ref, label, beta=0.9)
    loss.sum().backward()
    assert torch.isfinite(ref.grad).all() and torch.isfinite(logps.grad).all()
    assert (ref.grad[label == 1] == 0).all()


@pytest.mark.parametrize("bad_label", [0.0, 0.7])
def test_ulma_without_reference_needs_all_demos(bad_label):
    label = torch.tensor([1.0, bad_label, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="ref_logps is None"):
        ulma_loss(_rand(3, seed=59), None, label, beta=0.1)


def test_ulma_missing_reference_on_negative_is_loud():
    ref = torch.tensor([0.1, float("nan")], dtype=F64)
    loss, m = ulma_loss(_rand(2, seed=60), ref, torch.tensor([1.0, 0.0]), beta=0.1)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])
    # Reward metrics only count rows with a finite reference, so they stay finite.
    torch.testing.assert_close(m["reward_undesirable"], torch.zeros(2))
    assert torch.isfinite(m["logratio"]).all() and m["logratio"][1] == 1


def test_cdpo_with_zero_smoothing_is_dpo_and_matches_soft_pointwise():
    cw, crw, cl, crl = (_rand(N, seed=s) for s in (61, 62, 63, 64))
    plain, _ = dpo_loss(cw, crw, cl, crl, beta=0.25)
    smoothed0, _ = dpo_loss(cw, crw, cl, crl, beta=0.25, label_smoothing=0.0)
    torch.testing.assert_close(plain, smoothed0, rtol=0, atol=0)
    margin = (cw - crw) - (cl - crl)
    naive = [-math.log(_sigmoid(0.25 * v)) for v in margin.tolist()]
    torch.testing.assert_close(plain, torch.tensor(naive, dtype=F64))
    smoothed, _ = dpo_loss(cw, crw, cl, crl, beta=0.25, label_smoothing=0.2)
    assert not torch.allclose(plain, smoothed)
    # cDPO(eps) on margin h is point-wise BCE with soft label 1 - eps on r = beta h.
    soft, _ = pointwise_dpo_loss(
        margin, torch.zeros(N, dtype=F64), torch.full((N,), 0.8), beta=0.25
    )
    torch.testing.assert_close(smoothed, soft)


def test_kto_kl_is_clamped_and_detached():
    logps, ref = _rand(N, seed=65), _rand(N, seed=66)
    desirable = torch.tensor([True, False] * 3 + [True])
    kl = torch.tensor(-0.4, dtype=F64, requires_grad=True)
    loss, _ = kto_loss(logps, ref, desirable, kl, beta=0.5)
    zero, _ = kto_loss(logps, ref, desirable, torch.tensor(0.0, dtype=F64), beta=0.5)
    torch.testing.assert_close(loss, zero, rtol=0, atol=0)
    assert not loss.requires_grad  # nothing flows back into kl


# ------------------------------------------------------------- metrics


def _all_losses(requires_grad: bool):
    lp = _rand(6, seed=70).requires_grad_(requires_grad)
    rl = _rand(6, seed=71)
    label = torch.tensor([1.0, 0.0, 0.6, 0.2, 1.0, 0.0], dtype=F64)
    pair = (lp, rl, _rand(6, seed=72), _rand(6, seed=73))
    return {
        "pointwise_dpo": pointwise_dpo_loss(lp, rl, label, beta=0.1),
        "ulma": ulma_loss(lp, rl, label, beta=0.1),
        "dpo": dpo_loss(*pair, beta=0.1),
        "ipo": ipo_loss(*pair, beta=0.1),
        "kto": kto_loss(lp, rl, label > 0.5, torch.tensor(0.1), beta=0.1),
        "sft": sft_loss(lp),
        "unlikelihood": unlikelihood_loss(lp, log1m_exp(-lp.abs()), label, ref_logps=rl),
    }


POINTWISE_KEYS = {
    "reward_desirable",
    "reward_undesirable",
    "accuracy",
    "logratio",
    "loss_desirable",
    "loss_undesirable",
}
PAIRWISE_KEYS = {"reward_chosen", "reward_rejected", "pair_accuracy", "pair_margin", "logratio"}


def test_loss_names_have_functions():
    assert set(PAIRWISE_LOSSES) <= set(LOSS_NAMES)
    assert set(_all_losses(False)) == set(LOSS_NAMES)
    for name in LOSS_NAMES:
        assert callable(getattr(losses, f"{name}_loss"))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_metrics_are_detached_float32_sum_count(name):
    loss, metrics = _all_losses(requires_grad=True)[name]
    assert loss.shape == (6,) and loss.requires_grad
    expected_keys = (
        {"nll"} if name == "sft" else PAIRWISE_KEYS if name in PAIRWISE_LOSSES else POINTWISE_KEYS
    )
    if name == "kto":
        expected_keys = expected_keys | {"kl"}  # its reference point
    assert set(metrics) == expected_keys
    for value in metrics.values():
        assert value.shape == (2,) and value.dtype == torch.float32
        assert not value.requires_grad and value.grad_fn is None
        assert value[1] >= 0 and torch.isfinite(value).all()


def test_pointwise_metrics_on_known_rewards():
    logps = torch.tensor([2.0, -1.0, 0.0, 0.5], dtype=F64)
    label = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)
    _, m = pointwise_dpo_loss(logps, torch.zeros(4, dtype=F64), label, beta=1.0)  # r = logps
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected = {
        "reward_desirable": [2.0, 2],
        "reward_undesirable": [-0.5, 2],
        "accuracy": [1 + 1 + 0.5 + 0, 4],  # the tie r == 0 counts 0.5
        "logratio": [1.5, 4],
        "loss_desirable": [softplus(-2.0) + math.log(2.0), 2],
        "loss_undesirable": [softplus(-1.0) + softplus(0.5), 2],
    }
    for key, value in expected.items():
        torch.testing.assert_close(m[key], torch.tensor(value, dtype=torch.float32), msg=key)


def test_empty_class_gives_zero_sum_zero_count():
    _, m = pointwise_dpo_loss(_rand(3, seed=74), _rand(3, seed=75), torch.ones(3), beta=0.5)
    for key in ("reward_undesirable", "loss_undesirable"):
        torch.testing.assert_close(m[key], torch.zeros(2))
    assert m["reward_desirable"][1] == 3


def test_ulma_metrics_skip_rows_without_reference():
    logps = torch.tensor([-1.0, -2.0, -3.0, -0.5], dtype=F64)
    ref = torch.tensor([float("nan"), -2.5, -2.0, -1.0], dtype=F64)
    label = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64)
    loss, m = ulma_loss(logps, ref, label, beta=2.0)
    # Rows 1..3 have a reference: r = 2 * [0.5, -1.0, 0.5] = [1, -2, 1].
    torch.testing.assert_close(m["reward_desirable"], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(m["reward_undesirable"], torch.tensor([-1.0, 2.0]))
    torch.testing.assert_close(m["accuracy"], torch.tensor([2.0, 3.0]))  # row 3: r > 0, bad
    torch.testing.assert_close(m["logratio"], torch.tensor([0.0, 3.0]))
    torch.testing.assert_close(m["loss_desirable"], torch.tensor([3.0, 2.0]))  # both demos
    expected_undesirable = torch.tensor([loss[2:].sum().item(), 2.0], dtype=torch.float32)
    torch.testing.assert_close(m["loss_undesirable"], expected_undesirable)


def test_ulma_metrics_without_reference_count_nothing():
    _, m = ulma_loss(_rand(3, seed=76), None, torch.ones(3), beta=0.5)
    for key in ("reward_desirable", "reward_undesirable", "accuracy", "logratio"):
        torch.testing.assert_close(m[key], torch.zeros(2))
    assert m["loss_desirable"][1] == 3


@pytest.mark.parametrize("name", ["pointwise_dpo", "ulma", "kto"])
def test_pointwise_accuracy_is_chance_at_step_zero(name):
    logps = _rand(N, seed=77)
    label = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0], dtype=F64)
    if name == "kto":
        _, m = kto_loss(logps, logps.clone(), label > 0.5, torch.tensor(0.0), beta=0.3)
    else:
        _, m = getattr(losses, f"{name}_loss")(logps, logps.clone(), label, beta=0.3)
    torch.testing.assert_close(m["accuracy"], torch.tensor([N / 2, float(N)]))
    torch.testing.assert_close(m["reward_desirable"], torch.tensor([0.0, 3.0]))


@pytest.mark.parametrize("fn", [dpo_loss, ipo_loss])
def test_pairwise_metrics_on_known_rewards(fn):
    zeros = torch.zeros(3, dtype=F64)
    chosen = torch.tensor([2.0, 0.0, -1.0], dtype=F64)
    rejected = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    _, m = fn(chosen, zeros, rejected, zeros, beta=0.5)
    expected = {
        "reward_chosen": [0.5, 3],  # 0.5 * [2, 0, -1]
        "reward_rejected": [0.5, 3],  # 0.5 * [0, 0, 1]
        "pair_accuracy": [1.5, 3],  # win, tie, loss
        "pair_margin": [0.0, 3],  # [1, 0, -1]
        "logratio": [2.0, 6],  # over all six responses
    }
    for key, value in expected.items():
        torch.testing.assert_close(m[key], torch.tensor(value, dtype=torch.float32), msg=key)


def test_kto_metrics_use_beta_logratio():
    logps = torch.tensor([1.0, -1.0, 2.0], dtype=F64)
    _, m = kto_loss(
        logps,
        torch.zeros(3, dtype=F64),
        torch.tensor([True, True, False]),
        torch.tensor(5.0),
        beta=0.5,
    )
    torch.testing.assert_close(m["reward_desirable"], torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(m["reward_undesirable"], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(m["accuracy"], torch.tensor([1.0, 3.0]))


# ------------------------------------------------------------- purity


@pytest.mark.parametrize(
    "path", sorted(Path(losses.__file__).parent.glob("*.py")), ids=lambda p: p.name
)
def test_losses_modules_import_no_distributed_or_megatron(path):
    """Every module of ``losses/`` (DESIGN §2: pure math, no process group)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    if path.name != "__init__.py":
        assert names, "the AST walk found no imports"
    assert not [n for n in names if n.startswith(("torch.distributed", "megatron"))]


def test_step_feeds_unlikelihood_its_token_wise_term():
    """The training step's loss_func hands the unlikelihood objective ``log(1 - p_t)``
    reduced as ``logp`` is (config -> make_objective -> loss_func), and reports metrics."""
    from megatron_pwdpo.config import LossConfig
    from megatron_pwdpo.engine.step import loss_func, make_objective, metric_names

    token_logps, mask = _token_inputs(seed=62)
    label = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64)
    batch = {
        "loss_mask": mask,
        "label": label,
        "weight": torch.full((4,), 0.25, dtype=F64),
        "ref_logps": torch.zeros(4, dtype=F64),
    }
    for reduction in ("sum", "mean"):
        objective = make_objective(LossConfig(name="unlikelihood", logp_reduction=reduction))
        loss, report = loss_func(
            token_logps, batch=batch, objective=objective, reduction=reduction, grad_scale=1.0
        )
        expected = naive_unlikelihood(token_logps, mask, label, reduction).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
        assert set(report) == set(metric_names(objective))


def test_kto_reports_the_reference_point_it_used():
    logps, ref = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.5, -2.0, -2.5])
    desirable = torch.tensor([True, False, True])
    for kl, used in [(0.2, 0.2), (-0.3, 0.0)]:  # negative estimates are clamped to 0
        _, metrics = kto_loss(logps, ref, desirable, torch.tensor(kl), beta=0.5)
        total, count = metrics["kl"].tolist()
        assert count == 3 and total / count == pytest.approx(used)
