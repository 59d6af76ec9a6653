"""8-connected components of binary masks in one Triton launch: labels and areas on the device.

What the model passes (every tracked frame with ``fill_hole_area > 0``, SAM 2.1's default):
    mask    (..., H, W) any dtype, nonzero = foreground; (N, 1, 256, 256) bool in video
            (``mask <= 0`` of the low-res logits, from ``fill_holes_in_mask_scores``).
Returns (labels, areas), both int32 of the mask's shape, exactly
``sam2_fast.utils.masks.connected_components_torch``: ``labels`` = 1 + the flat index (y * W + x)
of the component's first pixel in raster order, 0 on background; ``areas`` = the pixel count
of the pixel's component, 0 on background.

Algorithm (one program per image, B programs; no host reads, capturable in a CUDA graph).
Union-find with atomics (Playne & Hawick 2018; Allegretti et al.'s block union-find) on
horizontal runs, over a parent array L (int32, H*W per image) that lives in the ``labels``
output; the ``areas`` output holds the union work list, then the counts. Phases, separated
by ``tl.debug_barrier()`` (CTA-wide: every phase sees all writes of the one before):
  1. init (tiles of BLOCK flat pixels, raster order): L[p] = start of p's horizontal run (a
     prefix max over the tile; a run entering from the previous tile links to pixel t0 - 1),
     background L[p] = n = H*W (sentinel). Each foreground pixel that must join a run of the
     row above appends one work item p * 8 + bits (bit 0: up, 1: up-left, 2: up-right) to a
     compacted list (prefix sum): up if up is foreground and up-left is not (an upper run
     starts there); up-left at a run's first pixel; up-right at a run's last pixel when up is
     background. Every pair (lower run, touching upper run) gets at least one union this
     way (proof: the upper run either contains column s-1 of the lower run [s, e], starts
     inside [s, e], or starts at e+1), and runs are linked by the init, so the unions join
     exactly the 8-connected components.
  2. unions: the whole list at once, BLOCK items per chunk; each lane walks both ends to
     their roots (one gather per step) and hooks the larger root under the smaller with
     ``atomic_min(L + hi, lo)``; when another lane changed that root first (returned value
     != hi) it retries with (lo, returned). A ``while`` loop runs until no lane of the chunk
     is busy (a CTA-uniform ``tl.max``).
  3. zero the counts; 4. flatten in raster order (L[p] = root; earlier tiles already point at
     roots, so chains stay short) and count: one ``atomic_add`` per run piece of the tile;
  5. gather: labels = root + 1, areas = count[root].
Invariant (why races between lanes are benign): L[p] only ever decreases, and always names a
pixel of p's own component with L[p] <= p. So the smallest pixel of a component is its only
root once all unions are done, which is the torch path's canonical label; a stale read only
makes a lane walk or retry more, never join two components. The count in ``areas[r]`` of a
root r is overwritten by its own area (the same number), and non-roots' counts are never
read, so the gather runs in place.
Memory visibility inside the CTA: L is changed by atomics (performed in L2) and by other
threads, so every load of L and of the counts uses ``cache_modifier=".cg"`` (cache in L2
only): an L1 line filled before another thread's atomic would otherwise serve the old
parent. The mask is never written: its loads keep the L1 (6 overlapping neighbour loads).

Roofline (written before any GPU run or tuning; the next GPU lease checks it). Per image of
n pixels; the hot shape is 256 x 256 (1024 px input): n = 65,536, BLOCK = 2048, 32 tiles.
  * bytes: mask 1 B/px from L2 once (it was just written by ``mask <= 0``; the 6 overlapping
    neighbour loads hit L1), phase 1 writes L and the list (<= 8 B/px), phase 3 4 B/px,
    phase 4 reads 4 + writes 4 B/px plus one atomic per run piece, phase 5 reads 8 and
    writes 8 B/px: ~37 B/px = 2.4 MB per image, against ~100 GB/s that one SM draws from L2:
    ~25 us if bandwidth bound. Scratch = the outputs, 512 KB per image (4 MB for 8 objects):
    L2-resident on an H200 (50 MB).
  * passes ("sweeps"): fixed, no convergence sweeps: 4 streaming passes (init, zero, flatten,
    gather) + the union loop. Counted under the interpreter (``stats=``, printed by
    ``test_256_sam_like_and_union_loop_iterations``): on SAM-like 256^2 masks (the outside of
    a disk; smoothed noise, sigma 4-16, as ``mask <= 0`` of low-res logits) 395-1847 work
    items = 1 chunk, 13-15 union iterations, flatten 79-112 walk steps over the 32 tiles (<= 4
    in any tile). Worst case seen, noise at density 0.5: 19,514 items, 10 chunks, 147 union
    iterations (scales with the number of runs, not with n).
  * latency: one CTA per image, so B images use B of the H200's 132 SMs: the time is one SM's
    and the same for 1 and for 8 objects (up to 132). The passes are bound by dependent L2
    round trips (~300-400 cycles with the CTA-wide reductions), not bytes: phase 1 ~0.5 us a
    tile (2 scans) = ~16 us, unions 14 x ~0.45 us = ~6 us, zero ~3 us, flatten ~1 us a tile
    (load, ~3 walk steps, scan, atomic) = ~33 us, gather ~0.3 us a tile = ~10 us.
    Predicted: ~70 us per frame (range 40-100 us) for 1 and for 8 objects at 256 x 256.
  * against the torch loop, on the same masks with the CUDA plan (3 hooking rounds + 2 jumps
    per check): ``fill_holes_in_mask_scores`` runs 81 aten ops (~80 kernel launches, each
    ~5-10 us of eager host time: ~0.4-0.8 ms) and 2 host syncs per frame (more on harder
    masks: 3-13, ``schedule``), and cannot be captured in a CUDA graph; the kernel is one
    launch, no sync, capturable. Predicted gain: 5-10x on the hole filling, plus the CPU
    free to queue the next frame.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import LaunchConfig

# Work items are p * 8 + bits in int32 and labels are flat indices + 1: n * 8 must fit.
MAX_PIXELS = (2**31 - 1) // 8
# 2048 pixels per tile with 16 warps: 4 per thread. Larger tiles mean fewer dependent round
# trips per pass (roofline), registers bound the tile: AOT (triton 3.8) 82 registers on sm_80,
# 102 on sm_90, no spills; 4096 x 16 warps spills at the 128-register cap (148 B on sm_90),
# 4096 x 32 warps at the 64-register cap (112 B).
CONFIG = LaunchConfig(2048, 1, 16, 1)
# Where the neighbours of a pixel are looked up: rows above (dy = -1) at dx = 0, -1, +1 for
# work bits 0, 1, 2. A module constant so that a mutation test can plant a wrong offset.
UP_DX = (0, -1, 1)
# Phase 4 walks every pixel to its root (False: a planted bug for the mutation test).
FLATTEN = True
STATS_LEN = 8  # union iterations, chunks, work items, flatten steps (sum, max), 3 spare


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _partner(p, bits, W, DX0: tl.constexpr, DX1: tl.constexpr, DX2: tl.constexpr):
    """The upper neighbour named by the lowest set bit of ``bits``."""
    dx = tl.where((bits & 1) != 0, DX0, tl.where((bits & 2) != 0, DX1, DX2))
    return p - W + dx


# H and W change with the image size and feed no vector access: not specialised (one
# compiled variant per tile config for every mask size).
@triton.jit(do_not_specialize=["H", "W"])
def _cc_kernel(mask_ptr, lab_ptr, area_ptr, stats_ptr, H, W,
               BLOCK: tl.constexpr, DX0: tl.constexpr, DX1: tl.constexpr, DX2: tl.constexpr,
               FLATTEN: tl.constexpr, STATS: tl.constexpr):
    img = tl.program_id(0).to(tl.int64)
    n = H * W
    m = mask_ptr + img * n
    L = lab_ptr + img * n
    A = area_ptr + img * n
    lane = tl.arange(0, BLOCK)
    zero = tl.sum(lane * 0, axis=0)  # int32 scalar, loop-carried below

    # ---- 1. init: run starts, work list (compacted into A)
    count = zero
    for t0 in range(0, n, BLOCK):
        p = t0 + lane
        inb = p < n
        y = p // W
        x = p - y * W
        fg = tl.load(m + p, mask=inb, other=0) != 0
        left = tl.load(m + p - 1, mask=inb & (x > 0), other=0) != 0
        right = tl.load(m + p + 1, mask=inb & (x < W - 1), other=0) != 0
        up = tl.load(m + p - W, mask=inb & (y > 0), other=0) != 0
        ul = tl.load(m + p - W - 1, mask=inb & (y > 0) & (x > 0), other=0) != 0
        ur = tl.load(m + p - W + 1, mask=inb & (y > 0) & (x < W - 1), other=0) != 0
        start = fg & ~left
        s = tl.associative_scan(tl.where(start, p, -1), 0, _max_combine)
        tl.store(L + p, tl.where(fg, tl.where(s >= 0, s, t0 - 1), n), mask=inb)
        bits = ((fg & up & ~ul).to(tl.int32) | ((start & ul).to(tl.int32) << 1)
                | ((fg & ~right & ~up & ur).to(tl.int32) << 2))
        need = bits != 0
        pos = count + tl.cumsum(need.to(tl.int32), 0) - 1
        tl.store(A + pos, p * 8 + bits, mask=need)
        count += tl.sum(need.to(tl.int32), axis=0)
    tl.debug_barrier()

    # ---- 2. unions over the work list
    iters = zero
    for c0 in range(0, count, BLOCK):
        i = c0 + lane
        busy = i < count
        item = tl.load(A + i, mask=busy, other=0, cache_modifier=".cg")
        p = item >> 3
        bits = item & 7
        a = p
        b = _partner(p, bits, W, DX0, DX1, DX2)
        bits = bits & (bits - 1)
        ap = a  # union walks: the node each walk came from (== a: none yet); compressing: x
        bp = b
        comp = busy & False  # lanes compressing the root they just hooked (see below)
        while tl.max(busy.to(tl.int32), axis=0) > 0:
            walk = busy & ~comp
            pa = tl.load(L + a, mask=busy, other=0, cache_modifier=".cg")
            pb = tl.load(L + b, mask=walk, other=0, cache_modifier=".cg")
            # path splitting: the node a walk came from now points at its grandparent
            # (relaxed: these writes only shorten paths, no other access is ordered by them)
            tl.atomic_min(L + ap, pa, mask=walk & (ap != a) & (pa != a), sem="relaxed")
            tl.atomic_min(L + bp, pb, mask=walk & (bp != b) & (pb != b), sem="relaxed")
            roots = walk & (pa == a) & (pb == b)
            hi = tl.maximum(a, b)
            lo = tl.minimum(a, b)
            hook = roots & (a != b)
            old = tl.atomic_min(L + hi, lo, mask=hook)
            won = hook & (old == hi)
            # After hooking hi under lo, a lane walks on from lo to the root and keeps pointing
            # hi at the farthest node reached. All rows hook their runs at once, so hooks form
            # chains as long as the image is tall (s_y -> s_y-1 -> ...: 171-200 union steps on
            # the outside of a disk at 256^2); every chain node doing this is pointer jumping
            # (each step doubles the distance): ~log2 steps, and later walks stay short.
            cstep = busy & comp & (pa != a)
            tl.atomic_min(L + ap, pa, mask=cstep, sem="relaxed")
            done = (roots & (a == b)) | (busy & comp & (pa == a))
            # next state: walkers step to the parents; a lost hook retries with (lo, old);
            # a won hook starts compressing hi; a compressing lane steps on
            nxt_a = tl.where(hook, lo, pa)
            ap = tl.where(won, hi, tl.where(hook, lo, tl.where(comp, ap, a)))
            bp = tl.where(hook, old, b)
            b = tl.where(hook, old, pb)
            a = nxt_a
            comp = comp | won
            more = done & (bits != 0)  # the second union of this pixel
            a = tl.where(more, p, a)
            b = tl.where(more, _partner(p, bits, W, DX0, DX1, DX2), b)
            ap = tl.where(more, a, ap)
            bp = tl.where(more, b, bp)
            comp = comp & ~more
            bits = tl.where(more, bits & (bits - 1), bits)
            busy = busy & (~done | more)
            iters += 1
    tl.debug_barrier()

    # ---- 3. zero the counts (A held the work list)
    for t0 in range(0, n, BLOCK):
        p = t0 + lane
        tl.store(A + p, lane * 0, mask=p < n)
    tl.debug_barrier()

    # ---- 4. flatten in raster order, count run pieces
    steps = zero
    worst = zero
    for t0 in range(0, n, BLOCK):
        p = t0 + lane
        inb = p < n
        y = p // W
        x = p - y * W
        r = tl.load(L + p, mask=inb, other=n, cache_modifier=".cg")
        fg = r < n
        if FLATTEN:
            walk = fg
            k = zero
            while tl.max(walk.to(tl.int32), axis=0) > 0:
                pr = tl.load(L + r, mask=walk, other=0, cache_modifier=".cg")
                walk = walk & (pr != r)
                r = tl.where(walk, pr, r)
                # pointer jumping: publish the ancestor reached, so lanes walking through p
                # skip ahead (rows of one tile chain onto each other: 16-34 steps -> ~log2)
                tl.store(L + p, r, mask=walk)
                k += 1
            steps += k
            worst = tl.maximum(worst, k)
            tl.store(L + p, r, mask=fg)
        left = tl.load(m + p - 1, mask=fg & (x > 0) & (p > t0), other=0) != 0
        right = tl.load(m + p + 1, mask=fg & (x < W - 1) & (p < t0 + BLOCK - 1), other=0) != 0
        seg = tl.associative_scan(tl.where(fg & ~left, p, -1), 0, _max_combine)
        # relaxed: the barrier after the pass orders the counts before the gather reads them
        tl.atomic_add(A + r, p - seg + 1, mask=fg & ~right, sem="relaxed")
    tl.debug_barrier()

    # ---- 5. gather: labels = root + 1, areas = count of the root (in place, see docstring)
    for t0 in range(0, n, BLOCK):
        p = t0 + lane
        inb = p < n
        r = tl.load(L + p, mask=inb, other=n, cache_modifier=".cg")
        fg = r < n
        area = tl.load(A + r, mask=fg, other=0, cache_modifier=".cg")
        tl.store(L + p, tl.where(fg, r + 1, 0), mask=inb)
        tl.store(A + p, area, mask=inb)

    if STATS:
        out = tl.arange(0, 8)
        vals = tl.where(out == 0, iters, tl.where(out == 1, (count + BLOCK - 1) // BLOCK,
                        tl.where(out == 2, count, tl.where(out == 3, steps,
                                 tl.where(out == 4, worst, 0)))))
        tl.store(stats_ptr + img * 8 + out, vals)


def unsupported_reason(mask: torch.Tensor, forced: bool = False) -> Optional[str]:
    """Why the kernel cannot label ``mask`` (None when it can). ``forced``: CPU tensors are
    accepted (tests under TRITON_INTERPRET=1)."""
    if mask.dim() < 2:
        return f"mask must be (..., H, W), got shape {tuple(mask.shape)}"
    if mask.device.type != "cuda" and not forced:
        return f"Triton needs a CUDA tensor, got {mask.device.type}"
    h, w = mask.shape[-2:]
    if h * w > MAX_PIXELS:
        return f"{h}x{w} masks are too large for int32 work items (at most {MAX_PIXELS} pixels)"
    if mask.is_complex():
        return f"mask dtype {mask.dtype} is not supported"
    return None


def all_configs():
    """(constexprs, LaunchConfig) per compiled variant: one, whatever the mask size."""
    return [(dict(BLOCK=CONFIG.block_m, DX0=UP_DX[0], DX1=UP_DX[1], DX2=UP_DX[2], FLATTEN=True,
                  STATS=False), CONFIG)]


def _as_bytes(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H*W) one byte per pixel, contiguous: bool / (u)int8 as they are, else ``!= 0``."""
    if mask.dtype in (torch.bool, torch.uint8, torch.int8):
        flat = mask.reshape(-1, h * w)
        return (flat if flat.is_contiguous() else flat.contiguous()).view(torch.uint8)
    return (mask != 0).reshape(-1, h * w).view(torch.uint8)  # NaN counts as foreground, as != 0


