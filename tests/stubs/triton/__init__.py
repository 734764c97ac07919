"""Test-only stand-in for ``triton`` (never shipped): lets ``megatron.training`` import on
a CPU torch, which has no triton. ``megatron.core``'s batch-invariant kernels import it
unconditionally and only define (never launch) kernels with it; ``initialize.py`` imports
them. Any other importer (torch probes ``import triton``, megatron.core tries it) gets
``ImportError``, as with no triton installed, so nothing takes this for a real triton.

Put ``tests/stubs`` on ``PYTHONPATH`` only for a run of Megatron-LM's ``pretrain()``.
"""

import sys


def _importer() -> str:
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
        ("importlib", "_frozen_importlib", "triton")
    ):
        frame = frame.f_back
    return "" if frame is None else frame.f_globals.get("__name__", "")


_SERVES = "megatron.core.transformer.custom_layers.batch_invariant_kernels"
if _importer() != _SERVES:
    raise ImportError(f"triton is not installed (tests/stubs/triton serves {_SERVES} only)")


def _torch_sees_no_triton() -> None:
    """Settle torch's cached ``has_triton_package()`` to False before this module stays in
    ``sys.modules`` (its probe, run while this module is out of it, gets ImportError)."""
    import torch.utils._triton

    me = sys.modules.pop(__name__)
    try:
        torch.utils._triton.has_triton_package()
    finally:
        sys.modules[__name__] = me


_torch_sees_no_triton()

__version__ = "0.0.0"


def jit(fn=None, **_kwargs):
    """``@triton.jit`` and ``@triton.jit(...)``: the function itself (never launched)."""
    return fn if fn is not None else (lambda f: f)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


from triton import language as language  # noqa: E402
