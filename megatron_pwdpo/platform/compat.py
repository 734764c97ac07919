"""Where the megatron-core releases this project supports differ, or need a fix, in one place.

Supported and tested in CI (``.ci/run``): megatron-core **0.16.1** (the newest release for
Python 3.11) and **0.19.2** (Python 3.12, the line clusters and NGC containers run), with
Megatron-LM's ``megatron/training`` at ``core_v0.16.1`` and ``core_v0.19.0``. Releases
between the two are declared (``pyproject.toml``) but not run here. Each entry names the
releases it covers; no other module checks versions. These are not CUDA bridges (see
:mod:`megatron_pwdpo.platform.cpu_bridge` for those).

**Fixes** to megatron-core, applied once per process by :func:`install` (CPU and GPU):

* ``DistributedOptimizer._set_main_param_and_optimizer_states`` (0.16.1 - 0.19.2): loading
  a ``fully_reshardable`` optimizer checkpoint with torch's Adam (the optimizer megatron
  uses without Transformer Engine or apex) copies every key of a parameter's optimizer
  state from the loaded tensors, ``step`` included, but the loader leaves ``step`` out of
  those tensors (torch's ``step`` is restored from the param groups by
  ``load_state_dict``): ``KeyError: 'step'``. The shim copies only the keys the loader
  provides, which is what the fused Adams (whose state has no ``step``) get.
* ``DistributedOptimizer.load_state_dict`` (0.16.1 - 0.19.2): with torch's Adam it gives
  every parameter's state the *same* ``step`` tensor (``s["step"] = step`` in a loop), and
  torch's foreach Adam then adds 1 to that one tensor once per parameter at each update:
  after a resume the bias correction used a step count of (steps x parameters), a wrong
  first update (found by ``tests/dist/test_distributed_optimizer.py``: a resumed run left
  the uninterrupted curve from its first update on). The shim gives each parameter its own
  copy, as torch's Adam creates them.

**API differences** between the two tested releases, each chosen by the *feature* it
needs (a parameter of a signature), not by a version number:

* :func:`final_hidden_states`: GPTModel stopped before its output layer (0.19.2: the
  ``output_processor`` hook; 0.16.1: ``post_process`` switched off for the call).
* :func:`pretrain`: Megatron-LM's ``pretrain()`` called with a model provider
  (core_v0.19.0: a ``PretrainConfigContainer`` from the parsed flags; core_v0.16.1: the
  flags parsed by ``pretrain`` itself).

Everything else the project calls (``parallel_state``, the schedules, DDP, the
optimizer, ``dist_checkpointing``, the layer specs, the TransformerConfig fields it sets)
is the same in both releases.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch

_INSTALLED = False


def _only_provided_keys(original):
    def set_states(self, model_param, tensors):
        if "step" in tensors:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state.get(main_param, {})
        if "step" not in state or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        step = state.pop("step")
        try:
            return original(self, model_param, tensors)
        finally:
            state["step"] = step

    return set_states


def _unshared_steps(original):
    def load_state_dict(self, state_dict):
        result = original(self, state_dict)
        seen: set[int] = set()
        for state in self.optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                if id(step) in seen:
                    state["step"] = step.clone()
                seen.add(id(state["step"]))
        return result

    return load_state_dict


def install() -> None:
    """Apply the shims (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    cls = distrib.DistributedOptimizer
    cls._set_main_param_and_optimizer_states = _only_provided_keys(
        cls._set_main_param_and_optimizer_states
    )
    cls.load_state_dict = _unshared_steps(cls.load_state_dict)
    _INSTALLED = True


@functools.cache
def gpt_forward_has_output_processor() -> bool:
    """True where ``GPTModel.forward`` takes ``output_processor`` (0.19.2; not 0.16.1)."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    return "output_processor" in inspect.signature(GPTModel.forward).parameters


def _hidden_states_only(*, hidden_states: torch.Tensor, **_: Any) -> torch.Tensor:
    return hidden_states


def final_hidden_states(model, forward: Callable[..., torch.Tensor], *args, **kwargs):
    """Run GPTModel's ``forward`` (``model``'s, unbound from any override) to its final
    hidden states ``[s, b, h]``: the decoder's output, final norm applied, before the
    output layer.

    * megatron-core 0.19.2 (and any release whose ``GPTModel.forward`` takes
      ``output_processor``): the forward's own output hook returns the hidden states it
      is handed where the output layer would run.
    * megatron-core 0.16.1 (no hook): ``model.post_process`` is switched off for the
      call, which makes ``forward`` return the decoder's output (the decoder keeps the
      final norm it was built with; the flag is read again only to skip the output
      layer), and restored afterwards.

    Args:
        model: the GPTModel, built with ``post_process=True``.
        forward: GPTModel's forward bound to ``model`` (e.g. ``super().forward``).
        *args, **kwargs: ``forward``'s (``input_ids, position_ids, attention_mask, ...``;
            no ``labels``).
    """
    if gpt_forward_has_output_processor():
        return forward(*args, labels=None, output_processor=_hidden_states_only, **kwargs)
    model.post_process = False
    try:
        return forward(*args, labels=None, **kwargs)
    finally:
        model.post_process = True


def pretrain_takes_config_container(pretrain: Callable) -> bool:
    """True where Megatron-LM's ``pretrain`` takes a ``cfg_container`` first
    (core_v0.19.0), False where it parses the flags itself (core_v0.16.1)."""
    return next(iter(inspect.signature(pretrain).parameters)) == "cfg_container"


def pretrain(
    train_valid_test_datasets_provider: Callable,
    model_provider: Callable,
    model_type,
    forward_step: Callable,
    *,
    extra_args_provider: Callable | None = None,
    args_defaults: dict | None = None,
    **kwargs,
):
    """Call Megatron-LM's ``megatron.training.pretrain`` with a model provider.

    * Megatron-LM core_v0.16.1: ``pretrain(datasets, model_provider, model_type,
      forward_step, extra_args_provider=..., args_defaults=...)`` parses the flags itself.
    * Megatron-LM core_v0.19.0: ``pretrain(cfg_container, datasets, model_type,
      forward_step, model_provider=...)``: the flags are parsed first
      (``parse_and_validate_args``, which also sets Megatron-LM's global args), turned
      into a ``PretrainConfigContainer`` without a model config (the provider builds the
      model, as Megatron-LM's own ``pretrain_gpt.py`` did before 0.19), then passed in.

    Args:
        train_valid_test_datasets_provider, model_provider, model_type, forward_step: as
            Megatron-LM's ``pretrain`` takes them.
        extra_args_provider: adds the script's own flags to Megatron-LM's parser.
        args_defaults: defaults for Megatron-LM's flags.
        **kwargs: passed on to ``pretrain`` (e.g. ``store``).
    """
    from megatron.training import pretrain as megatron_pretrain

    args_defaults = dict(args_defaults or {})
    if not pretrain_takes_config_container(megatron_pretrain):
        return megatron_pretrain(
            train_valid_test_datasets_provider,
            model_provider,
            model_type,
            forward_step,
            extra_args_provider=extra_args_provider,
            args_defaults=args_defaults,
            **kwargs,
        )
    container = config_container_from_flags(
        extra_args_provider=extra_args_provider, args_defaults=args_defaults
    )
    return megatron_pretrain(
        container,
        train_valid_test_datasets_provider,
        model_type,
        forward_step,
        model_provider=model_provider,
        **kwargs,
    )


def config_container_from_flags(*, extra_args_provider=None, args_defaults=None):
    """Megatron-LM core_v0.19.0: parse ``sys.argv`` as its ``pretrain_gpt.py`` does and
    return the ``PretrainConfigContainer`` for a model built by a provider (no model
    config). Sets Megatron-LM's global args, as its ``pretrain`` did in 0.16."""
    import warnings

    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(
        extra_args_provider=extra_args_provider, args_defaults=dict(args_defaults or {})
    )
    with warnings.catch_warnings():
        # "It is recommended to use a ModelConfig ... instead of a model provider": the
        # provider is how this project builds its model on every release it supports.
        warnings.filterwarnings("ignore", message=r"\s*It is recommended to use a ModelConfig")
        return pretrain_cfg_container_from_args(args, None)
