"""Alignment losses on per-sample log-probabilities: point-wise DPO, ULMA and baselines.

Every function here is pure torch: tensors in, tensors out, no process group.
Each returns the **unreduced** per-sample loss ``[n]`` and a dict of detached
metrics; the caller sums over the global batch and divides once.

Where the point-wise losses come from (Cai et al., 2023, ULMA, arXiv 2312.02554):

1. The KL-regularised objective ``max E[r(x, y)] - beta KL(pi || pi_ref)`` has the
   closed-form optimum ``pi(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x)``.
   Solving for the reward gives DPO's *implicit reward*::

       r(x, y) = beta * log pi(y|x) / pi_ref(y|x) + beta * log Z(x)
       r_i     = beta * (logp_i - ref_logp_i) + log_z          # here, per row

   ``log_z`` stands for the constant ``beta log Z(x)`` (0 by default, as in the
   reference code).
2. Pairwise DPO plugs ``r`` into Bradley-Terry, ``P(y_w > y_l) = sigmoid(r_w - r_l)``,
   and ``Z(x)`` cancels. Point-wise feedback has no pair: each row is one response
   with a label ``z`` in [0, 1]. Treat the row as a Bernoulli observation with
   ``P(desirable | x, y) = sigmoid(r)``; its negative log-likelihood is binary
   cross-entropy, the **point-wise DPO** loss::

       -[z log sigmoid(r) + (1 - z) log sigmoid(-r)]

   For continuous scores the paper also regresses the reward on the label,
   ``(z - r)^2``.
3. **ULMA**: a demonstration (``z = 1``) is trusted as it stands, so the KL leash
   to the reference is dropped and its term becomes plain maximum likelihood
   (SFT), ``-log pi(y|x)``; negatives keep the point-wise term
   ``-log sigmoid(-r)``, whose reference keeps the policy from collapsing::

       -z * w_sft * logp - (1 - z) * log sigmoid(-r)

   Demonstrations therefore need no reference forward pass at all.

   The authors' code also has a **continuous** ULMA (``mode="mse"`` here): rows whose
   score is not 1 regress the reward on the score, ``(z - r)^2``, and score-1 rows keep
   the SFT term; this is what their "MSE" means, not ``pointwise_dpo``'s ``mse`` (which
   regresses every row, demonstrations included, and is this project's extension).
4. **Unlikelihood training** (Welleck et al., 2019), a baseline of the paper: maximum
   likelihood on desirable rows, and on undesirable rows push every response token's
   probability ``p_t`` down through ``log(1 - p_t)``::

       -z * logp - (1 - z) * sum_t log(1 - p_t)      (or the token mean, as logp)

   It uses no reference.

Numerics: ``log(1 - sigmoid(x)) = log sigmoid(-x)`` and ``1 - sigmoid(x) =
sigmoid(-x)``; both are evaluated with the stable right-hand side.

Metrics: every value is a detached float32 tensor ``[2] = stack([sum, count])``
(no ``.item()``, no host sync). The caller adds them over micro-batches and
data-parallel ranks, then divides; a class with no rows gives ``[0, 0]``.
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_NAMES = ("pointwise_dpo", "ulma", "dpo", "ipo", "kto", "sft", "unlikelihood")
PAIRWISE_LOSSES = ("dpo", "ipo")

Metrics = dict[str, Tensor]


# ---------------------------------------------------------------- metric helpers


def _sum_count(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Returns detached float32 ``[2] = [sum(values[mask]), count(mask)]``.

    Masked-out rows are replaced (not multiplied) by 0, so NaN there never leaks.
    """
    values = values.detach().float()
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return torch.stack([total, mask.sum().float()])


def _agreement(score: Tensor, positive: Tensor) -> Tensor:
    """1 where sign(score) agrees with ``positive``, 0 where not, 0.5 on a tie."""
    sign = torch.sign(score.detach().float())  # (n,) in {-1, 0, 1}
    return 0.5 * (1.0 + torch.where(positive, sign, -sign))


def _pointwise_metrics(
    reward: Tensor,
    logratio: Tensor,
    loss: Tensor,
    desirable: Tensor,
    valid: Tensor | None = None,
) -> Metrics:
    """Point-wise metrics; reward/accuracy/logratio only over ``valid`` rows."""
    valid = torch.ones_like(desirable) if valid is None else valid
    return {
        "reward_desirable": _sum_count(reward, valid & desirable),
        "reward_undesirable": _sum_count(reward, valid & ~desirable),
        "accuracy": _sum_count(_agreement(reward, desirable), valid),
        "logratio": _sum_count(logratio, valid),
        "loss_desirable": _sum_count(loss, desirable),
        "loss_undesirable": _sum_count(loss, ~desirable),
    }


