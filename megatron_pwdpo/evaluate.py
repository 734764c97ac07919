"""Held-out evaluation of trained policies against one frozen reference.

    megatron-pwdpo eval --config FILE --reference CKPT --policy NAME=CKPT [...] [--out JSON]
                        [section.field=value ...]

For every policy checkpoint, on the held-out rows of ``data`` (the same rows for every
policy; use ``data.hh_mode=paired`` so that pairs exist even for methods trained on
unpaired rows):

* the implicit reward ``r = beta (logp - ref_logp) + log_z`` of every row, with
  ``loss.beta``/``loss.logp_reduction``/``loss.log_z`` of the config;
* ``pair_accuracy`` (``r_chosen > r_rejected``, a tie counts half) and ``pair_margin``
  (mean ``r_chosen - r_rejected``) over held-out pairs (ids ``<pair>-c`` / ``<pair>-r``);
* ``accuracy``: point-wise, ``sign(r)`` agrees with ``label > 0.5`` (a tie counts half);
* ``nll`` / ``ppl``: per-token negative log-likelihood of the held-out chosen
  (desirable) responses under the policy (total NLL over total response tokens, eos
  included) and its exponential;
* ``spearman``: rank correlation between rewards and labels (meaningful for continuous
  labels, e.g. the red-team source).

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


def reward_metrics(
    ids: list[str],
    labels: np.ndarray,
    rewards: np.ndarray,
) -> dict[str, float]:
    """Pairwise and point-wise metrics of per-row implicit rewards (module docstring)."""
    index = {row_id: i for i, row_id in enumerate(ids)}
    pairs = [
        (i, index[row_id[:-2] + "-r"])
        for i, row_id in enumerate(ids)
        if row_id.endswith("-c") and row_id[:-2] + "-r" in index
    ]
    rho = spearman(rewards, labels)
    out = {
        "accuracy": float(_agreement(rewards, labels > 0.5).mean()),
        "reward_desirable": float(rewards[labels > 0.5].mean()) if (labels > 0.5).any() else None,
        "reward_undesirable": float(rewards[labels <= 0.5].mean())
        if (labels <= 0.5).any()
        else None,
        "spearman": rho if np.isfinite(rho) else None,  # None: constant rewards (policy = ref)
        "rows": len(ids),
        "pairs": len(pairs),
    }
    if pairs:
        chosen, rejected = (np.array(side) for side in zip(*pairs, strict=True))
        margin = rewards[chosen] - rewards[rejected]
        out["pair_accuracy"] = float(_agreement(margin, np.ones(len(margin), bool)).mean())
        out["pair_margin"] = float(margin.mean())
    return out


def _check_checkpoints(config: RunConfig, *, reference: str, policies: dict[str, str]) -> None:
    """Every checkpoint exists and fits ``model``, before any process group or data.

    Raises:
        ConfigError: naming the flag (``--reference``, ``--policy NAME``) and the problem.
    """
    from megatron_pwdpo import checkpoint
    from megatron_pwdpo.config import ConfigError
    from megatron_pwdpo.convert import check_model_config

    named = [("--reference", reference), *((f"--policy {n}", p) for n, p in policies.items())]
    for flag, path in named:
        try:
            checkpoint.resolve_checkpoint(path)
            check_model_config(config.model, path)
        except (FileNotFoundError, ConfigError) as err:
            raise ConfigError(f"{flag}: {err}") from None


def evaluate(
    config: RunConfig, *, reference: str, policies: dict[str, str]
) -> dict[str, dict[str, float]]:
    """Metrics of every policy checkpoint on ``config``'s held-out rows, at the config's
    TP/PP layout with the remaining ranks as data-parallel replicas (any layout gives the
    same numbers; see ``row_logps``). The model is built once: the reference's log-probs
    first, then each policy's weights are loaded into it in turn.

    Returns:
        ``{policy name: metrics}`` on global rank 0; ``{}`` on the other ranks.
    """
    from megatron_pwdpo import checkpoint, cpu_bridge, distributed
    from megatron_pwdpo.data.prepare import prepare_data
    from megatron_pwdpo.platform import config_token_multiple
    from megatron_pwdpo.row_logps import rows_logps
    from megatron_pwdpo.training_setup import Layout, build_chunks
    from megatron_pwdpo.validation import validate

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
                reduction="sum",
                seq_length=config.data.seq_length,
                token_multiple=config_token_multiple(config),
            )
            return None if out is None else out.double().cpu().numpy()

        ref_logps = logps_of(reference)
        policy_logps = {name: logps_of(path) for name, path in policies.items()}
        if world.rank != 0:
            return {}
        ids = [r.id for r in rows]
        labels = np.array([r.label for r in rows], dtype=np.float64)
        tokens = np.array([r.input_ids.size - r.prompt_len for r in rows], dtype=np.float64)
        chosen = labels > 0.5
        loss = config.loss
        results = {}
        for name, logps in policy_logps.items():
            rewards = loss.beta * (logps - ref_logps) + loss.log_z
            metrics = reward_metrics(ids, labels, rewards)
            nll = float(-logps[chosen].sum() / tokens[chosen].sum()) if chosen.any() else None
            metrics["nll"] = nll
            metrics["ppl"] = float(np.exp(nll)) if nll is not None else None
            results[name] = metrics
        return results
    finally:
        distributed.shutdown()


def _cmd_eval(args: argparse.Namespace) -> int:
    from megatron_pwdpo.config import ConfigError, load_config

    config = load_config(args.config, args.overrides)
    policies = {}
    for item in args.policy:
        name, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(f"--policy {item!r}: expected NAME=CHECKPOINT")
        policies[name] = path
    results = evaluate(config, reference=str(args.reference), policies=policies)
    if results:  # global rank 0
        text = json.dumps(results, indent=2)
        if args.out is not None:
            Path(args.out).write_text(text + "\n")
        print(text)
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
