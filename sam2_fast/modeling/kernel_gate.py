"""The model's door to the Triton kernels (``sam2_fast.kernels.dispatch``).

Triton is optional (it does not exist on every platform) and importing it is slow, so the
model imports the dispatchers only where a kernel could run: CUDA tensors, or CPU tensors
when a test forces the kernels (``SAM2_FAST_FORCE_KERNELS=1`` or ``force_kernels()``, which
already imported the dispatchers). Everywhere else — and when triton is missing — the
model keeps its own PyTorch paths, bit for bit.

Model code asks :func:`kernel_enabled` and, when it says yes, calls the dispatcher module
returned by :func:`dispatch`; it never launches a Triton kernel itself.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Optional

import torch

_DISPATCH = "sam2_fast.kernels.dispatch"
_ENV_FORCE = "SAM2_FAST_FORCE_KERNELS"
_MODULE: Optional[ModuleType] = None
_MISSING = [False]  # set once the import failed (no triton): stop trying


def _load() -> Optional[ModuleType]:
    global _MODULE
    if _MODULE is None and not _MISSING[0]:
        try:
            _MODULE = importlib.import_module(_DISPATCH)
        except ImportError:
            _MISSING[0] = True
    return _MODULE


@torch.compiler.assume_constant_result
def kernel_enabled(kernel: str, device_type: str) -> bool:
    """Whether the dispatcher of ``kernel`` ("window_attention", "memory_attention",
    "mask_upsample", "connected_components") sends ``device_type`` tensors to its Triton
    kernel (constant for a compiled graph, like the dispatcher's own policy)."""
    could_run = (device_type == "cuda" or _DISPATCH in sys.modules
                 or os.environ.get(_ENV_FORCE, "").strip() not in ("", "0"))
    if not could_run:
        return False
    mod = _load()
    return mod is not None and mod.kernel_enabled(kernel, device_type)


def dispatch() -> ModuleType:
    """The dispatcher module; call only after :func:`kernel_enabled` returned True."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"{_DISPATCH} is not importable (is triton installed?)")
    return mod
