"""What differs between a CPU run, a GPU run without Transformer Engine and a GPU run with
it, decided in one place from explicit facts.

Megatron-Core builds a different model on each of the three platforms this project runs
on, and the differences used to be decided by ``torch.cuda.is_available()`` calls deep
inside the code, so no CPU test could build what a GPU builds. Here a :class:`Platform`
holds the facts (CUDA, Transformer Engine and its version, apex's fused kernels, the
GPU's compute capability) and :func:`plan_build` turns a config and a platform into
every decision (:class:`BuildPlan`): the layer spec, the attention kernel, the fused
kernels, the initialisation, the process-group backend, the distributed optimizer, the
packing layouts the attention honours and the width multiple of a micro-batch.
:func:`refusal` says, in one line, why a config cannot run on a platform. The three
platforms are :data:`CPU`, :data:`GPU_WITHOUT_TE` and :data:`GPU_WITH_TE` (an NGC
container on an H100); :func:`detect` returns this machine's. Every function here is
pure, so CPU unit tests build the GPU plans (``tests/unit/platform/test_platform.py``).

The rules, each with its reason:

* **layer spec**: Transformer Engine's where TE imports on CUDA (FP8 and fused
  attention need it), else megatron-core's local spec.
* **fused kernels follow the kernels that exist, not the device**:
  ``gradient_accumulation_fusion`` needs apex's ``fused_weight_gradient_mlp_cuda``
  (megatron's own linear layers, the output layer included, raise without it);
  ``apply_rope_fusion`` needs TE's fused RoPE; ``masked_softmax_fusion`` and
  ``persist_layer_norm`` are off everywhere (the local spec's core attention is replaced
  by :mod:`megatron_pwdpo.model.attention`'s fused SDPA or is TE's, and RMSNorm is not apex's
  persistent LayerNorm); the bias fusions are off (the model has no biases to fuse).
* **initialisation**: ``use_cpu_initialization`` on every platform: each rank draws the
  full master weight of each layer from the CPU generator and keeps its slice, so fresh
  weights are the same on CPU and GPU and at every tensor-parallel size for one seed
  (Megatron's GPU initialisation draws from per-TP-rank CUDA streams instead).
* **token dispatcher**: ``alltoall`` everywhere: ``variable_seq_lengths`` (micro-batches
  of different widths) is refused with megatron-core's default ``allgather`` even for a
  dense model (0.16.1 - 0.19.2, ``TransformerConfig.__post_init__``).
* **pipeline p2p**: batched on NCCL, unbatched on gloo (gloo pairs a batch of sends and
  receives to one peer in posting order, which swaps same-shaped tensors under
  interleaving).
* **distributed optimizer**: ``parallel.distributed_optimizer`` (``auto``: on wherever
  data parallel > 1, as in the cluster examples; it runs on CPU over gloo too).
* **attention**: ``model.attention=auto`` is TE's fused attention with TE's layers, else
  :class:`megatron_pwdpo.model.attention.SDPAttention` (``scaled_dot_product_attention``:
  flash / cuDNN / memory-efficient kernels on GPU) in place of megatron-core's unfused
  ``DotProductAttention``; ``sdpa`` / ``local`` force one.
* **packing**: ``masked`` needs an attention that honours an arbitrary block-diagonal
  mask (``sdpa`` or ``local``; TE's fused attention ignores it); ``thd`` needs TE's
  attention (``PackedSeqParams``).
* **sequence parallel** needs TE's norm (the local spec's ``WrappedTorchNorm`` asserts)
  and a width divisible by the tensor-parallel size; FP8 with it needs each rank's
  tokens divisible by 8 (32 for MXFP8): :func:`token_multiple`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

LayerSpec = Literal["te", "local"]
Attention = Literal["te", "sdpa", "local"]

# TE's first release that megatron-core builds the ``tensorwise`` (current scaling)
# recipe with (megatron/core/fp8_utils.py, 0.16.1: ``is_te_min_version("2.2.0.dev0")``).
TE_MIN_VERSION_CURRENT_SCALING = (2, 2)


@dataclass(frozen=True)
class Platform:
    """Facts about the machine a rank runs on.

    Attributes:
        name: a short description (for logs and errors).
        cuda: a CUDA device is available.
        transformer_engine: ``transformer_engine.pytorch`` imports (needs CUDA).
        te_version: Transformer Engine's version as ``(major, minor)``, or None.
        apex_grad_accum: apex's ``fused_weight_gradient_mlp_cuda`` imports (what
            megatron-core's ``gradient_accumulation_fusion`` needs).
        compute_capability: the GPU's ``(major, minor)``, or None without CUDA.
    """

    name: str
    cuda: bool
    transformer_engine: bool = False
    te_version: tuple[int, int] | None = None
    apex_grad_accum: bool = False
    compute_capability: tuple[int, int] | None = None


CPU = Platform(name="CPU", cuda=False)
GPU_WITHOUT_TE = Platform(
    name="H100 without Transformer Engine", cuda=True, compute_capability=(9, 0)
)
GPU_WITH_TE = Platform(
    name="H100 with Transformer Engine 2.8 and apex (NGC container)",
    cuda=True,
    transformer_engine=True,
    te_version=(2, 8),
    apex_grad_accum=True,
    compute_capability=(9, 0),
)
PLATFORMS = {"cpu": CPU, "gpu": GPU_WITHOUT_TE, "gpu-te": GPU_WITH_TE}


def _te_version() -> tuple[int, int] | None:
    """Transformer Engine's ``(major, minor)`` if ``transformer_engine.pytorch`` imports."""
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError):  # the bare meta package raises RuntimeError
        return None
    parts = str(getattr(transformer_engine, "__version__", "0.0")).split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def _have_apex_grad_accum() -> bool:
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def detect() -> Platform:
    """This machine's platform (cached: the facts do not change within a process)."""
    if not torch.cuda.is_available():
        return CPU
    te = _te_version()
    return Platform(
        name=torch.cuda.get_device_name(),
        cuda=True,
        transformer_engine=te is not None,
        te_version=te,
        apex_grad_accum=_have_apex_grad_accum(),
        compute_capability=tuple(torch.cuda.get_device_capability()),
    )


