"""The kernel slots the selection layer (``select.py``) chooses for, with their candidates.

Each slot lists our Triton kernel and the PyTorch paths that compute the same function, the
fp32 reference the numerics check uses, the shape bucket a choice is shared by, and the
defaults when nothing can be measured. Measured defaults (H200, benchmarks/NOTES.md):
windowed Hiera blocks -> Triton (1.3-5.3x SDPA), global blocks -> PyTorch (SDPA 2.3-3.2x
faster than our kernel); upsampling -> PyTorch below ~1M output pixels per mask (480p:
torch 30 us vs 43), Triton above (1080p: 53 us vs 102).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import connected_components as _cc
from . import mask_upsample as _mu
from . import vspace_attention as _va
from . import window_attention as _wa
from ._common import interpreting
from .select import Candidate, Slot

# Output pixels per mask above which the upsampling kernel is the default (see docstring).
UPSAMPLE_TRITON_MIN_PIXELS = 1_000_000


def _pow2_bucket(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _triton_ok(t: torch.Tensor) -> Optional[str]:
    if t.device.type == "cuda" or interpreting():
        return None
    return f"Triton needs a CUDA tensor (or TRITON_INTERPRET=1), got {t.device.type}"


# ----------------------------------------------------------------------------- memory attention
# args: q (B, Nq, DK), k (B, Nk, DK), v (B, Nk, DV), ranges (B, 4) int32 | None


def _unchecked(launcher):
    """A Triton launcher without its own input check: ``select.choose`` runs the candidate's
    ``unsupported`` on every call before it returns the candidate (one pass, not two)."""
    def run(*args):
        return launcher(*args, check=False)
    return run


def _under(backend, fn):
    """``fn`` (a PyTorch path) with SDPA restricted to one backend."""
    def run(*args):
        with sdpa_kernel(backend):
            return fn(*args)
    return run


def _flash_unsupported(q, k, v, ranges) -> Optional[str]:
    if v.shape[-1] != q.shape[-1]:
        return "flash attention needs d_v == d_qk"
    if ranges is not None:
        return "flash attention takes no key mask"
    return None


def _vspace_triton_unsupported(q, k, v, ranges) -> Optional[str]:
    return _triton_ok(q) or _va.unsupported_reason(q, k, v, ranges)


MEMORY_ATTENTION = Slot(
    name="memory_attention",
    candidates=(
        Candidate("triton", _unchecked(_va.vspace_attention_triton), _vspace_triton_unsupported),
        Candidate("sdpa", _va.vspace_attention_reference),
        Candidate("sdpa-efficient", _under(SDPBackend.EFFICIENT_ATTENTION, _va.vspace_attention_reference)),
        Candidate("sdpa-cudnn", _under(SDPBackend.CUDNN_ATTENTION, _va.vspace_attention_reference)),
        Candidate("sdpa-flash", _under(SDPBackend.FLASH_ATTENTION, _va.vspace_attention_reference),
                  _flash_unsupported),
    ),
    reference=lambda q, k, v, r: _va.vspace_attention_reference(q.float(), k.float(), v.float(), r),
    bucket=lambda q, k, v, r: (str(q.dtype), _pow2_bucket(q.shape[0]), q.shape[1], -(-k.shape[1] // 4096) * 4096,
                               q.shape[2], v.shape[2], r is not None),
    default=lambda q, k, v, r: "triton" if _vspace_triton_unsupported(q, k, v, r) is None else "sdpa",
    cpu=lambda q, k, v, r: "triton" if interpreting() and _vspace_triton_unsupported(q, k, v, r) is None else "sdpa",
    baseline="sdpa",
)


# ----------------------------------------------------------------------------- window attention
# args: qkv (B, H, W, 3C), qkv_bias (3C,) | None, num_heads, window, q_pool


def _window_triton_unsupported(qkv, bias, heads, window, pool) -> Optional[str]:
    if qkv.dtype == torch.float32 and qkv.device.type == "cuda":
        return "fp32 on CUDA: the kernel's ieee dot has no tensor cores; SDPA is faster"
    return _triton_ok(qkv) or _wa.unsupported_reason(qkv, bias, heads, window, pool)


WINDOW_ATTENTION = Slot(
    name="window_attention",
    candidates=(
        Candidate("triton", _unchecked(_wa.window_attention_triton), _window_triton_unsupported),
        Candidate("torch", _wa.window_attention_reference),
        Candidate("torch-efficient", _under(SDPBackend.EFFICIENT_ATTENTION, _wa.window_attention_reference)),
        Candidate("torch-flash", _under(SDPBackend.FLASH_ATTENTION, _wa.window_attention_reference)),
        Candidate("torch-cudnn", _under(SDPBackend.CUDNN_ATTENTION, _wa.window_attention_reference)),
    ),
    reference=lambda qkv, b, h, w, p: _wa.window_attention_reference(
        qkv.float(), None if b is None else b.float(), h, w, p),
    bucket=lambda qkv, b, h, w, p: (str(qkv.dtype),) + tuple(qkv.shape) + (b is not None, h, w, p),
    default=lambda qkv, b, h, w, p: ("triton" if w > 0 and _window_triton_unsupported(qkv, b, h, w, p) is None
                                     else "torch"),
    cpu=lambda qkv, b, h, w, p: "triton" if interpreting() and _window_triton_unsupported(qkv, b, h, w, p) is None
    else "torch",
    baseline="torch",
)


# ----------------------------------------------------------------------------- mask upsampling
# args: logits (N, C, h, w), height, width, threshold, want_logits, want_mask
#       -> (mask | None, logits | None)


def _up_triton(logits, height, width, threshold, want_logits, want_mask):
    return _mu.upsample_masks_triton(logits, (height, width), threshold, want_logits, want_mask=want_mask,
                                     check=False)  # _up_unsupported ran in select.choose


def _up_torch(logits, height, width, threshold, want_logits, want_mask):
    return _mu.upsample_masks_reference(logits, (height, width), threshold, want_logits, want_mask)


def _up_unsupported(logits, height, width, threshold, want_logits, want_mask) -> Optional[str]:
    return _triton_ok(logits) or _mu.unsupported_reason(logits, (height, width))


def _up_output(out) -> torch.Tensor:
    """The tensor the numerics check compares: the mask when computed, else the logits."""
    return (out[0] if out[0] is not None else out[1]).float()


MASK_UPSAMPLE = Slot(
    name="mask_upsample",
    candidates=(Candidate("triton", _up_triton, _up_unsupported), Candidate("torch", _up_torch)),
    # compare the interpolated logits when asked for, else the mask (as float)
    reference=lambda x, hh, ww, t, wl, wm: _up_output(_up_torch(x.float(), hh, ww, t, wl, wm)),
    bucket=lambda x, hh, ww, t, wl, wm: (str(x.dtype), _pow2_bucket(x.shape[0] * x.shape[1]), x.shape[2],
                                         x.shape[3], hh, ww, wl, wm),
    default=lambda x, hh, ww, t, wl, wm: ("triton" if hh * ww >= UPSAMPLE_TRITON_MIN_PIXELS
                                          and _up_unsupported(x, hh, ww, t, wl, wm) is None else "torch"),
    cpu=lambda x, hh, ww, t, wl, wm: ("triton" if interpreting() and _up_unsupported(x, hh, ww, t, wl, wm) is None
                                      else "torch"),
    baseline="torch",
    first_output=_up_output,
)


# ----------------------------------------------------------------------------- connected components
# args: mask (..., H, W) -> (labels int32, areas int32). Exact: any difference fails the check.


def _cc_unsupported(mask) -> Optional[str]:
    return _triton_ok(mask) or _cc.unsupported_reason(mask, forced=True)


def _cc_both(out) -> torch.Tensor:
    return torch.stack([out[0], out[1]])


CONNECTED_COMPONENTS = Slot(
    name="connected_components",
    candidates=(Candidate("triton", _unchecked(_cc.connected_components_triton), _cc_unsupported),
                Candidate("torch", _cc.connected_components_reference)),
    reference=lambda mask: _cc_both(_cc.connected_components_reference(mask)),
    # masks per call (objects) and the mask size set the time; the dtype only the byte view
    bucket=lambda mask: (_pow2_bucket(mask[..., 0, 0].numel()), mask.shape[-2], mask.shape[-1]),
    # no host sync and capturable: the kernel, unless it cannot take the call
    default=lambda mask: "triton" if _cc_unsupported(mask) is None else "torch",
    cpu=lambda mask: "triton" if interpreting() and _cc_unsupported(mask) is None else "torch",
    baseline="torch",
    first_output=_cc_both,
    exact=True,
)


SLOTS = {s.name: s for s in (MEMORY_ATTENTION, WINDOW_ATTENTION, MASK_UPSAMPLE, CONNECTED_COMPONENTS)}