def _pairwise_metrics(
    chosen_logratio: Tensor, rejected_logratio: Tensor, *, beta: float
) -> Metrics:
    """Pairwise metrics from ``[n]`` chosen/rejected log-ratios; rewards are beta * ratio."""
    reward_chosen = beta * chosen_logratio.detach()
    reward_rejected = beta * rejected_logratio.detach()
    margin = reward_chosen - reward_rejected
    return {
        "reward_chosen": _sum_count(reward_chosen),
        "reward_rejected": _sum_count(reward_rejected),
        "pair_accuracy": _sum_count(_agreement(margin, torch.ones_like(margin, dtype=torch.bool))),
        "pair_margin": _sum_count(margin),
        # KL proxy over every response of the batch (chosen and rejected): count 2n.
        "logratio": _sum_count(torch.cat([chosen_logratio, rejected_logratio])),
    }


# ---------------------------------------------------------------- point-wise losses


def pointwise_dpo_loss(
    logps: Tensor,
    ref_logps: Tensor,
    label: Tensor,
    *,
    beta: float,
    mode: Literal["bce", "mse"] = "bce",
    log_z: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """Point-wise DPO: each row is a Bernoulli observation with P(desirable) = sigmoid(r).

    ``r = beta (logp - ref_logp) + log_z``::

        bce:  L = -[z log sigmoid(r) + (1 - z) log sigmoid(-r)]
        mse:  L = (z - r)^2

    Args:
      logps: ``[n]`` policy log-probabilities of the responses.
      ref_logps: ``[n]`` reference log-probabilities (finite).
      label: ``[n]`` labels ``z`` in [0, 1]; soft labels are allowed.
      beta: KL coefficient, the inverse temperature of the implicit reward.
      mode: ``"bce"`` (binary or soft labels) or ``"mse"`` (continuous scores).
      log_z: the log-partition constant added to every reward.

    Returns:
      ``(loss [n], metrics)``; metrics as in the module docstring, with classes
      split at ``z > 0.5``.

    References:
      Cai et al., 2023, ULMA, arXiv 2312.02554 (point-wise DPO).
    """
    logratio = logps - ref_logps  # (n,)
    reward = beta * logratio + log_z  # (n,)
    z = label.to(reward.dtype)
    if mode == "bce":
        # log(1 - sigmoid(r)) = logsigmoid(-r): stable for large |r|.
        loss = -(z * F.logsigmoid(reward) + (1.0 - z) * F.logsigmoid(-reward))
    elif mode == "mse":
        loss = (z - reward) ** 2
    else:
        raise ValueError(f"mode must be 'bce' or 'mse', got {mode!r}")
    return loss, _pointwise_metrics(reward, logratio, loss, z > 0.5)


def ulma_loss(
    logps: Tensor,
    ref_logps: Tensor | None,
    label: Tensor,
    *,
    beta: float,
    sft_weight: float = 1.0,
    log_z: float = 0.0,
    mode: Literal["bce", "mse"] = "bce",
) -> tuple[Tensor, Metrics]:
    """ULMA: SFT on demonstrations, point-wise DPO's negative term on the rest.

    ``r = beta (logp - ref_logp) + log_z``::

        bce:  L = -z * w_sft * logp - (1 - z) * log sigmoid(-r)
        mse:  L = -w_sft * logp      if z == 1
              L = (z - r)^2          otherwise

    ``mse`` is the authors' continuous ("MSE") ULMA: the squared error only on rows
    whose score is not 1, the SFT term on score-1 rows.

    Demonstration rows (``z == 1``) need no reference: there ``ref_logps`` may be
    NaN (or ``None`` for the whole batch when every row is a demonstration).
    Rows with ``0 < z < 1`` are weight mixtures of the two terms, so they need a
    finite reference like the negatives.

    Args:
      logps: ``[n]`` policy log-probabilities (token-mean, as in the paper's code).
      ref_logps: ``[n]`` reference log-probabilities, NaN allowed on demonstration
        rows, or ``None`` when every row is a demonstration.
      label: ``[n]`` labels ``z`` in [0, 1]; ``z == 1`` marks a demonstration.
      beta: KL coefficient of the negative term.
      sft_weight: ``w_sft``, the weight of the demonstration (SFT) term.
      log_z: the log-partition constant added to every reward.
      mode: ``"bce"`` (the paper's binary ULMA) or ``"mse"`` (the continuous hybrid).

    Returns:
      ``(loss [n], metrics)``; reward, accuracy and logratio metrics count only
      rows with a finite reference.

    Raises:
      ValueError: ``ref_logps`` is ``None`` but some row is not a demonstration
        (this check reads ``label`` on the host, the only sync in this module).

    References:
      Cai et al., 2023, ULMA, arXiv 2312.02554 (the hybrid objective).
    """
    z = label.to(logps.dtype)
    demo = z == 1  # (n,) bool
    if ref_logps is None:
        if not bool(demo.all()):
            raise ValueError("ulma_loss: ref_logps is None but some rows have label != 1")
        ref_logps = torch.full_like(logps, float("nan"))
    has_ref = torch.isfinite(ref_logps)  # (n,)
    # Replace missing references on the INPUT side: where() on the output alone
    # still back-propagates 0 * NaN = NaN into logps. NaN on a non-demo row is a
    # caller error and is left to surface in the loss.
    safe_ref = torch.where(demo & ~has_ref, torch.zeros_like(ref_logps), ref_logps)
    logratio = logps - safe_ref  # (n,)
    reward = beta * logratio + log_z  # (n,)
    if mode == "bce":
        # log(1 - sigmoid(r)) = logsigmoid(-r); (1 - z) = 0 zeroes it on demonstrations.
        loss = -z * sft_weight * logps - (1.0 - z) * F.logsigmoid(-reward)
    elif mode == "mse":
        # where() picks per row; safe_ref keeps the unpicked branch finite (no NaN grad)
        loss = torch.where(demo, -sft_weight * logps, (z - reward) ** 2)
    else:
        raise ValueError(f"mode must be 'bce' or 'mse', got {mode!r}")
    return loss, _pointwise_metrics(reward, logratio, loss, z > 0.5, valid=has_ref)


def kto_loss(
    logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Metrics]:
    """KTO (Kahneman-Tversky optimisation), a point-wise baseline.

    ``d = logp - ref_logp``::

        desirable:    L = w_D (1 - sigmoid(beta (d - kl)))
        undesirable:  L = w_U (1 - sigmoid(beta (kl - d)))

    Args:
      logps: ``[n]`` policy log-probabilities.
      ref_logps: ``[n]`` reference log-probabilities.
      desirable: ``[n]`` bool, True for desirable rows.
      kl: scalar reference point, the batch KL estimate from mismatched
        (prompt, response) pairs; the caller detaches it, averages it over
        data-parallel ranks and clamps it at 0 (done again here defensively).
      beta: KL coefficient.
      desirable_weight: ``w_D``.
      undesirable_weight: ``w_U``.

    Returns:
      ``(loss [n], metrics)``; the metric reward is ``beta (logp - ref_logp)``, ``kl``
      the reference point used (clamped at 0).

    References:
      Ethayarajh et al., 2024, KTO: Model Alignment as Prospect Theoretic
      Optimization, arXiv 2402.01306.
    """
    kl = torch.as_tensor(kl, dtype=logps.dtype, device=logps.device).detach().clamp_min(0)
    logratio = logps - ref_logps  # (n,)
    # 1 - sigmoid(x) = sigmoid(-x): avoids cancellation when sigmoid(x) ~ 1.
    loss_d = desirable_weight * torch.sigmoid(-beta * (logratio - kl))
    loss_u = undesirable_weight * torch.sigmoid(-beta * (kl - logratio))
    loss = torch.where(desirable, loss_d, loss_u)
    metrics = _pointwise_metrics(beta * logratio, logratio, loss, desirable)
    metrics["kl"] = _sum_count(kl.expand_as(loss))  # the reference point of the step
    return loss, metrics


def sft_loss(logps: Tensor) -> tuple[Tensor, Metrics]:
    """Supervised fine-tuning: the negative log-likelihood ``L = -logp``.

    Args:
      logps: ``[n]`` policy log-probabilities (the caller passes token means).

    Returns:
      ``(loss [n], {"nll": [sum, count]})``.
    """
    loss = -logps
    return loss, {"nll": _sum_count(loss)}


def log1m_exp(token_logps: Tensor, *, min_complement: float = 1e-5) -> Tensor:
    """``log(1 - p)`` from ``log p``, elementwise, stable over the whole range.

    ``log(-expm1(x))`` near ``x = 0`` and ``log1p(-exp(x))`` below ``-log 2`` (Maechler,
    2012). ``1 - p`` is floored at ``min_complement`` (as Welleck et al. clamp it), so a
    token with ``p = 1``, or padding whose log-prob is 0, gives a finite value with no
    gradient instead of ``-inf``.

    Args:
      token_logps: ``[...]`` log-probabilities (<= 0).

    Returns:
      ``[...]`` ``log(1 - exp(token_logps))``, at least ``log(min_complement)``.
    """
    x = token_logps.clamp_max(math.log1p(-min_complement))  # 1 - p >= min_complement
    near_zero = x > -math.log(2.0)
    # each branch gets an input where it is finite, so where() back-propagates no NaN
    a = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -1.0), x)))
    return torch.where(near_zero, a, b)