@dataclass(frozen=True)
class BuildPlan:
    """Every platform-dependent decision of a run (see the module docstring for why).

    Attributes:
        layer_spec: ``te`` (Transformer Engine layers) or ``local`` (megatron-core's).
        attention: the core attention: ``te`` (TE's fused kernels), ``sdpa``
            (``torch.nn.functional.scaled_dot_product_attention`` in the local spec) or
            ``local`` (megatron-core's unfused ``DotProductAttention``).
        backend: the process-group backend, ``nccl`` or ``gloo``.
        transformer_config: the ``TransformerConfig`` fields that depend on the platform
            (fusions, initialisation, dispatcher, p2p batching).
        distributed_optimizer: shard the optimizer state over data parallel.
        packing: the ``data.packing`` layouts the attention honours (besides ``none``).
        token_multiple: a micro-batch's width is a multiple of this (see
            :func:`token_multiple`).
        fp8: the FP8 recipe of the policy's transformer layers, or None.
    """

    layer_spec: LayerSpec
    attention: Attention
    backend: Literal["nccl", "gloo"]
    transformer_config: dict[str, object] = field(default_factory=dict)
    distributed_optimizer: bool = False
    packing: frozenset[str] = frozenset()
    token_multiple: int = 16
    fp8: str | None = None

    def describe(self) -> str:
        """One line for the run's log: what the model is built from."""
        fused = sorted(k for k, v in self.transformer_config.items() if k.endswith("fusion") and v)
        return (
            f"layer spec {self.layer_spec}, attention {self.attention}, backend "
            f"{self.backend}, distributed optimizer {'on' if self.distributed_optimizer else 'off'}"
            f", fused kernels: {', '.join(fused) or 'none'}"
            + (f", fp8 {self.fp8}" if self.fp8 else "")
        )


def plan_backend(platform: Platform) -> Literal["nccl", "gloo"]:
    """The process-group backend: NCCL on CUDA, gloo (with the CPU bridge) elsewhere."""
    return "nccl" if platform.cuda else "gloo"


def use_distributed_optimizer(setting: bool | str, *, data_parallel: int) -> bool:
    """``parallel.distributed_optimizer``: ``auto`` is on wherever data parallel > 1."""
    if setting == "auto":
        return data_parallel > 1
    return bool(setting)


def token_multiple(*, tensor_parallel: int, sequence_parallel: bool, fp8: str | None) -> int:
    """The multiple every micro-batch width (positions per sequence) is padded to.

    16 for the GEMMs' alignment; with sequence parallelism the ``[s, b, h]`` activations
    are split along ``s`` over the tensor-parallel ranks, so ``s`` must divide by TP;
    Transformer Engine's FP8 GEMMs need each rank's token count (``s * b / TP``) divisible
    by 8 (MXFP8: 32, its block size). The rule takes ``b`` at 1, the worst case, so it
    does not depend on how full a micro-batch is.
    """
    multiple = 16
    if sequence_parallel:
        multiple = math.lcm(multiple, tensor_parallel)
        if fp8 is not None:
            multiple = math.lcm(multiple, (32 if fp8 == "mxfp8" else 8) * tensor_parallel)
    elif fp8 == "mxfp8":
        multiple = math.lcm(multiple, 32)
    return multiple


def config_token_multiple(config) -> int:
    """:func:`token_multiple` of a :class:`~megatron_pwdpo.config.RunConfig`: the one rule
    every batch path (training, the reference, evaluation, precompute) pads by."""
    p = config.parallel
    return token_multiple(
        tensor_parallel=p.tensor_parallel,
        sequence_parallel=p.sequence_parallel,
        fp8=config.precision.fp8,
    )


