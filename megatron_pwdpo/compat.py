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
* ``DistributedOptimizer.load_state_dict`` (0.16.1 - 0.19.2): with torch's Adam it gives
  every parameter's state the *same* ``step`` tensor (``s["step"] = step`` in a loop), and
  torch's foreach Adam then adds 1 to that one tensor once per parameter at each update:
  after a resume the bias correction used a step count of (steps x parameters), a wrong
  first update (found by ``tests/dist/test_distributed_optimizer.py``: a resumed run left
  the uninterrupted curve from its first update on). The shim gives each parameter its own
  copy, as torch's Adam creates them.
"""

from __future__ import annotations

import importlib

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
