"""Held-out evaluation of trained policies against one frozen reference.

    megatron-pwdpo eval --config FILE --reference CKPT --policy NAME=CKPT [...] [--out JSON]
                        [section.field=value ...]

For every policy checkpoint, on the held-out rows of ``data`` (the same rows for every
policy; use ``data.hh_mode=paired`` so that pairs exist even for methods trained on
unpaired rows):

* the implicit reward ``r = beta (logp - ref_logp) + log_z`` of every row, with
  ``loss.beta``/``loss.log_z`` of the config and ``logp`` reduced over the response as
  the run trained it (``loss.logp_reduction``: ``sum`` or token ``mean``; ``reduction``
  in the output says which);
* ``pair_accuracy`` (``r_chosen > r_rejected``, a tie counts half) and ``pair_margin``
  (mean ``r_chosen - r_rejected``) over held-out pairs (ids ``<pair>-c`` / ``<pair>-r``),
  and the pair accuracy under both reductions (``pair_accuracy_sum``,
  ``pair_accuracy_mean``): a summed reward favours short responses by construction;
* ``pair_accuracy_chosen_shorter`` / ``pair_accuracy_chosen_longer``: the pair accuracy
  within the pairs whose chosen response has fewer / more response tokens than the
  rejected one (equal lengths are in neither), and ``margin_length_spearman``, the rank
  correlation of the margin with ``tokens_chosen - tokens_rejected``;
* ``accuracy``: point-wise, ``sign(r)`` agrees with ``label > 0.5`` (a tie counts half);
* ``loss``: the run's own loss (``loss.name``) on the held-out rows, the number the
  training loop logs as its eval loss (``None`` for ``kto``, whose loss needs a batch KL
  estimate);
* ``nll`` / ``ppl``: per-token negative log-likelihood of the held-out chosen
  (desirable) responses under the policy (total NLL over total response tokens, eos
  included) and its exponential;
* ``spearman``: rank correlation between rewards and labels (meaningful for continuous
  labels, e.g. the red-team source).

Uncertainty: every accuracy and the margin come with a 95% percentile-bootstrap interval
(``*_ci95``: ``[lo, hi]``; :data:`BOOTSTRAP_RESAMPLES` resamples of the pairs, or of the
rows for ``accuracy``, drawn with seed :data:`BOOTSTRAP_SEED`; the same resamples for
every policy). Beside the policies, the output holds ``length_baselines`` (on the same
pairs: ``shorter_wins`` / ``longer_wins``, the pair accuracy of "the response with fewer
/ more response tokens is chosen", ties half, with intervals, and the pair counts of each
stratum), ``paired_differences`` (for every two policies ``"a - b"``: the difference of
their pair accuracies with a paired-bootstrap interval over the same pairs, and the
share of resamples in which it is <= 0; also every policy against each length rule)
and ``bootstrap`` (resamples, seed, method).

It runs at the config's tensor and pipeline parallel sizes (checkpoints load at any
layout), one process or many: ``torchrun --nproc-per-node 8 -m megatron_pwdpo.cli eval
... parallel.tensor_parallel=8`` evaluates a model too large for one GPU; the ranks left
over are data-parallel replicas that share the rows. Rank 0 prints and writes the metrics.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from megatron_pwdpo.config import RunConfig
from megatron_pwdpo.evaluation.stats import (  # noqa: F401  (re-exported: the eval API)
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    ci95,
    find_pairs,
    length_baselines,
    paired_differences,
    rankdata,
    reward_metrics,
    spearman,
)

RESERVED_KEYS = ("length_baselines", "paired_differences", "bootstrap")


def held_out_loss(
    loss_config, logps: np.ndarray, ref_logps: np.ndarray, labels: np.ndarray, ids: list[str]
) -> float | None:
    """Mean per-row (per-pair for ``dpo``/``ipo``) loss of ``loss.name`` on the held-out
    rows, from the log-probs under the run's reduction: the training loop's eval loss.
    ``None`` for ``kto`` (batch KL point), ``unlikelihood`` (token-wise term) and ``sft``
    (trained on demonstrations only, always token-mean; see ``nll``)."""
    import torch

    from megatron_pwdpo.losses import pointwise as losses

    cfg = loss_config
    t = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    z, beta = t(labels), cfg.beta
    if cfg.name == "pointwise_dpo":
        per_row, _ = losses.pointwise_dpo_loss(
            t(logps), t(ref_logps), z, beta=beta, mode=cfg.mode, log_z=cfg.log_z
        )
    elif cfg.name == "ulma":
        per_row, _ = losses.ulma_loss(
            t(logps),
            t(ref_logps),
            z,
            beta=beta,
            sft_weight=cfg.sft_weight,
            log_z=cfg.log_z,
            mode=cfg.mode,
        )
    elif cfg.name in ("dpo", "ipo"):
        c, r = find_pairs(ids)
        if not len(c):
            return None
        args = (t(logps[c]), t(ref_logps[c]), t(logps[r]), t(ref_logps[r]))
        if cfg.name == "ipo":
            per_row, _ = losses.ipo_loss(*args, beta=beta)
        else:
            per_row, _ = losses.dpo_loss(*args, beta=beta, label_smoothing=cfg.label_smoothing)
    else:
        return None
    return float(per_row.mean())


def _check_checkpoints(config: RunConfig, *, reference: str, policies: dict[str, str]) -> None:
    """Every checkpoint exists and fits ``model``, before any process group or data.

    Raises:
        ConfigError: naming the flag (``--reference``, ``--policy NAME``) and the problem.
    """
    from megatron_pwdpo.config import ConfigError
    from megatron_pwdpo.convert import check_model_config
    from megatron_pwdpo.engine import checkpoint

    named = [("--reference", reference), *((f"--policy {n}", p) for n, p in policies.items())]
    for flag, path in named:
        try:
            checkpoint.resolve_checkpoint(path)
            check_model_config(config.model, path)
        except (FileNotFoundError, ConfigError) as err:
            raise ConfigError(f"{flag}: {err}") from None


def evaluate(config: RunConfig, *, reference: str, policies: dict[str, str]) -> dict[str, object]:
    """Metrics of every policy checkpoint on ``config``'s held-out rows, at the config's
    TP/PP layout with the remaining ranks as data-parallel replicas (any layout gives the
    same numbers; see ``row_logps``). The model is built once: the reference's log-probs
    first, then each policy's weights are loaded into it in turn.

    Returns:
        ``{policy name: metrics, "length_baselines": ..., "paired_differences": ...,
        "bootstrap": ...}`` (see :func:`score_policies`) on global rank 0; ``{}`` on the
        other ranks.
    """
    from megatron_pwdpo.config.validation import validate
    from megatron_pwdpo.data.prepare import prepare_data
    from megatron_pwdpo.engine import checkpoint
    from megatron_pwdpo.engine.setup import Layout, build_chunks
    from megatron_pwdpo.platform import cpu_bridge, distributed
    from megatron_pwdpo.platform.decisions import config_token_multiple
    from megatron_pwdpo.reference.row_logps import rows_logps

    # checkpoints reshard on load: the interleaved layout a run trained with is not needed
    config = replace(config, parallel=replace(config.parallel, virtual_pipeline=None))
    world_size = distributed.world_from_env().world_size
    validate(config, world_size=world_size)
    _check_checkpoints(config, reference=reference, policies=policies)
    data = prepare_data(config.data, vocab_size=config.model.vocab_size)
    rows = data.eval
    p = config.parallel
    world = distributed.init_distributed(
        tensor_parallel=p.tensor_parallel,
        pipeline_parallel=p.pipeline_parallel,
        virtual_pipeline=None,
        timeout_s=config.timeout_s,
    )
    try:
        cpu_bridge.manual_seed(config.train.seed)
        layout = Layout.current()
        chunks = build_chunks(config, wrap_ddp=False)
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()

        def logps_of(path: str) -> np.ndarray | None:
            checkpoint.load_checkpoint(chunks, path)
            out = rows_logps(
                rows,
                chunks,
                layout,
                pad_id=data.tokenizer.pad_id,
                micro_batch_size=config.train.micro_batch_size,
                reduction="sum",  # the token mean is derived below, exactly
                seq_length=config.data.seq_length,
                token_multiple=config_token_multiple(config),
            )
            return None if out is None else out.double().cpu().numpy()

        ref_logps = logps_of(reference)
        policy_logps = {name: logps_of(path) for name, path in policies.items()}
        if world.rank != 0:
            return {}
        return score_policies(config.loss, rows, ref_logps, policy_logps)
    finally:
        distributed.shutdown()


def score_policies(
    loss, rows, ref_sums: np.ndarray, policy_sums: dict[str, np.ndarray]
) -> dict[str, object]:
    """The eval output (module docstring) from summed response log-probs ``[n]``.

    The token mean is ``sum / tokens`` with ``tokens`` the row's response targets (eos
    included), what :func:`megatron_pwdpo.model.logprobs.sequence_logps` divides by.
    """
    ids = [r.id for r in rows]
    labels = np.array([r.label for r in rows], dtype=np.float64)
    tokens = np.array([r.input_ids.size - r.prompt_len for r in rows], dtype=np.float64)
    chosen = labels > 0.5

    def reduce(sums: np.ndarray, reduction: str) -> np.ndarray:
        return sums if reduction == "sum" else sums / np.maximum(tokens, 1.0)

    def rewards(sums: np.ndarray, reduction: str) -> np.ndarray:
        return loss.beta * (reduce(sums, reduction) - reduce(ref_sums, reduction)) + loss.log_z

    results: dict[str, object] = {}
    run_rewards = {}
    for name, sums in policy_sums.items():
        run_rewards[name] = rewards(sums, loss.logp_reduction)
        both = {red: rewards(sums, red) for red in ("sum", "mean")}
        metrics = reward_metrics(ids, labels, run_rewards[name], tokens=tokens, other_rewards=both)
        metrics["reduction"] = loss.logp_reduction
        logps = reduce(sums, loss.logp_reduction)
        ref = reduce(ref_sums, loss.logp_reduction)
        metrics["loss"] = held_out_loss(loss, logps, ref, labels, ids)
        nll = float(-sums[chosen].sum() / tokens[chosen].sum()) if chosen.any() else None
        metrics["nll"] = nll
        metrics["ppl"] = float(np.exp(nll)) if nll is not None else None
        results[name] = metrics
    results["length_baselines"] = length_baselines(ids, tokens)
    results["paired_differences"] = paired_differences(ids, run_rewards, tokens)
    results["bootstrap"] = {
        "resamples": BOOTSTRAP_RESAMPLES,
        "seed": BOOTSTRAP_SEED,
        "method": "percentile, 95%, pairs (rows for accuracy) resampled with replacement",
    }
    return results


def summary_lines(results: dict[str, object]) -> list[str]:
    """A few readable lines: pair accuracy with its interval per policy, the length rules."""

    def cell(value, interval) -> str:
        if value is None:
            return "—"
        return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else f"{value:.3f}"

    lines = []
    for name, m in results.items():
        if name in RESERVED_KEYS or "pair_accuracy" not in m:
            continue
        lines.append(
            f"{name}: pair accuracy ({m['reduction']}) "
            f"{cell(m['pair_accuracy'], m['pair_accuracy_ci95'])}, point-wise "
            f"{cell(m['accuracy'], m['accuracy_ci95'])}, margin {m['pair_margin']:+.4f}"
        )
    lb = results.get("length_baselines") or {}
    if lb.get("pairs"):
        lines.append(
            f"length only, {lb['pairs']} pairs: shorter wins "
            f"{cell(lb['shorter_wins'], lb['shorter_wins_ci95'])}, longer wins "
            f"{cell(lb['longer_wins'], lb['longer_wins_ci95'])}"
        )
    return lines


def _cmd_eval(args: argparse.Namespace) -> int:
    from megatron_pwdpo.config import ConfigError, load_config

    config = load_config(args.config, args.overrides)
    policies = {}
    for item in args.policy:
        name, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(f"--policy {item!r}: expected NAME=CHECKPOINT")
        if name in RESERVED_KEYS:
            raise ConfigError(f"--policy {item!r}: {name!r} is a reserved output key")
        policies[name] = path
    results = evaluate(config, reference=str(args.reference), policies=policies)
    if results:  # global rank 0
        text = json.dumps(results, indent=2)
        if args.out is not None:
            Path(args.out).write_text(text + "\n")
        print(text)
        print("\n".join(summary_lines(results)))
    return 0


def add_parser(sub) -> None:
    """``megatron-pwdpo eval`` (see the module docstring)."""
    p = sub.add_parser("eval", help="held-out implicit-reward metrics and NLL of checkpoints")
    p.add_argument("--config", type=Path, required=True, help="YAML config (data, model, loss)")
    p.add_argument("--reference", type=Path, required=True, help="reference checkpoint")
    p.add_argument("--policy", action="append", required=True, help="NAME=CHECKPOINT (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="write the metrics as JSON here")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")
    p.set_defaults(func=_cmd_eval)
