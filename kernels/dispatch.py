"""What the model calls: one dispatcher per kernel, Triton on CUDA, PyTorch elsewhere.

Public functions (tensor contracts in each docstring and in the kernel modules):
    window_attention(qkv, qkv_bias, num_heads, window, q_pool) -> (B, H', W', C)
    memory_attention_vspace(q, k, v, ranges=None) -> (B, Nq, Dv)
    upsample_masks(logits, size, threshold=0.0, want_logits=False) -> (mask, logits | None)
    connected_components(mask) -> (labels int32, areas int32)
    kernel_enabled(kernel, device_type) -> bool
    window_attention_reason(qkv, qkv_bias, num_heads, window, q_pool) -> str | None

Switches (read when a call is traced/run; names in ``ENV_ALL`` / ``ENV_SWITCHES``):
    SAM2_FAST_DISABLE_KERNELS=1         every dispatcher uses the PyTorch path
    SAM2_FAST_DISABLE_WINDOW_ATTN=1     only window_attention
    SAM2_FAST_DISABLE_MEMORY_ATTN=1     only memory_attention_vspace (memory cross- and self-attention)
    SAM2_FAST_DISABLE_MASK_UPSAMPLE=1   only upsample_masks
    SAM2_FAST_DISABLE_CONNECTED_COMPONENTS=1  only connected_components (hole filling); until a
                                        GPU run has passed it, off on CUDA unless set to 0
                                        (``UNVERIFIED_ON_GPU``)
    SAM2_FAST_FORCE_KERNELS=1 / ``with force_kernels():``  use Triton on CPU tensors too;
                                        needs TRITON_INTERPRET=1 at process start (tests)
    SAM2_FAST_FLASH_ATTN=1              global (window 0) Hiera blocks in fp16/bf16 on CUDA go
                                        through flash-attn when it is installed (optional)
``kernel_enabled(kernel, device_type)`` is the switch/device policy alone: model code asks it
before calling a dispatcher, so where no kernel runs (the CPU default) the model keeps its
own PyTorch path; ``window_attention_reason(...)`` says (and counts) why a Hiera block would
be declined. ``launch_counts()`` tells which kernels ran (custom-op executions, so compiled
graphs count too) and ``fallback_counts()`` why an enabled kernel handed a call to PyTorch.

Each Triton path is a ``torch.library`` custom op (namespace ``sam2_fast``) with a fake
implementation, so ``torch.compile(fullgraph=True)`` traces through it; eager calls skip the
op's dispatch and run its body directly. The PyTorch paths are plain tensor code that the
compiler sees directly.
"""

from __future__ import annotations

import collections
import contextlib
import os
from typing import Optional, Tuple

import torch

from . import connected_components as _cc
from . import mask_upsample as _mu
from . import select as _select
from . import slots as _slots
from . import vspace_attention as _va
from . import window_attention as _wa
from ._common import interpreting

# Public switch names (the bench ladder sets them per row): "1" sends calls to PyTorch.
ENV_ALL = "SAM2_FAST_DISABLE_KERNELS"
ENV_SWITCHES = {
    "window_attention": "SAM2_FAST_DISABLE_WINDOW_ATTN",
    "memory_attention": "SAM2_FAST_DISABLE_MEMORY_ATTN",
    "mask_upsample": "SAM2_FAST_DISABLE_MASK_UPSAMPLE",
    "connected_components": "SAM2_FAST_DISABLE_CONNECTED_COMPONENTS",
}
# Old private spellings, kept for code written against them.
_ENV_ALL = ENV_ALL
_ENV_ONE = ENV_SWITCHES
_ENV_FORCE = "SAM2_FAST_FORCE_KERNELS"
_ENV_FLASH = "SAM2_FAST_FLASH_ATTN"

_LAUNCHES: collections.Counter = collections.Counter()
_FALLBACKS: collections.Counter = collections.Counter()
_BACKENDS: collections.Counter = collections.Counter()
_FORCE_DEPTH = [0]


def launch_counts() -> dict:
    """{kernel name: times it ran} since the last reset."""
    return dict(_LAUNCHES)


def fallback_counts() -> dict:
    """{"kernel: reason": times an enabled kernel declined a call}."""
    return dict(_FALLBACKS)


def backend_counts() -> dict:
    """{"slot: candidate": calls} — which implementation the selection layer ran."""
    return dict(_BACKENDS)