AttentionKind = Literal["te", "sdpa", "local"]


def resolve_attention(requested: str, *, use_te: bool) -> AttentionKind:
    """The core attention a run uses: ``te``, ``sdpa`` or ``local``.

    Args:
        requested: ``model.attention``: ``auto``, ``sdpa`` or ``local``.
        use_te: the model is built with Transformer Engine's layer spec.

    Returns:
        ``auto`` -> ``te`` with Transformer Engine (its fused attention, which also takes
        THD-packed rows), else ``sdpa``; ``sdpa`` and ``local`` as asked (with TE they
        replace TE's core attention inside TE's spec).
    """
    if requested == "auto":
        return "te" if use_te else "sdpa"
    if requested in ("sdpa", "local"):
        return requested
    raise ValueError(f"model.attention: {requested!r} is not one of auto, sdpa, local")


def plan_build(config, platform: Platform, *, data_parallel: int = 1) -> BuildPlan:
    """Every platform decision for ``config`` (a :class:`~megatron_pwdpo.config.RunConfig`
    or anything with its ``model``, ``parallel`` and ``precision`` sections) on
    ``platform`` with ``data_parallel`` replicas. Pure: no CUDA, no imports of TE."""
    p = config.parallel
    layer_spec: LayerSpec = "te" if platform.cuda and platform.transformer_engine else "local"
    attention = resolve_attention(
        getattr(config.model, "attention", "auto"), use_te=layer_spec == "te"
    )
    fields: dict[str, object] = {
        "use_cpu_initialization": True,
        "gradient_accumulation_fusion": platform.cuda and platform.apex_grad_accum,
        "apply_rope_fusion": layer_spec == "te",
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "moe_token_dispatcher_type": "alltoall",
        "batch_p2p_comm": platform.cuda,
    }
    precision = getattr(config, "precision", None)
    data = getattr(config, "data", None)
    if getattr(precision, "fp8", None) == "delayed":
        # packed data-parallel ranks run different numbers of micro-batches: an amax
        # all-reduce over TP x DP would wait for ranks that never join it
        fields["tp_only_amax_red"] = getattr(data, "packing", "none") != "none"
    return BuildPlan(
        layer_spec=layer_spec,
        attention=attention,
        backend=plan_backend(platform),
        transformer_config=fields,
        distributed_optimizer=use_distributed_optimizer(
            getattr(p, "distributed_optimizer", False), data_parallel=data_parallel
        ),
        packing=frozenset({"thd"} if attention == "te" else {"masked"}),
        token_multiple=token_multiple(
            tensor_parallel=p.tensor_parallel,
            sequence_parallel=p.sequence_parallel,
            fp8=getattr(precision, "fp8", None),
        ),
        fp8=getattr(precision, "fp8", None),
    )


def refusal(config, platform: Platform) -> str | None:
    """Why ``config`` cannot run on ``platform``, in one line, or None if it can.

    Checked before any process starts; the same facts as :func:`plan_build`.
    """
    plan = plan_build(config, platform)
    d, p, precision = config.data, config.parallel, config.precision
    where = f"on this platform ({platform.name})"
    if d.packing != "none" and d.packing not in plan.packing:
        other = next(iter(plan.packing))
        why = (
            "Transformer Engine's fused attention ignores a block-diagonal mask"
            if d.packing == "masked"
            else "THD rows (PackedSeqParams) need Transformer Engine's attention, and this "
            f"run's is {plan.attention}"
        )
        return f"data.packing={d.packing} is not possible {where}: {why}; use data.packing={other}"
    if p.sequence_parallel and plan.layer_spec != "te":
        return (
            f"parallel.sequence_parallel needs Transformer Engine's layers {where}: "
            "megatron-core's local layer spec (its torch RMSNorm) refuses it"
        )
    if precision.dtype == "fp32" and precision.fp8 is None:
        return None
    what = f"precision.fp8={precision.fp8}" if precision.fp8 else None
    if what is None:
        return None  # bf16 runs on every platform (on CPU through the bridge)
    if not (platform.cuda and platform.transformer_engine):
        return f"{what} needs CUDA and Transformer Engine {where}"
    need = (10, 0) if precision.fp8 == "mxfp8" else (8, 9)
    cc = platform.compute_capability or (0, 0)
    if cc < need:
        return (
            f"{what} needs a GPU of compute capability >= {need[0]}.{need[1]}, this one is "
            f"{cc[0]}.{cc[1]}" + (" (MXFP8 is Blackwell-only)" if precision.fp8 == "mxfp8" else "")
        )
    if precision.fp8 == "tensorwise" and (platform.te_version or (0, 0)) < (
        TE_MIN_VERSION_CURRENT_SCALING
    ):
        have = ".".join(map(str, platform.te_version or (0, 0)))
        return (
            f"{what} needs Transformer Engine >= 2.2 (megatron-core builds current scaling "
            f"only from there), this one is {have}"
        )
    return None
