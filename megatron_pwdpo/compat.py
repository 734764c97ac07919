"""Fixes and shims for the megatron-core releases this project supports, in one place.

Each entry names the releases it covers and what it replaces; :func:`install` applies
them once per process (CPU and GPU alike: these are not CUDA bridges, see
:mod:`megatron_pwdpo.cpu_bridge` for those).

* ``DistributedOptimizer._set_main_param_and_optimizer_states`` (0.16.1 - 0.19.2): loading
  a ``fully_reshardable`` optimizer checkpoint with torch's Adam (the optimizer megatron
  uses without Transformer Engine or apex) copies every key of a parameter's optimizer
  state from the loaded tensors, ``step`` included, but the loader leaves ``step`` out of
  those tensors (torch's ``step`` is restored from the param groups by
  ``load_state_dict``): ``KeyError: 'step'``. The shim copies only the keys the loader
  provides, which is what the fused Adams (whose state has no ``step``) get.
"""

from __future__ import annotations

import importlib

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
    _INSTALLED = True