def backend_choices() -> dict:
    """The selection layer's choices (cache key -> choice, measured us, errors)."""
    return _select.choices()


def reset_launch_counts() -> None:
    _LAUNCHES.clear()
    _FALLBACKS.clear()
    _BACKENDS.clear()


def _run_slot(slot, *args):
    """Run a slot through its chosen candidate (inside a custom op: measured at run time,
    never while torch.compile traces; inside CUDA-graph capture the cached choice runs)."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    cand = _select.choose(slot, device, *args)
    _BACKENDS[f"{slot.name}: {cand.name}"] += 1
    return cand.run(*args)


@contextlib.contextmanager
def force_kernels():
    """Use the Triton kernels on CPU tensors too (under TRITON_INTERPRET=1)."""
    _FORCE_DEPTH[0] += 1
    try:
        yield
    finally:
        _FORCE_DEPTH[0] -= 1


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


# Kernels that have not passed a GPU run yet (``gpu_check.sh quick``: its CUDA tests and its
# timing row): on CUDA they run only when their switch is set to 0 explicitly (the bench
# ladder sets every switch; ``SAM2_FAST_DISABLE_CONNECTED_COMPONENTS=0`` opts in). Why: the
# interpreter checks their logic, not a GPU's memory ordering, and a wrong or hung kernel on
# every tracked frame is worse than the torch loop it replaces. Forced runs (interpreter
# tests) use them. connected_components: written 2026-12-01 on a machine without a GPU.
UNVERIFIED_ON_GPU = frozenset({"connected_components"})


def _opted_in(kernel: str) -> bool:
    raw = os.environ.get(ENV_SWITCHES[kernel])
    return raw is not None and raw.strip().lower() in ("0", "false", "no", "off")


@torch.compiler.assume_constant_result
def _use_triton(kernel: str, device_type: str) -> bool:
    """The backend policy for one kernel on one device type (constant for a compiled graph)."""
    if _flag(ENV_ALL) or _flag(ENV_SWITCHES[kernel]):
        return False
    if device_type == "cuda":
        return kernel not in UNVERIFIED_ON_GPU or _opted_in(kernel)
    if _FORCE_DEPTH[0] > 0 or _flag(_ENV_FORCE):
        if not interpreting():
            raise RuntimeError(
                f"{_ENV_FORCE}/force_kernels() on {device_type} tensors needs TRITON_INTERPRET=1 "
                "set before triton is imported")
        return True
    return False


def kernel_enabled(kernel: str, device_type: str) -> bool:
    """Whether ``kernel``'s dispatcher sends calls on ``device_type`` tensors to Triton.

    kernel: a key of ``ENV_SWITCHES``. This is the switch/device policy only; a call can
    still fall back for its shapes (counted in ``fallback_counts``). Model code asks this
    first so that, where no kernel runs, it keeps its own PyTorch path bit for bit.
    """
    if kernel not in ENV_SWITCHES:
        raise ValueError(f"unknown kernel {kernel!r}; known: {sorted(ENV_SWITCHES)}")
    return _use_triton(kernel, device_type)


def _declined(kernel: str, reason: Optional[str]) -> bool:
    if reason is None:
        return False
    if not torch.compiler.is_compiling():
        _FALLBACKS[f"{kernel}: {reason}"] += 1
    return True


# ----------------------------------------------------------------------------- custom ops


# Each op body is a plain function too: eager calls run it directly (the custom-op dispatch
# costs ~14 us of host time per call, measured on this CPU; issue 8 item 8), while a graph
# that torch.compile traces calls the op (its fake implementation gives the output shape).


def _window_attention_impl(qkv, qkv_bias, num_heads, window, q_pool):
    _LAUNCHES["window_attention"] += 1
    return _run_slot(_slots.WINDOW_ATTENTION, qkv, qkv_bias, num_heads, window, q_pool)


@torch.library.custom_op("sam2_fast::window_attention", mutates_args=())
def _window_attention_op(qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], num_heads: int,
                         window: int, q_pool: bool) -> torch.Tensor:
    return _window_attention_impl(qkv, qkv_bias, num_heads, window, q_pool)


@_window_attention_op.register_fake
def _(qkv, qkv_bias, num_heads, window, q_pool):
    return qkv.new_empty(_wa.output_shape(qkv, window, q_pool))


def _upsample_masks_impl(logits, height, width, threshold, want_logits, want_mask):
    _LAUNCHES["mask_upsample"] += 1
    return _run_slot(_slots.MASK_UPSAMPLE, logits, height, width, threshold, want_logits, want_mask)


@torch.library.custom_op("sam2_fast::upsample_masks", mutates_args=())
def _upsample_masks_op(logits: torch.Tensor, height: int, width: int, threshold: float,
                       want_logits: bool, want_mask: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    mask, big = _upsample_masks_impl(logits, height, width, threshold, want_logits, want_mask)
    # custom ops return tensors: an output not asked for is an empty placeholder
    return (mask if mask is not None else logits.new_empty(0, dtype=torch.bool)), \
        (big if big is not None else logits.new_empty(0))


@_upsample_masks_op.register_fake
def _(logits, height, width, threshold, want_logits, want_mask):
    n, c = logits.shape[:2]
    mask = logits.new_empty((n, c, height, width) if want_mask else (0,), dtype=torch.bool)
    big = logits.new_empty((n, c, height, width) if want_logits else (0,))
    return mask, big


def _vspace_attention_impl(q, k, v, ranges):
    _LAUNCHES["vspace_attention"] += 1
    return _run_slot(_slots.MEMORY_ATTENTION, q, k, v, ranges)


@torch.library.custom_op("sam2_fast::vspace_attention", mutates_args=())
def _vspace_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         ranges: Optional[torch.Tensor]) -> torch.Tensor:
    return _vspace_attention_impl(q, k, v, ranges)


@_vspace_attention_op.register_fake
def _(q, k, v, ranges):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2]))


def _connected_components_impl(mask):
    _LAUNCHES["connected_components"] += 1
    return _run_slot(_slots.CONNECTED_COMPONENTS, mask)


@torch.library.custom_op("sam2_fast::connected_components", mutates_args=())
def _connected_components_op(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    labels, areas = _connected_components_impl(mask)
    return labels, areas


@_connected_components_op.register_fake
def _(mask):
    return mask.new_empty(mask.shape, dtype=torch.int32), mask.new_empty(mask.shape, dtype=torch.int32)


# ----------------------------------------------------------------------------- dispatchers


def memory_attention_vspace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            ranges: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Memory cross-attention in the value space (see ``vspace_attention.py``).

    q (B, Nq, DK) and k (B, Nk, DK) already rotated; v (B, Nk, DV) the raw 64-d memory;
    ranges (B, 4) int32 valid-key ranges or None. Returns (B, Nq, DV) = softmax(q k^T/sqrt(DK)) v.
    Where kernels are enabled the call goes to the selection layer (Triton or an SDPA
    backend, whichever measured fastest on this card), else to PyTorch's SDPA.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0]:
        raise ValueError(f"memory_attention_vspace: q (B, Nq, D), k (B, Nk, D), v (B, Nk, Dv) expected, "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if _use_triton("memory_attention", q.device.type):
        if torch.compiler.is_compiling():
            return torch.ops.sam2_fast.vspace_attention(q, k, v, ranges)
        return _vspace_attention_impl(q, k, v, ranges)
    return _va.vspace_attention_reference(q, k, v, ranges)


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func  # optional dependency
    except Exception:
        return None
    return flash_attn_func


def flash_attn_available() -> bool:
    return _flash_attn_func() is not None


def _window_attention_flash(qkv, num_heads, q_pool):
    """Global block through flash-attn: (B, H, W, 3C) -> (B, H', W', C)."""
    b, h, w, c3 = qkv.shape
    q, k, v = qkv.reshape(b, h * w, 3, num_heads, -1).unbind(2)  # (B, N, heads, hd)
    hq, wq = h, w
    if q_pool:
        grid = q.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        grid = torch.nn.functional.max_pool2d(grid, _wa.Q_POOL_STRIDE, _wa.Q_POOL_STRIDE)
        hq, wq = grid.shape[-2:]
        q = grid.permute(0, 2, 3, 1).reshape(b, hq * wq, num_heads, -1)
    _LAUNCHES["flash_window_attention"] += 1
    return _flash_attn_func()(q, k, v).reshape(b, hq, wq, c3 // 3)


def window_attention_reason(qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], num_heads: int,
                            window: int, q_pool: bool) -> Optional[str]:
    """Why the window kernel would not take this call (None when it would); a reason is
    counted in ``fallback_counts``. Lets the model keep its own path for such blocks (e.g.
    q pooling of an odd map, which ``window_attention``'s PyTorch path rejects)."""
    reason = _wa.unsupported_reason(qkv, qkv_bias, num_heads, window, q_pool)
    _declined("window_attention", reason)
    return reason


def window_attention(qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], num_heads: int,
                     window: int, q_pool: bool) -> torch.Tensor:
    """Attention core of one Hiera ``MultiScaleBlock`` (replaces partition/pad/SDPA/unpartition).

    qkv: (B, H, W, 3*C) = ``blk.attn.qkv(blk.norm1(x))`` on the unpadded map (any float dtype,
    channels contiguous). qkv_bias: ``blk.attn.qkv.bias`` (3*C,) — the k/v of zero-padded tokens
    of ragged windows. num_heads: ``blk.attn.num_heads``. window: ``blk.window_size`` (0 =
    global). q_pool: ``blk.pool is not None`` (2x2 query max-pool at a stage transition).
    Returns (B, H', W', C) before ``blk.attn.proj``; H', W' = H//2, W//2 when q_pool.
    """
    if (window == 0 and _flag(_ENV_FLASH) and qkv.is_cuda and qkv.dtype != torch.float32
            and flash_attn_available()):
        return _window_attention_flash(qkv, num_heads, q_pool)
    if _use_triton("window_attention", qkv.device.type) and not _declined(
            "window_attention", _wa.unsupported_reason(qkv, qkv_bias, num_heads, window, q_pool)):
        if torch.compiler.is_compiling():
            return torch.ops.sam2_fast.window_attention(qkv, qkv_bias, num_heads, window, q_pool)
        return _window_attention_impl(qkv, qkv_bias, num_heads, window, q_pool)
    return _wa.window_attention_reference(qkv, qkv_bias, num_heads, window, q_pool)


