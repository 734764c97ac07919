"""What a resumed run may change: the saved config against the new one.

A checkpoint stores the config that wrote it (``common["config"]``). A run that resumes
from it compares field by field: a change that would corrupt the run is refused (in one
line, naming every such field, before any process group exists); a safe one is allowed
and logged. Everything not listed as safe is refused, so a field added later is
protected until someone decides otherwise.

Safe (:data:`SAFE_ON_RESUME`), and why:

* ``run_dir``, ``resume``, ``timeout_s``: where and how the run is started, not what it
  computes (a moved ``run_dir`` resumes from its own checkpoints).
* ``train.steps``: extend or shorten the run; the LR schedule is rebuilt for the new
  length from the step reached (the config overrides the saved schedule).
* ``train.lr``, ``train.sft_lr``, ``train.min_lr``, ``train.warmup_steps``,
  ``train.weight_decay``, ``train.clip_grad``: the optimizer's hyper-parameters, applied
  from the next step on (the schedule's position is kept, its values are the new config's).
* ``train.micro_batch_size``: how a global batch is cut for gradient accumulation; the
  same rows form each step (only float summation order changes).
* ``train.eval_interval``, ``train.log_interval``, ``train.progress``,
  ``train.save_interval``, ``train.keep_checkpoints``, ``train.time_budget_s``,
  ``train.max_bad_steps_in_a_row``, ``logging.*``: logging, checkpointing and stopping.
* ``parallel.*``: the layout; torch_dist reshards weights and optimizer state on load
  (only the RNG states, which belong to a layout, are not restored).

Refused, among others: ``model.*`` (shapes: the checkpoint would not load, or load
wrong), ``data.*`` (rows, split, tokenizer, sequence length: the step's data would
change), ``loss.*``, ``reference.*``, ``precision.*`` (the optimizer's state layout and
the reference's numbers), ``train.seed`` and ``train.global_batch_size`` (the data order
and position), ``train.sft_steps`` (where each stage starts), ``train.adam_beta1/2``
(restored from the saved optimizer state, so a change would be silently ignored) and
``train.init_checkpoint`` (the reference of a preference stage may be read from it).
"""

from __future__ import annotations

from typing import Any

import yaml

from megatron_pwdpo.config import ConfigError, RunConfig, to_dict

SAFE_ON_RESUME = (
    "run_dir",
    "resume",
    "timeout_s",
    "train.steps",
    "train.lr",
    "train.sft_lr",
    "train.min_lr",
    "train.warmup_steps",
    "train.weight_decay",
    "train.clip_grad",
    "train.micro_batch_size",
    "train.eval_interval",
    "train.log_interval",
    "train.progress",
    "train.save_interval",
    "train.keep_checkpoints",
    "train.time_budget_s",
    "train.max_bad_steps_in_a_row",
    "logging.*",
    "parallel.*",
)


def is_safe(key: str) -> bool:
    """Whether ``key`` (``section.field``) may change when a run resumes."""
    return any(
        key == safe or (safe.endswith(".*") and key.startswith(safe[:-1]))
        for safe in SAFE_ON_RESUME
    )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_changes(saved: dict[str, Any], new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, new value)}`` for every field that differs.

    A field the saved config lacks (written before the field existed) compares as its
    default; a saved field this version no longer knows is ignored.
    """
    now, default = _flatten(to_dict(new)), _flatten(to_dict(RunConfig()))
    before = _flatten(saved)
    return {
        key: (before.get(key, default[key]), value)
        for key, value in now.items()
        if before.get(key, default[key]) != value
    }


def check_resume_config(saved_yaml: str | None, new: RunConfig, *, where: str) -> list[str]:
    """Refuse unsafe changes between the config saved in ``where`` and ``new``.

    Returns:
        ``key: old -> new`` for each allowed change (to log).

    Raises:
        ConfigError: a field outside :data:`SAFE_ON_RESUME` changed (all are named).
    """
    if not saved_yaml:
        return []
    changes = config_changes(yaml.safe_load(saved_yaml) or {}, new)
    text = {key: f"{key}: {old!r} -> {value!r}" for key, (old, value) in changes.items()}
    refused = [text[key] for key in changes if not is_safe(key)]
    if refused:
        raise ConfigError(
            f"resuming from {where} with a config that changes what the run computes "
            f"({'; '.join(refused)}): put these back, or start a new run_dir "
            "(README, 'What a resumed run may change')"
        )
    return [text[key] for key in changes]
