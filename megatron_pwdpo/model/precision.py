"""Numeric precision: fp32, bf16, and FP8 through Transformer Engine.

How FP8 training works here (and in Megatron-Core generally). The parameters, the
optimizer's master weights and the gradients all-reduce stay in bf16/fp32; only the
GEMMs of the transformer layers run in FP8. Inside an ``fp8_autocast`` region each
Transformer Engine linear layer casts its input and weight to an 8-bit float with a
*scale* per tensor (or per block), multiplies on the FP8 tensor cores, and returns
bf16. The recipes differ in where the scale comes from:

* ``delayed`` (``DelayedScaling``): from the running maximum of |x| (the *amax*) over
  the last ``fp8_amax_history_len`` steps; cheap, but a sudden outlier overflows until
  the history catches up. The historical default on Hopper.
* ``tensorwise`` (``Float8CurrentScaling``, "current scaling"): from the amax of the
  tensor being cast, computed just before the cast; one more reduction per GEMM input,
  no stale scales.
* ``mxfp8`` (``MXFP8BlockScaling``): one power-of-two scale per block of 32 values
  (the OCP microscaling format); needs Blackwell (compute capability >= 10).

Formats: ``hybrid`` is E4M3 (more mantissa) forward and E5M2 (more range) for the
gradients, the usual choice; ``e4m3`` uses E4M3 both ways.

Megatron-Core enters the autocast itself (``TransformerBlock`` asks
``megatron.core.fp8_utils.get_fp8_context(config)``), so a model built from a
:class:`~megatron.core.transformer.TransformerConfig` with ``fp8`` and ``fp8_recipe``
set needs nothing more; :func:`transformer_config_kwargs` is the mapping. The reference
forward runs in the policy's precision by default (``fp8_reference=auto`` with the
current-scaling recipes), so that the implicit reward ``beta (log pi - log pi_ref)`` is
exactly 0 at step 0 and carries no quantisation bias; with ``delayed`` scaling it runs in
bf16 (:func:`reference_runs_fp8`; :func:`reference_precision` switches the chunks'
``config.fp8`` off around it). ``delayed`` with packed rows reduces the amax over the
tensor-parallel group only (``tp_only_amax_red``, set by
:func:`megatron_pwdpo.platform.decisions.plan_build`): packed data-parallel ranks run different
numbers of micro-batches, and an amax all-reduce over data parallel would then wait for
ranks that never join it.

Transformer Engine is imported lazily and only on CUDA machines; configs with
``precision.fp8`` are refused at validation where it is missing
(:func:`megatron_pwdpo.platform.decisions.refusal`). bf16 runs everywhere: on CPU Megatron-Core's
mixed-precision optimizer and ``Float16Module`` run through the CPU bridge
(:mod:`megatron_pwdpo.platform.cpu_bridge`), the same code as on GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

Fp8Recipe = Literal["delayed", "tensorwise", "mxfp8"]


@dataclass(frozen=True)
class PrecisionConfig:
    """Numeric precision of the run.

    Attributes:
        dtype: parameter and activation dtype: ``fp32`` (the default) or ``bf16`` (the
            model in bf16 in Megatron's ``Float16Module``; fp32 master weights in
            Megatron's mixed-precision optimizer and fp32 gradient reduction; log-probs and
            losses in fp32). Both run on CPU and GPU.
        fp8: run the transformer layers' GEMMs in FP8 with this Transformer Engine
            recipe (``delayed``, ``tensorwise`` = current scaling, ``mxfp8`` =
            Blackwell block scaling); ``None`` = no FP8. Needs ``dtype: bf16``, CUDA and
            Transformer Engine.
        fp8_format: ``hybrid`` (E4M3 forward, E5M2 gradients) or ``e4m3``.
        fp8_amax_history_len: steps of amax history of the ``delayed`` recipe.
        fp8_reference: run the reference model's forward in FP8 too: ``auto`` (the
            default) does for the current-scaling recipes (``tensorwise``, ``mxfp8``),
            whose scales come from the tensor being cast, so that at step 0 the policy
            and the reference compute the same numbers (rewards 0, loss ln 2) and a reward
            carries no quantisation bias; for ``delayed`` the reference runs in bf16
            (``true`` is refused there: delayed scales come from an amax history that a
            forward under ``no_grad`` never updates), and the step-0 rewards then carry
            the policy's FP8 rounding. ``true``/``false`` force it.
    """

    dtype: Literal["fp32", "bf16"] = "fp32"
    fp8: Fp8Recipe | None = None
    fp8_format: Literal["hybrid", "e4m3"] = "hybrid"
    fp8_amax_history_len: int = 1024
    fp8_reference: Literal["auto", True, False] = "auto"


def params_dtype(precision: PrecisionConfig | None) -> torch.dtype:
    """The dtype parameters are created in."""
    if precision is None or precision.dtype == "fp32":
        return torch.float32
    return torch.bfloat16


def transformer_config_kwargs(precision: PrecisionConfig | None) -> dict[str, Any]:
    """``TransformerConfig`` fields (megatron-core 0.16-0.19 names) for ``precision``.

    Returns:
        ``params_dtype``, ``pipeline_dtype`` and ``bf16``, plus with FP8: ``fp8`` (the
        format), ``fp8_recipe``, and for ``delayed`` the amax history settings.
    """
    dtype = params_dtype(precision)
    kwargs: dict[str, Any] = {
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
    }
    if precision is not None and precision.fp8 is not None:
        kwargs.update(fp8=precision.fp8_format, fp8_recipe=precision.fp8)
        if precision.fp8 == "delayed":
            kwargs.update(
                fp8_amax_history_len=precision.fp8_amax_history_len,
                fp8_amax_compute_algo="max",
            )
    return kwargs


def _import_te():
    try:
        import transformer_engine.pytorch as te
    except (ImportError, RuntimeError) as err:  # the bare meta package raises RuntimeError
        raise RuntimeError(
            "precision.fp8 needs NVIDIA Transformer Engine with CUDA: pip install "
            f"'megatron-pwdpo[gpu]' on a GPU machine ({type(err).__name__}: {err})"
        ) from None
    return te


def have_transformer_engine() -> bool:
    """Whether ``transformer_engine.pytorch`` imports (False on CPU machines)."""
    try:
        _import_te()
    except RuntimeError:
        return False
    return True


def reference_runs_fp8(precision: PrecisionConfig | None) -> bool:
    """Whether the reference forward runs in FP8 (``precision.fp8_reference``)."""
    if precision is None or precision.fp8 is None:
        return False
    if precision.fp8_reference == "auto":
        return precision.fp8 in ("tensorwise", "mxfp8")
    return bool(precision.fp8_reference)


def reference_numerics(precision: PrecisionConfig | None) -> str:
    """How the reference's log-probs are computed (``fp32``, ``bf16``, or ``bf16+fp8:
    RECIPE/FORMAT``): part of a reference cache's fingerprint, so that a cache made in one
    precision is refused by a run in another."""
    if precision is None:
        return "fp32"
    if reference_runs_fp8(precision):
        return f"{precision.dtype}+fp8:{precision.fp8}/{precision.fp8_format}"
    return precision.dtype


def check_supported(precision: PrecisionConfig) -> str | None:
    """What is wrong with ``precision`` itself, in one line, or None.

    FP8 needs ``dtype: bf16``; the amax history is positive. What the machine must have
    (CUDA, Transformer Engine and its version, the compute capability) is
    :func:`megatron_pwdpo.platform.decisions.refusal`'s.
    """
    if precision.fp8 is not None and precision.dtype != "bf16":
        return f"precision.fp8={precision.fp8} needs precision.dtype=bf16"
    if precision.fp8_amax_history_len <= 0:
        return "precision.fp8_amax_history_len: must be positive"
    if precision.fp8 == "delayed" and precision.fp8_reference is True:
        return (
            "precision.fp8_reference=true with precision.fp8=delayed: the reference's delayed "
            "scales come from an amax history that its no-grad forward never updates; use "
            "precision.fp8=tensorwise, or fp8_reference=auto (bf16 reference)"
        )
    return None


def te_recipe(transformer_config):
    """The Transformer Engine recipe object Megatron-Core uses for this config (None
    without FP8). Imports Transformer Engine; raises a clear error without it."""
    if not transformer_config.fp8:
        return None
    _import_te()
    from megatron.core.fp8_utils import get_fp8_recipe

    return get_fp8_recipe(transformer_config)


def _model_config(chunk: torch.nn.Module):
    while not hasattr(chunk, "config") and hasattr(chunk, "module"):
        chunk = chunk.module
    return getattr(chunk, "config", None)


@contextlib.contextmanager
def reference_precision(
    precision: PrecisionConfig | None, chunks: Iterable[torch.nn.Module]
) -> Iterator[None]:
    """Run the reference forward in bf16 unless it runs in FP8
    (:func:`reference_runs_fp8`).

    Megatron-Core decides per forward whether to enter FP8 autocast from
    ``config.fp8``; within this block it is ``None`` on every given chunk (the
    reference's, and the policy's, which the ``offload`` reference runs), and restored
    after. A no-op without FP8 or when the reference runs in FP8.
    """
    if precision is None or precision.fp8 is None or reference_runs_fp8(precision):
        yield
        return
    configs = {id(c): c for c in (_model_config(ch) for ch in chunks) if c is not None}
    saved = {key: config.fp8 for key, config in configs.items()}
    try:
        for config in configs.values():
            config.fp8 = None
        yield
    finally:
        for key, config in configs.items():
            config.fp8 = saved[key]
