"""Low-precision weight copies for eager autocast: no per-call weight casts.

Under ``torch.autocast`` every ``nn.Linear`` / ``nn.Conv2d`` / ``nn.ConvTranspose2d`` call
casts its fp32 weight and bias to bf16 (two cast kernels per call). Autocast's own cast
cache would keep them, but it is off under ``torch.inference_mode`` (measured: a Linear
called twice in one autocast region casts its weight twice in inference mode, once under
``no_grad``), and the predictors track inside inference mode, as the reference does. On
the op census of one tracked frame (tiny, 1 object, full bank,
``benchmarks/op_census.py``) these casts are ~300 of ~1000 kernel launches, and at SAM 2's
batch-1 sizes an eager GPU frame is launch bound.

:func:`install` replaces the ``forward`` of each such module (an instance attribute, undone
by the returned function) with one that passes a cached ``weight.to(dtype)`` (and bias)
to the same functional call while autocast is on at that dtype. The copy is exactly what
autocast's cast produces, so the outputs are bitwise unchanged. It is keyed on the
parameter's version counter and storage (``load_state_dict``, in-place updates and
``.to()`` rebuild it; an edit through ``.data`` bumps no version counter and is not seen,
as for the Hiera position table). Calls outside autocast, that need gradients, under
``torch.compile`` or a CUDA-graph capture, or on inference-mode parameters (no version
counter) take the module's own forward. Cost: one bf16 copy of the weights (tiny ~80 MB,
large ~450 MB).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_KINDS = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


def _cacheable(module: nn.Module) -> bool:
    if type(module) not in _KINDS:  # subclasses may change forward: leave them alone
        return False
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        # string padding dispatches to conv2d.padding, which CUDA autocast leaves in fp32
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return True


class _Lowp:
    """The cached (weight, bias) of one module at one dtype."""

    __slots__ = ("module", "key", "weight", "bias")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.key: Optional[tuple] = None
        self.weight: Optional[Tensor] = None
        self.bias: Optional[Tensor] = None

    def get(self, dtype: torch.dtype) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
        w, b = self.module.weight, self.module.bias
        if w.dtype != torch.float32 or w.is_inference() or (b is not None and b.is_inference()):
            return None
        if torch.is_grad_enabled() and (w.requires_grad or (b is not None and b.requires_grad)):
            return None
        if w.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        key = (dtype, w._version, w.data_ptr(), w.device,
               None if b is None else (b._version, b.data_ptr(), b.dtype))
        if key != self.key:
            with torch.inference_mode(False), torch.no_grad():  # normal tensors, usable anywhere
                self.weight = w.to(dtype)
                self.bias = None if b is None else b.to(dtype)
            self.key = key
        return self.weight, self.bias


def _forward_for(module: nn.Module, orig: Callable) -> Callable:
    slot = _Lowp(module)

    def params(x: Tensor):
        if torch.compiler.is_compiling() or not torch.is_autocast_enabled(x.device.type):
            return None
        return slot.get(torch.get_autocast_dtype(x.device.type))

    if isinstance(module, nn.Linear):
        def forward(x: Tensor) -> Tensor:
            wb = params(x)
            return orig(x) if wb is None else F.linear(x, wb[0], wb[1])
    elif isinstance(module, nn.Conv2d):
        def forward(x: Tensor) -> Tensor:
            wb = params(x)
            return orig(x) if wb is None else module._conv_forward(x, wb[0], wb[1])
    else:
        def forward(x: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
            wb = params(x)
            if wb is None or output_size is not None:
                return orig(x, output_size)
            m = module
            return F.conv_transpose2d(x, wb[0], wb[1], m.stride, m.padding, m.output_padding, m.groups, m.dilation)
    forward.__wrapped__ = orig  # type: ignore[attr-defined]
    return forward


def install(model: nn.Module) -> Tuple[int, Callable[[], None]]:
    """Give every plain Linear/Conv2d/ConvTranspose2d of ``model`` cached low-precision
    weights under autocast. Returns (modules patched, undo)."""
    undo: List[Callable[[], None]] = []
    for module in model.modules():
        if not _cacheable(module) or "forward" in module.__dict__:  # already patched (compiled, ...)
            continue
        module.forward = _forward_for(module, module.forward)
        undo.append(lambda m=module: m.__dict__.pop("forward", None))

    def remove() -> None:
        for fn in reversed(undo):
            fn()

    return len(undo), remove
