"""Bilinear upsampling of mask logits fused with thresholding.

What the model passes (end of a frame, all objects at once):
    logits    (N, C, h, w)  low-res mask logits (SAM 2: (num_objects, 1, 256, 256) or the
                            (N, 1, 1024, 1024) high-res ones), fp32/fp16/bf16, any strides.
    size      (H, W)        the video frame size.
    threshold float         mask = logit > threshold (0.0 in SAM 2's predictors).
    want_logits bool        also return the resized logits (in the input dtype).
Returns (mask (N, C, H, W) bool, logits (N, C, H, W) or None).

Sampling is that of ``F.interpolate(x, size, mode="bilinear", align_corners=False)`` with
antialias off: source = max(scale * (dst + 0.5) - 0.5, 0), scale = h / H in fp32, the upper
neighbour clamped to the last row/column; the threshold applies to the value rounded to the
input dtype (as thresholding the reference's output does).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import LaunchConfig, check_dtype, raise_if


# H (frame height) and C (1 mask per object in video, 3 multimask outputs in images) change
# between calls and feed no vector access (row masks, the plane split): not specialised.
# W stays specialised (a multiple of 16 keeps output rows 16-byte aligned: vector stores),
# and so do the strides (s_xw == 1: contiguous loads). AOT: 15 -> 6 variants per dtype/target.
@triton.jit(do_not_specialize=["H", "C"])
def _upsample_threshold_kernel(
    x_ptr, mask_ptr, logit_ptr,
    s_xn, s_xc, s_xh, s_xw,    # input strides (any layout)
    h, w, H, W, C,
    scale_h, scale_w, threshold,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    WRITE_MASK: tl.constexpr,    # store the thresholded mask (1 byte a pixel)
    WRITE_LOGITS: tl.constexpr,  # store the resized logits
):
    plane = tl.program_id(0)
    n = plane // C
    c = plane % C
    oy = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ox = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    # Source coordinates, clamped at 0 like the reference (align_corners=False).
    sy = tl.maximum(scale_h * (oy.to(tl.float32) + 0.5) - 0.5, 0.0)
    sx = tl.maximum(scale_w * (ox.to(tl.float32) + 0.5) - 0.5, 0.0)
    y0 = sy.to(tl.int32)  # truncation == floor for sy >= 0
    x0 = sx.to(tl.int32)
    ly = sy - y0.to(tl.float32)
    lx = sx - x0.to(tl.float32)
    y1 = tl.where(y0 < h - 1, y0 + 1, y0)
    x1 = tl.where(x0 < w - 1, x0 + 1, x0)
    y0 = tl.minimum(y0, h - 1)  # rows past the output edge are masked anyway
    y1 = tl.minimum(y1, h - 1)
    x0 = tl.minimum(x0, w - 1)
    x1 = tl.minimum(x1, w - 1)

    ok = (oy < H)[:, None] & (ox < W)[None, :]
    base = x_ptr + n.to(tl.int64) * s_xn + c.to(tl.int64) * s_xc
    r0 = base + y0[:, None] * s_xh
    r1 = base + y1[:, None] * s_xh
    a = tl.load(r0 + x0[None, :] * s_xw, mask=ok, other=0.0).to(tl.float32)
    bb = tl.load(r0 + x1[None, :] * s_xw, mask=ok, other=0.0).to(tl.float32)
    cc = tl.load(r1 + x0[None, :] * s_xw, mask=ok, other=0.0).to(tl.float32)
    d = tl.load(r1 + x1[None, :] * s_xw, mask=ok, other=0.0).to(tl.float32)
    wy = ly[:, None]
    wx = lx[None, :]
    top = (1.0 - wx) * a + wx * bb
    bot = (1.0 - wx) * cc + wx * d
    val = ((1.0 - wy) * top + wy * bot).to(x_ptr.dtype.element_ty)

    out_off = plane.to(tl.int64) * H * W + oy[:, None] * W + ox[None, :]
    if WRITE_MASK:  # the video/image predictors want logits only: no mask bytes written
        tl.store(mask_ptr + out_off, (val.to(tl.float32) > threshold).to(tl.uint8), mask=ok)
    if WRITE_LOGITS:
        tl.store(logit_ptr + out_off, val, mask=ok)


def unsupported_reason(logits: torch.Tensor, size: Tuple[int, int]) -> Optional[str]:
    """Why these inputs cannot be upsampled here (None when they can)."""
    if logits.dim() != 4:
        return f"logits must be (N, C, h, w), got shape {tuple(logits.shape)}"
    if len(size) != 2 or min(size) <= 0:
        return f"size must be (H, W) with positive sides, got {size}"
    if min(logits.shape[2:]) <= 0:
        return f"empty low-res map {tuple(logits.shape)}"
    return check_dtype("logits", logits)


def pick_config(out_w: int) -> LaunchConfig:
    """Tiles of 8 rows x 128 columns (4 warps): wide rows, coalesced byte stores."""
    return LaunchConfig(8, 128, 4, 1)


def all_configs(dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """(dtype, constexprs, LaunchConfig) per variant; writing logits is a runtime flag."""
    cfg = pick_config(0)
    # (mask, logits) outputs: mask only, logits only (the predictors), both
    outs = ((True, False), (False, True), (True, True))
    return [(dt, dict(BLOCK_H=cfg.block_m, BLOCK_W=cfg.block_n, WRITE_MASK=m, WRITE_LOGITS=lg), cfg)
            for dt in dtypes for m, lg in outs]


def upsample_masks_triton(logits: torch.Tensor, size: Tuple[int, int], threshold: float = 0.0,
                          want_logits: bool = False, mask_out: Optional[torch.Tensor] = None,
                          logits_out: Optional[torch.Tensor] = None, want_mask: bool = True,
                          check: bool = True):
    """Launch the kernel (tensors: module docstring). ``mask_out`` may be a uint8 or bool buffer.
    Returns (mask | None, logits | None): only what was asked for is written. ``check=False``:
    the caller has just run ``unsupported_reason`` (the selection layer)."""
    if check:
        raise_if(unsupported_reason(logits, size), "upsample_masks")
    if not (want_mask or want_logits):
        raise ValueError("upsample_masks: asked for neither the mask nor the logits")
    n, c, h, w = logits.shape
    H, W = int(size[0]), int(size[1])
    shape = (n, c, H, W)
    if want_mask:
        if mask_out is None:
            mask_out = torch.empty(shape, device=logits.device, dtype=torch.bool)
        if tuple(mask_out.shape) != shape or mask_out.dtype not in (torch.bool, torch.uint8) \
                or not mask_out.is_contiguous():
            raise ValueError(f"upsample_masks: mask_out must be contiguous bool/uint8 {shape}")
    if want_logits:
        if logits_out is None:
            logits_out = torch.empty(shape, device=logits.device, dtype=logits.dtype)
        if tuple(logits_out.shape) != shape or logits_out.dtype != logits.dtype or not logits_out.is_contiguous():
            raise ValueError(f"upsample_masks: logits_out must be contiguous {logits.dtype} {shape}")
    # bool and uint8 share one byte per element; an unused pointer gets the logits
    mask_u8 = mask_out.view(torch.uint8) if want_mask else logits
    cfg = pick_config(W)
    grid = (n * c, triton.cdiv(H, cfg.block_m), triton.cdiv(W, cfg.block_n))
    _upsample_threshold_kernel[grid](
        logits, mask_u8, logits_out if want_logits else logits,  # never written when off
        logits.stride(0), logits.stride(1), logits.stride(2), logits.stride(3), h, w, H, W, c,
        h / H, w / W, float(threshold),  # passed as fp32 scalars, like the reference's scale
        BLOCK_H=cfg.block_m, BLOCK_W=cfg.block_n, WRITE_MASK=want_mask, WRITE_LOGITS=want_logits,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (mask_out if want_mask else None), (logits_out if want_logits else None)


def upsample_masks_reference(logits: torch.Tensor, size: Tuple[int, int], threshold: float = 0.0,
                             want_logits: bool = False, want_mask: bool = True):
    """PyTorch path: the reference's interpolate, then the comparison (when wanted)."""
    if logits.dim() != 4:
        raise ValueError(f"upsample_masks: logits must be (N, C, h, w), got shape {tuple(logits.shape)}")
    big = F.interpolate(logits, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return (big > threshold if want_mask else None), (big if want_logits else None)
