"""Run Megatron-LM's ``megatron.training.pretrain()`` on a machine without CUDA (gloo).

For tests and CPU users only: ``pretrain_pwdpo.py`` installs it when CUDA is absent, and
on a GPU it is never imported. It extends :mod:`megatron_pwdpo.platform.cpu_bridge` (which covers
``megatron.core``) to the CUDA assumptions of ``megatron.training`` (Megatron-LM
``core_v0.16.1`` and ``core_v0.19.0``), in the order ``pretrain()`` meets them:

* ``initialize_megatron`` asserts CUDA unless ``allow_no_cuda``; it is called with it;
* torch.distributed: a gloo process group is started here (torchrun's environment), so
  Megatron-LM skips its own NCCL one;
* ``_initialize_distributed`` and ``_set_random_seed`` create the model-parallel groups
  and seed the tensor-parallel RNG tracker only when ``torch.cuda.device_count() > 0``:
  inside ``megatron.training.initialize`` the device count reads 1 (the tracker itself
  runs on the CPU through ``megatron_pwdpo.platform.cpu_bridge``);
* the fused kernels need nvcc (core_v0.16.1 loads them; core_v0.19.0 no longer has them)
  and the JIT warm-up draws CUDA random numbers: both skipped (the local layer spec uses
  neither);
* ``get_model`` calls ``model_module.cuda()``, ``evaluate`` a tensor's ``.cuda()``: the
  identity while they run;
* tensors made with a literal ``device='cuda'`` (loss accumulators, flags, timers),
  ``torch.cuda.Stream`` and the memory reports: ``megatron.training``'s modules see the
  same CPU proxy of ``torch`` as the bridged ``megatron.core`` modules;
* ``get_device_arch_version()`` (asked at TP > 1) reads the GPU's major version: 0 here;
  below 10 Megatron-LM wants ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (an ordering of CUDA
  streams, moot on the CPU), which is set unless already set.

Megatron-LM also imports ``triton`` unconditionally (``megatron.core``'s batch-invariant
kernels, from ``initialize.py``); CPU torch does not ship it. Install the ``triton`` wheel,
or (tests only) put a stand-in on the path: this bridge does not provide one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os

import torch

from megatron_pwdpo.platform import cpu_bridge

_TRAINING_MODULES = (
    "megatron.training.training",
    "megatron.training.utils",
    "megatron.training.checkpointing",
    "megatron.training.initialize",
    "megatron.training.global_vars",
    "megatron.core.rerun_state_machine",
    "megatron.core.timers",
)
# Modules that only some releases have: core_v0.19.0 split ``megatron.training.utils`` into
# a package whose functions live (and read ``torch``) in ``common_utils``.
_OPTIONAL_TRAINING_MODULES = ("megatron.training.utils.common_utils",)


class _CudaCountsOne(cpu_bridge._CudaOnCpu):
    """``torch.cuda`` inside ``megatron.training.initialize``: one (CPU) device, so the
    model-parallel groups and the tracker seeds are set up as on a GPU."""

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(*_args, **_kwargs) -> None:
        return None


class _TorchForInitialize(cpu_bridge._TorchOnCpu):
    cuda = _CudaCountsOne()


class _NoStream:
    """A CUDA stream on the CPU: there is one stream of work, nothing to wait for."""

    def wait_stream(self, *_args, **_kwargs) -> None:
        return None

    def synchronize(self) -> None:
        return None


class _CudaForTraining(cpu_bridge._CudaOnCpu):
    """``torch.cuda`` inside ``megatron.training``: one stream, memory reports read zero."""

    @staticmethod
    def Stream(*_args, **_kwargs) -> _NoStream:  # noqa: N802  (torch's spelling)
        return _NoStream()

    current_stream = default_stream = Stream

    @staticmethod
    def memory_stats(*_args, **_kwargs) -> dict:
        return {}

    @staticmethod
    def _zero(*_args, **_kwargs) -> int:
        return 0

    memory_allocated = max_memory_allocated = _zero
    memory_reserved = max_memory_reserved = device_memory_used = _zero

    @staticmethod
    def use_mem_pool(*_args, **_kwargs):
        return contextlib.nullcontext()


class _TorchForTraining(cpu_bridge._TorchOnCpu):
    cuda = _CudaForTraining()


@contextlib.contextmanager
def _cuda_is_identity():
    """Within the block, ``Module.cuda()`` and ``Tensor.cuda()`` stay on the CPU."""
    module, tensor = torch.nn.Module.cuda, torch.Tensor.cuda
    torch.nn.Module.cuda = torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.nn.Module.cuda, torch.Tensor.cuda = module, tensor


def _on_cpu(function):
    """``function`` with ``.cuda()`` the identity while it runs."""

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with _cuda_is_identity():
            return function(*args, **kwargs)

    return wrapped


def _start_gloo() -> None:
    """A gloo process group from torchrun's environment (Megatron-LM then skips its own)."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo",
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
        )


_INSTALLED = False


def install() -> bool:
    """Bridge ``megatron.training`` to the CPU; a no-op (False) when CUDA is available."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    cpu_bridge.install()
    _start_gloo()
    for name in _TRAINING_MODULES:
        importlib.import_module(name).torch = _TorchForTraining()
    for name in _OPTIONAL_TRAINING_MODULES:
        with contextlib.suppress(ModuleNotFoundError):
            importlib.import_module(name).torch = _TorchForTraining()
    initialize = importlib.import_module("megatron.training.initialize")
    initialize.torch = _TorchForInitialize()
    initialize._warmup_jit_function = lambda *args, **kwargs: None  # no CUDA JIT warm-up
    fused = getattr(initialize, "fused_kernels", None)  # core_v0.16.1; gone in core_v0.19.0
    if fused is not None:
        fused.load = lambda args: None
    training = importlib.import_module("megatron.training.training")
    training.initialize_megatron = functools.partial(
        training.initialize_megatron, allow_no_cuda=True
    )
    training.get_model = _on_cpu(training.get_model)
    training.evaluate = _on_cpu(training.evaluate)
    importlib.import_module("megatron.training.arguments").get_device_arch_version = lambda: 0
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _INSTALLED = True
    return True
