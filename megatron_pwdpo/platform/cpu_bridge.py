"""Run Megatron-Core on a machine without CUDA (gloo backend, local layer spec).

Megatron-Core assumes CUDA in a handful of places that no config flag turns off:

* ``torch.cuda.current_device()`` as the ``device=`` of buffers (the attention's
  global memory buffer, RoPE frequencies, tensor-parallel weight init, pipeline p2p
  shape exchange);
* literal ``device="cuda"`` tensors in the schedules (token counters), the optimizer
  (found-inf and scale tensors), the grad-norm/clip helpers and the DDP grad buffers;
* ``torch.cuda.synchronize`` / ``current_stream`` / ``Stream`` calls;
* the tensor-parallel RNG tracker, which forks the CUDA generator
  (``model_parallel_cuda_manual_seed`` fails without CUDA);
* ``weight.data.cuda()`` on the last stage's copy of tied embeddings under pipeline
  parallelism (``LanguageModule.setup_embeddings_and_output_layer``);
* the mixed-precision (bf16) and distributed optimizers sort parameters by
  ``param.type()`` against CUDA type names (``'torch.cuda.BFloat16Tensor'``...) while
  they build their fp32 main parameters, and refuse any other name
  (``Float16OptimizerWithFloat16Params.__init__``,
  ``DistributedOptimizer._build_model_and_main_param_groups`` and ``__init__``).

The bridge is deliberately narrow. It never patches ``torch`` itself (so a stray
``.cuda()`` in *this* project still fails loudly); instead it rebinds the name
``torch`` inside a listed set of ``megatron.core`` modules to :class:`_TorchOnCpu`,
a proxy that forwards everything to ``torch`` except ``torch.cuda`` (answered by
:class:`_CudaOnCpu`) and the tensor factories, whose ``device="cuda"`` becomes the
CPU. The RNG tracker gets CPU equivalents of ``_get/_set_cuda_rng_state`` with the
same seed offsets as Megatron's (``seed + 2718 + tp_rank`` for the model-parallel
stream), so tensor-parallel runs draw the same numbers as on GPU would per rank.

:func:`install` is idempotent and does nothing when CUDA is available.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

import torch

# megatron.core modules whose module-level ``torch`` is rebound to the proxy.
_PATCHED_MODULES = (
    "megatron.core.utils",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.transformer.module",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
)

_FACTORIES = frozenset(
    {"zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint"}
)

_CPU = torch.device("cpu")


def _on_cpu(device: Any) -> Any:
    """Map a CUDA device spec (``"cuda"``, ``"cuda:0"``, an int, a cuda device) to the CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return _CPU
    return _CPU if torch.device(device).type == "cuda" else device


class _CudaOnCpu:
    """Stands in for ``torch.cuda`` inside the patched megatron modules."""

    FloatTensor = torch.FloatTensor
    HalfTensor = torch.HalfTensor
    BFloat16Tensor = torch.BFloat16Tensor

    @staticmethod
    def is_available() -> bool:
        return False

    @staticmethod
    def current_device() -> torch.device:
        return _CPU

    @staticmethod
    def device_count() -> int:
        return 0

    @staticmethod
    def synchronize(*_args: Any, **_kwargs: Any) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def current_stream(*_args: Any, **_kwargs: Any) -> None:
        return None

    default_stream = current_stream
    Stream = current_stream

    @staticmethod
    def stream(*_args: Any, **_kwargs: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    # RNG: the CPU default generator plays the role of the CUDA one.
    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
        torch.set_rng_state(state)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchOnCpu:
    """Stands in for ``torch`` inside the patched megatron modules."""

    cuda = _CudaOnCpu()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name not in _FACTORIES:
            return attr

        def factory(*args: Any, **kwargs: Any) -> Any:
            if "device" in kwargs:
                kwargs["device"] = _on_cpu(kwargs["device"])
            kwargs.pop("pin_memory", None)
            return attr(*args, **kwargs)

        return factory


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    del device, clone, graph_safe
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    del device, graph_safe
    torch.set_rng_state(new_state)


def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """``clip_grads.clip_grad_by_total_norm_fp32`` without its ``torch.cuda.FloatTensor`` assert."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    if any(g.dtype != torch.float32 for g in grads):
        raise TypeError("gradient clipping expects fp32 main gradients")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    """Within the block, ``Tensor.cuda()`` returns the tensor itself (on the CPU)."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _cpu_setup_embeddings(original):
    """Wrap ``setup_embeddings_and_output_layer``: with tied embeddings under PP it does
    ``weight.data = weight.data.cuda()`` before all-reducing the last stage's copy; that
    one call, and only while this method runs, keeps the weight on the CPU."""

    def setup(self, *args: Any, **kwargs: Any) -> Any:
        with _tensor_cuda_is_identity():
            return original(self, *args, **kwargs)

    return setup


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _tensor_type_names_cuda():
    """Within the block, ``Tensor.type()`` (no argument: the type's name) gives a CPU
    float tensor's CUDA name; ``Tensor.type(dtype)`` (a conversion) is unchanged."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return _CUDA_TYPE_NAMES.get(name, name)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(original):
    """Wrap an optimizer-building method so that its ``param.type()`` checks see CUDA
    names (only while it runs); works for plain functions and the underlying function of
    a classmethod alike."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _tensor_type_names_cuda():
            return original(*args, **kwargs)

    return wrapped


def _patch_optimizer_type_checks() -> None:
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    f16 = optimizer.Float16OptimizerWithFloat16Params
    f16.__init__ = _with_cuda_type_names(f16.__init__)
    dist_opt = distrib.DistributedOptimizer
    dist_opt.__init__ = _with_cuda_type_names(dist_opt.__init__)
    build = dist_opt.__dict__["_build_model_and_main_param_groups"].__func__
    dist_opt._build_model_and_main_param_groups = classmethod(_with_cuda_type_names(build))


_INSTALLED = False


def install() -> bool:
    """Bridge Megatron-Core's CUDA assumptions to the CPU. Returns True if installed.

    Call once per process before building a model; a no-op when CUDA is available.
    """
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    proxy = _TorchOnCpu()
    for name in _PATCHED_MODULES:
        module = importlib.import_module(name)
        module.torch = proxy
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = _cpu_get_rng_state
    random._set_cuda_rng_state = _cpu_set_rng_state
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    optimizer.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
    language_module = importlib.import_module(
        "megatron.core.models.common.language_module.language_module"
    )
    cls = language_module.LanguageModule
    cls.setup_embeddings_and_output_layer = _cpu_setup_embeddings(
        cls.setup_embeddings_and_output_layer
    )
    _patch_optimizer_type_checks()
    _INSTALLED = True
    return True


def manual_seed(seed: int) -> None:
    """Seed the default and the tensor-parallel RNG streams (CPU or GPU).

    On GPU this is Megatron's ``model_parallel_cuda_manual_seed``; on CPU the same
    function runs on the bridged tracker (same seed offsets per tensor-parallel rank).
    """
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