def unlikelihood_loss(
    logps: Tensor,
    unlikely_logps: Tensor,
    label: Tensor,
    *,
    ref_logps: Tensor | None = None,
    beta: float = 0.1,
) -> tuple[Tensor, Metrics]:
    """Unlikelihood training: likelihood up on desirable rows, token-wise down on the rest.

    ::

        L = -z * logp - (1 - z) * unlikely_logp,   unlikely_logp = sum_t log(1 - p_t)

    (``unlikely_logp`` is reduced over the response tokens as ``logp`` is: sum or
    token mean; see :func:`log1m_exp`). The loss needs no reference; with one, the
    metrics report the implicit reward ``beta (logp - ref_logp)`` as for the other
    point-wise losses (for monitoring only).

    Args:
      logps: ``[n]`` policy log-probabilities of the responses.
      unlikely_logps: ``[n]`` the same rows' ``log(1 - p_t)`` reduced over tokens.
      label: ``[n]`` labels ``z`` in [0, 1] (1 = desirable).
      ref_logps: ``[n]`` reference log-probabilities, or ``None`` (metrics then use
        ``logp`` itself as the score).
      beta: scale of the monitored reward.

    Returns:
      ``(loss [n], metrics)``.

    References:
      Welleck et al., 2019, Neural Text Generation with Unlikelihood Training,
      arXiv 1908.04319; a baseline of Cai et al., 2023 (ULMA).
    """
    z = label.to(logps.dtype)
    loss = -z * logps - (1.0 - z) * unlikely_logps
    logratio = logps if ref_logps is None else logps - ref_logps
    return loss, _pointwise_metrics(beta * logratio, logratio, loss, z > 0.5)