def upsample_masks(logits: torch.Tensor, size: Tuple[int, int], threshold: float = 0.0,
                   want_logits: bool = False, want_mask: bool = True):
    """Resize mask logits to the frame size and threshold them, all objects at once.

    logits: (N, C, h, w) low-res logits (e.g. ``low_res_masks`` (num_objects, 1, 256, 256)).
    size: (H, W) of the video frame. Returns (mask (N, C, H, W) bool = resized > threshold,
    resized logits in the input dtype when want_logits else None) — the same as
    ``F.interpolate(logits, size, mode="bilinear", align_corners=False)`` then ``> threshold``.
    ``want_mask=False`` (callers that threshold later, e.g. the predictors) writes no mask
    (mask returned as None).
    """
    if not (want_mask or want_logits):
        raise ValueError("upsample_masks: asked for neither the mask nor the logits")
    if _use_triton("mask_upsample", logits.device.type) and not _declined(
            "mask_upsample", _mu.unsupported_reason(logits, size)):
        if not torch.compiler.is_compiling():
            return _upsample_masks_impl(logits, int(size[0]), int(size[1]), float(threshold),
                                        want_logits, want_mask)
        mask, big = torch.ops.sam2_fast.upsample_masks(logits, int(size[0]), int(size[1]),
                                                      float(threshold), want_logits, want_mask)
        return (mask if want_mask else None), (big if want_logits else None)
    return _mu.upsample_masks_reference(logits, size, threshold, want_logits, want_mask)


def connected_components(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """8-connected components, ``sam2_fast.utils.masks.connected_components``'s contract.

    mask: (..., H, W), nonzero = foreground. Returns (labels, areas), int32, the mask's
    shape: labels = 1 + flat index of the component's first pixel (0 on background), areas =
    the component's pixel count. Where kernels are enabled the call goes to the selection
    layer (one Triton launch with no host sync, or the torch loop where it measured faster);
    shapes the kernel declines (counted in ``fallback_counts``) and the rest go to torch.
    """
    if _use_triton("connected_components", mask.device.type) and not _declined(
            "connected_components", _cc.unsupported_reason(mask, forced=True)):
        if torch.compiler.is_compiling():
            return torch.ops.sam2_fast.connected_components(mask)
        return _connected_components_impl(mask)
    return _cc.connected_components_reference(mask)