def connected_components_triton(mask: torch.Tensor, check: bool = True,
                                stats: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(labels, areas) of ``mask`` (module docstring), one launch of B = prod(leading dims)
    programs. ``stats``: an int32 (B, 8) buffer for the loop counters (tests, roofline).
    ``check=False``: the caller ran ``unsupported_reason`` (the selection layer)."""
    if check:
        reason = unsupported_reason(mask, forced=mask.device.type != "cuda")
        if reason is not None:
            raise ValueError(f"connected_components: {reason}")
    shape = mask.shape
    h, w = int(shape[-2]), int(shape[-1])
    labels = torch.empty(shape, dtype=torch.int32, device=mask.device)
    areas = torch.empty(shape, dtype=torch.int32, device=mask.device)
    if labels.numel() == 0:
        return labels, areas
    src = _as_bytes(mask, h, w)  # (B, n)
    b = src.shape[0]
    want_stats = stats is not None
    if want_stats and (stats.dtype != torch.int32 or tuple(stats.shape) != (b, STATS_LEN)):
        raise ValueError(f"connected_components: stats must be int32 ({b}, {STATS_LEN})")
    (consts, cfg), = all_configs()
    consts = dict(consts, DX0=UP_DX[0], DX1=UP_DX[1], DX2=UP_DX[2], FLATTEN=FLATTEN, STATS=want_stats)
    _cc_kernel[(b,)](src, labels, areas, stats if want_stats else labels, h, w,
                     **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return labels, areas


def connected_components_reference(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch path (label propagation in vectorised torch ops)."""
    from sam2_fast.utils.masks import connected_components_torch
    return connected_components_torch(mask)