# ---------------------------------------------------------------- pairwise baselines


def dpo_loss(
    chosen_logps: Tensor,
    chosen_ref_logps: Tensor,
    rejected_logps: Tensor,
    rejected_ref_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """Pairwise DPO with optional label smoothing (cDPO).

    ``h = (logp_w - ref_w) - (logp_l - ref_l)``::

        L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)

    ``eps`` is the assumed probability that a pair's label is flipped.

    Args:
      chosen_logps: ``[n]`` policy log-probabilities of the chosen responses.
      chosen_ref_logps: ``[n]`` reference log-probabilities of the chosen responses.
      rejected_logps: ``[n]`` policy log-probabilities of the rejected responses.
      rejected_ref_logps: ``[n]`` reference log-probabilities of the rejected ones.
      beta: KL coefficient.
      label_smoothing: ``eps`` in [0, 0.5); 0 is plain DPO.

    Returns:
      ``(loss [n], metrics)`` with pairwise metrics (``logratio`` counts 2n responses).

    References:
      Rafailov et al., 2023, Direct Preference Optimization, arXiv 2305.18290;
      Mitchell, 2023, "A note on DPO with noisy preferences" (cDPO).
    """
    chosen_logratio = chosen_logps - chosen_ref_logps  # (n,)
    rejected_logratio = rejected_logps - rejected_ref_logps  # (n,)
    logits = beta * (chosen_logratio - rejected_logratio)  # (n,) = beta h
    loss = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return loss, _pairwise_metrics(chosen_logratio, rejected_logratio, beta=beta)


def ipo_loss(
    chosen_logps: Tensor,
    chosen_ref_logps: Tensor,
    rejected_logps: Tensor,
    rejected_ref_logps: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Metrics]:
    """IPO: regress the log-ratio margin onto ``1 / (2 beta)``.

    ``h = (logp_w - ref_w) - (logp_l - ref_l)``::

        L = (h - 1 / (2 beta))^2

    The target margin is per token, so the caller passes **token-mean** log-probs
    (``logp_reduction = "mean"``), as in the IPO paper.

    Args:
      chosen_logps: ``[n]`` mean policy log-probabilities of the chosen responses.
      chosen_ref_logps: ``[n]`` mean reference log-probabilities of the chosen ones.
      rejected_logps: ``[n]`` mean policy log-probabilities of the rejected ones.
      rejected_ref_logps: ``[n]`` mean reference log-probabilities of the rejected.
      beta: regularisation strength ``tau``; must be > 0.

    Returns:
      ``(loss [n], metrics)`` with pairwise metrics, rewards ``beta (logp - ref)``.

    References:
      Azar et al., 2023, A General Theoretical Paradigm to Understand Learning
      from Human Preferences, arXiv 2310.12036.
    """
    chosen_logratio = chosen_logps - chosen_ref_logps  # (n,)
    rejected_logratio = rejected_logps - rejected_ref_logps  # (n,)
    h = chosen_logratio - rejected_logratio  # (n,)
    loss = (h - 1.0 / (2.0 * beta)) ** 2
    return loss, _pairwise_metrics(chosen_logratio, rejected_logratio, beta=beta)
