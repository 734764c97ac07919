"""The statistics of ``megatron-pwdpo eval`` (see ``megatron_pwdpo.evaluation.evaluate``), pure
numpy on per-row arrays: ranks and Spearman, percentile-bootstrap intervals with a fixed
seed, pairs found by id (``<pair>-c`` / ``<pair>-r``), the length-only rules, per-policy
reward metrics with length strata, and paired differences between policies."""

from __future__ import annotations

from itertools import combinations

import numpy as np


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get their average rank (as ``scipy.stats.rankdata``)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks); NaN if either is constant."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(np.sqrt((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def _agreement(score: np.ndarray, positive: np.ndarray) -> np.ndarray:
    sign = np.sign(score)
    return 0.5 * (1.0 + np.where(positive, sign, -sign))


BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def bootstrap_indices(n: int, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED):
    """``[resamples, n]`` indices drawn with replacement (the same for a given ``n``)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def ci95(values: np.ndarray, indices: np.ndarray | None = None) -> list[float] | None:
    """Percentile-bootstrap 95% interval ``[lo, hi]`` of ``values.mean()``; ``None`` if empty.

    Args:
        values: ``[n]`` per-item values (a 0/0.5/1 correctness, a margin, a difference).
        indices: ``[B, n]`` resample indices (:func:`bootstrap_indices` if ``None``).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return None
    idx = bootstrap_indices(values.size) if indices is None else indices
    means = values[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [float(lo), float(hi)]


def find_pairs(ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(chosen [p], rejected [p])`` of the pairs ``<pair>-c`` / ``<pair>-r``."""
    index = {row_id: i for i, row_id in enumerate(ids)}
    pairs = [
        (i, index[row_id[:-2] + "-r"])
        for i, row_id in enumerate(ids)
        if row_id.endswith("-c") and row_id[:-2] + "-r" in index
    ]
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    chosen, rejected = (np.array(side, dtype=np.int64) for side in zip(*pairs, strict=True))
    return chosen, rejected


def pair_correct(margin: np.ndarray) -> np.ndarray:
    """``[p]`` 1 where the chosen response scores higher, 0 where lower, 0.5 on a tie."""
    return _agreement(margin, np.ones(len(margin), bool))


def length_baselines(ids: list[str], tokens: np.ndarray) -> dict[str, object]:
    """The length-only rules on the held-out pairs (module docstring), with intervals."""
    chosen, rejected = find_pairs(ids)
    diff = tokens[chosen] - tokens[rejected]  # > 0: chosen is longer
    shorter = pair_correct(-diff)  # "the shorter response is chosen"
    longer = pair_correct(diff)
    return {
        "pairs": len(chosen),
        "shorter_wins": float(shorter.mean()) if len(chosen) else None,
        "shorter_wins_ci95": ci95(shorter),
        "longer_wins": float(longer.mean()) if len(chosen) else None,
        "longer_wins_ci95": ci95(longer),
        "chosen_shorter_pairs": int((diff < 0).sum()),
        "chosen_longer_pairs": int((diff > 0).sum()),
        "equal_length_pairs": int((diff == 0).sum()),
    }


def reward_metrics(
    ids: list[str],
    labels: np.ndarray,
    rewards: np.ndarray,
    *,
    tokens: np.ndarray | None = None,
    other_rewards: dict[str, np.ndarray] | None = None,
) -> dict[str, object]:
    """Pairwise and point-wise metrics of per-row implicit rewards (module docstring).

    Args:
        ids: ``[n]`` row ids (pairs are ``<pair>-c`` / ``<pair>-r``).
        labels: ``[n]`` labels in [0, 1].
        rewards: ``[n]`` implicit rewards under the run's reduction.
        tokens: ``[n]`` response tokens per row: adds the length strata.
        other_rewards: ``{suffix: [n] rewards}``, e.g. ``{"sum": ..., "mean": ...}``: adds
            ``pair_accuracy_<suffix>`` (and its interval) for each.
    """
    chosen, rejected = find_pairs(ids)
    rho = spearman(rewards, labels)
    point = _agreement(rewards, labels > 0.5)
    out = {
        "accuracy": float(point.mean()),
        "accuracy_ci95": ci95(point),
        "reward_desirable": float(rewards[labels > 0.5].mean()) if (labels > 0.5).any() else None,
        "reward_undesirable": float(rewards[labels <= 0.5].mean())
        if (labels <= 0.5).any()
        else None,
        "spearman": rho if np.isfinite(rho) else None,  # None: constant rewards (policy = ref)
        "rows": len(ids),
        "pairs": len(chosen),
    }
    if not len(chosen):
        return out
    idx = bootstrap_indices(len(chosen))
    margin = rewards[chosen] - rewards[rejected]
    correct = pair_correct(margin)
    out["pair_accuracy"] = float(correct.mean())
    out["pair_accuracy_ci95"] = ci95(correct, idx)
    out["pair_margin"] = float(margin.mean())
    out["pair_margin_ci95"] = ci95(margin, idx)
    for suffix, other in (other_rewards or {}).items():
        other_correct = pair_correct(other[chosen] - other[rejected])
        out[f"pair_accuracy_{suffix}"] = float(other_correct.mean())
        out[f"pair_accuracy_{suffix}_ci95"] = ci95(other_correct, idx)
    if tokens is not None:
        diff = tokens[chosen] - tokens[rejected]
        for name, stratum in (("chosen_shorter", diff < 0), ("chosen_longer", diff > 0)):
            kept = correct[stratum]
            out[f"pair_accuracy_{name}"] = float(kept.mean()) if kept.size else None
            out[f"pair_accuracy_{name}_ci95"] = ci95(kept)
        rho_len = spearman(margin, diff)
        out["margin_length_spearman"] = rho_len if np.isfinite(rho_len) else None
    return out


def paired_differences(
    ids: list[str], rewards: dict[str, np.ndarray], tokens: np.ndarray | None = None
) -> dict[str, dict[str, object]]:
    """Pair-accuracy differences over the same pairs, with paired-bootstrap intervals.

    ``{"a - b": {"pair_accuracy": mean difference, "pair_accuracy_ci95": [lo, hi],
    "p_le_0": share of resamples with a difference <= 0}}`` for every two policies and,
    with ``tokens``, for every policy against the length rules ``shorter_wins`` and
    ``longer_wins`` (scores ``-tokens`` and ``tokens``).
    """
    chosen, rejected = find_pairs(ids)
    if not len(chosen):
        return {}
    idx = bootstrap_indices(len(chosen))
    correct = {k: pair_correct(r[chosen] - r[rejected]) for k, r in rewards.items()}
    comparisons = list(combinations(rewards, 2))
    if tokens is not None:
        diff_len = tokens[chosen] - tokens[rejected]
        correct["shorter_wins"] = pair_correct(-diff_len)
        correct["longer_wins"] = pair_correct(diff_len)
        comparisons += [(a, rule) for a in rewards for rule in ("shorter_wins", "longer_wins")]
    out = {}
    for a, b in comparisons:
        diff = correct[a] - correct[b]  # [p] per pair, in {-1, -0.5, 0, 0.5, 1}
        means = diff[idx].mean(axis=1)
        lo, hi = np.percentile(means, [2.5, 97.5])
        out[f"{a} - {b}"] = {
            "pair_accuracy": float(diff.mean()),
            "pair_accuracy_ci95": [float(lo), float(hi)],
            "p_le_0": float((means <= 0).mean()),
        }
    return out
