"""Hiera windowed / global attention with window partition, padding and un-partition fused.

What the model passes (one ``MultiScaleBlock``):
    qkv      (B, H, W, 3*C)  output of ``attn.qkv`` applied to ``norm1(x)`` on the *unpadded*
                             (B, H, W, dim) map; channel layout [q | k | v], each C = heads*hd
                             with head h at channels h*hd:(h+1)*hd (the checkpoint's layout).
    qkv_bias (3*C,)          ``attn.qkv.bias`` (or None when the projection has no bias).
    window   int             the block's ``window_size``; 0 means global attention.
    q_pool   bool            True for the q-pooled block at a stage transition (2x2 max pool).
Returns (B, H', W', C) in qkv's dtype, the attention output before ``attn.proj``
(H' = H // 2 when q_pool else H).

Semantics reproduced (the reference partitions the zero-padded *input* and projects it):
  * ragged windows are zero-padded before the qkv projection, so a padded token's q/k/v
    equal the projection bias; padded keys are NOT masked and take part in the softmax.
    The kernel synthesises them from ``qkv_bias`` instead of materialising a padded map.
  * with q pooling the queries are 2x2-max-pooled inside each window of side ``window``,
    giving query windows of side ``window // 2`` over the pooled map; keys/values keep
    the full window. Because window origins are even, pooling per window equals pooling
    the whole map, so the kernel pools on load.
  * global attention (window 0): one window covering the whole map, no padding.

Precision: scores, softmax and the accumulator are fp32; P is cast to the value dtype for
the second matmul (flash-attention practice). fp32 inputs use ``input_precision="ieee"``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import LaunchConfig, MIN_DOT_TILE, card, check_dtype, dot_precision, next_pow2, raise_if

# Hiera pools queries with a (2, 2) max pool (``q_stride``); nothing else is supported.
Q_POOL_STRIDE = 2
# Largest head dim the kernel takes (Hiera uses 56, 72, 96): D0 = 64 plus D1 <= 64.
MAX_HEAD_DIM = 128


@triton.jit
def _load_q(base, qy, qx, s_qkv_h, s_qkv_w, offs_d, q_ok, pool, HEAD_DIM: tl.constexpr,
            BLOCK_M: tl.constexpr, WIDTH: tl.constexpr, dtype: tl.constexpr):
    """Query rows (BLOCK_M, WIDTH) of channels ``offs_d`` (2x2 max-pooled on load when pool)."""
    q_mask = q_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    if pool:
        q = tl.full([BLOCK_M, WIDTH], float("-inf"), dtype)
        for t in tl.static_range(4):
            py = 2 * qy + t // 2
            px = 2 * qx + t % 2
            ptr = base + py[:, None] * s_qkv_h + px[:, None] * s_qkv_w + offs_d[None, :]
            q = tl.maximum(q, tl.load(ptr, mask=q_mask, other=float("-inf")))
        # (bf16 where() with a python float would promote to fp32: cast back)
        q = tl.where(q_mask, q, 0.0).to(dtype)
    else:
        ptr = base + qy[:, None] * s_qkv_h + qx[:, None] * s_qkv_w + offs_d[None, :]
        q = tl.load(ptr, mask=q_mask, other=0.0)
    return q


@triton.jit
def _load_kv(ptr, kv_off, in_map, is_pad, bias, d_ok):
    """Keys or values of one block; a padded token's row is the projection bias."""
    x = tl.load(ptr + kv_off, mask=in_map[:, None] & d_ok[None, :], other=0.0)
    return tl.where(is_pad[:, None], bias[None, :], x)


# Map and window geometry, window counts and heads are not specialised: Triton would compile
# a variant per value class (==1: global blocks have n_win 1, tiny's first stage 1 head;
# %16: 64x64 maps vs 63x63...), and none of them feeds a vector access: they bound masks and
# split program ids. Without them the global and the 14x14-window blocks of a stage share one
# variant (AOT, 8 configs at 1024 px: 21 -> 15 compiled variants per dtype and target).
# Kept specialised: the strides and C (a multiple of 16 puts the k/v channel blocks on
# 16-byte boundaries, so their loads are 16-byte vectors) and ``pool`` (its 1 is a real
# second code path).
@triton.jit(do_not_specialize=["H", "W", "HQ", "WQ", "WKH", "WKW", "WQH", "WQW", "n_win_x", "n_win",
                               "num_heads"])
def _window_attn_kernel(
    qkv_ptr, bias_ptr, out_ptr,
    s_qkv_b, s_qkv_h, s_qkv_w,      # qkv strides (channel stride is 1)
    s_out_b, s_out_h, s_out_w,      # out strides (channel stride is 1)
    H, W,                           # key map size
    HQ, WQ,                         # query / output map size
    WKH, WKW,                       # key window size (rows, cols)
    WQH, WQW,                       # query window size
    n_win_x, n_win, num_heads, C,
    qk_scale,                       # softmax scale * log2(e)
    pool,                           # 1: 2x2 max-pool the queries on load (runtime flag)
    HEAD_DIM: tl.constexpr,
    D0: tl.constexpr,               # head channels in the first tile (power of two, <= 64)
    D1: tl.constexpr,               # the rest, rounded up to a power of two >= 16 (0: none)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """The head dim is cut into D0 + D1 channels (96 = 64 + 32, 72 = 64 + 16, 56 -> 64) so
    the dots never pad it to the next power of two (72 -> 128 did 1.78x the work, 96 -> 128
    1.33x): scores are q0.k0 + q1.k1, and each part has its own accumulator."""
    pid_bwh = tl.program_id(0)  # batch x windows x heads: can exceed grid axis 1's 65,535
    pid_m = tl.program_id(1)
    head = pid_bwh % num_heads
    win = (pid_bwh // num_heads) % n_win
    b = pid_bwh // (num_heads * n_win)
    wy = win // n_win_x
    wx = win % n_win_x
    dtype = qkv_ptr.dtype.element_ty

    offs_d0 = tl.arange(0, D0)
    d_ok0 = offs_d0 < HEAD_DIM
    n_k = WKH * WKW
    base = qkv_ptr + b.to(tl.int64) * s_qkv_b + head * HEAD_DIM

    # ---- queries of this block: window-local index -> map position
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qy = wy * WQH + offs_m // WQW
    qx = wx * WQW + offs_m % WQW
    q_ok = (offs_m < WQH * WQW) & (qy < HQ) & (qx < WQ)  # padded query rows are never stored
    q0 = _load_q(base, qy, qx, s_qkv_h, s_qkv_w, offs_d0, q_ok, pool, HEAD_DIM, BLOCK_M, D0, dtype)
    # The launcher passes the bias in qkv's dtype (zeros when the projection has none).
    kb0 = tl.load(bias_ptr + C + head * HEAD_DIM + offs_d0, mask=d_ok0, other=0.0)
    vb0 = tl.load(bias_ptr + 2 * C + head * HEAD_DIM + offs_d0, mask=d_ok0, other=0.0)
    acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        d_ok1 = offs_d1 < HEAD_DIM
        q1 = _load_q(base, qy, qx, s_qkv_h, s_qkv_w, offs_d1, q_ok, pool, HEAD_DIM, BLOCK_M, D1, dtype)
        kb1 = tl.load(bias_ptr + C + head * HEAD_DIM + offs_d1, mask=d_ok1, other=0.0)
        vb1 = tl.load(bias_ptr + 2 * C + head * HEAD_DIM + offs_d1, mask=d_ok1, other=0.0)
        acc1 = tl.zeros([BLOCK_M, D1], tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, n_k, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        ky = wy * WKH + offs_n // WKW
        kx = wx * WKW + offs_n % WKW
        in_win = offs_n < n_k
        in_map = in_win & (ky < H) & (kx < W)
        is_pad = in_win & ~in_map  # zero-padded input token: its k, v are the bias
        row = ky[:, None] * s_qkv_h + kx[:, None] * s_qkv_w
        k0 = _load_kv(base + C, row + offs_d0[None, :], in_map, is_pad, kb0, d_ok0)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        if D1 > 0:
            k1 = _load_kv(base + C, row + offs_d1[None, :], in_map, is_pad, kb1, d_ok1)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PREC)
        s = tl.where(in_win[None, :], s * qk_scale, float("-inf"))  # (M, N) fp32, log2 units
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        v0 = _load_kv(base + 2 * C, row + offs_d0[None, :], in_map, is_pad, vb0, d_ok0)
        acc0 = acc0 * alpha[:, None] + tl.dot(p.to(dtype), v0, input_precision=DOT_PREC)
        if D1 > 0:
            v1 = _load_kv(base + 2 * C, row + offs_d1[None, :], in_map, is_pad, vb1, d_ok1)
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(dtype), v1, input_precision=DOT_PREC)

    o_row = out_ptr + b.to(tl.int64) * s_out_b + qy[:, None] * s_out_h + qx[:, None] * s_out_w + head * HEAD_DIM
    tl.store(o_row + offs_d0[None, :], (acc0 / l_i[:, None]).to(out_ptr.dtype.element_ty),
             mask=q_ok[:, None] & d_ok0[None, :])
    if D1 > 0:
        tl.store(o_row + offs_d1[None, :], (acc1 / l_i[:, None]).to(out_ptr.dtype.element_ty),
                 mask=q_ok[:, None] & d_ok1[None, :])


def head_split(head_dim: int) -> Tuple[int, int]:
    """(D0, D1): channels of the two dot tiles. D0 = min(64, next_pow2), D1 covers the rest
    rounded to a power of two >= 16 (tl.dot's smallest K), 0 when D0 holds the head."""
    d0 = min(64, max(next_pow2(head_dim), MIN_DOT_TILE))
    rest = head_dim - d0
    return d0, (0 if rest <= 0 else max(next_pow2(rest), MIN_DOT_TILE))


# ----------------------------------------------------------------------------- geometry


def window_geometry(h: int, w: int, window: int, q_pool: bool) -> dict:
    """Map and window sizes of one block: key map (h, w), query map, windows per side."""
    if q_pool:
        hq, wq = h // Q_POOL_STRIDE, w // Q_POOL_STRIDE
    else:
        hq, wq = h, w
    if window > 0:
        wk = (window, window)
        wqs = window // Q_POOL_STRIDE if q_pool else window
        wqw = (wqs, wqs)
    else:
        wk, wqw = (h, w), (hq, wq)
    n_y, n_x = -(-h // wk[0]), -(-w // wk[1])
    return dict(hq=hq, wq=wq, wk=wk, wqw=wqw, n_win_y=n_y, n_win_x=n_x)


def shape_reason(qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], num_heads: int,
                 window: int, q_pool: bool) -> Optional[str]:
    """Why these shapes describe no valid Hiera block (None when they do)."""
    if qkv.dim() != 4:
        return f"qkv must be (B, H, W, 3*C), got shape {tuple(qkv.shape)}"
    b, h, w, c3 = qkv.shape
    if c3 % 3 or (c3 // 3) % num_heads:
        return f"last dim {c3} is not 3 * num_heads({num_heads}) * head_dim"
    if (c3 // 3) // num_heads > MAX_HEAD_DIM:
        return f"head dim {(c3 // 3) // num_heads} exceeds MAX_HEAD_DIM={MAX_HEAD_DIM}"
    if window < 0:
        return f"window must be >= 0 (0 = global), got {window}"
    if min(b, h, w) == 0:
        return "empty input"
    if q_pool and window > 0 and window % Q_POOL_STRIDE:
        return f"q pooling needs a window divisible by {Q_POOL_STRIDE}, got {window}"
    if q_pool and window > 0 and (h % Q_POOL_STRIDE or w % Q_POOL_STRIDE):
        # The reference's un-partition of pooled windows is only consistent for even maps.
        return f"q pooling of windows needs an even map, got {h}x{w}"
    if q_pool and min(h, w) < Q_POOL_STRIDE:
        return f"map {h}x{w} too small for {Q_POOL_STRIDE}x{Q_POOL_STRIDE} pooling"
    if qkv_bias is not None and (qkv_bias.shape != (c3,) or qkv_bias.device != qkv.device):
        return f"qkv_bias must be ({c3},) on {qkv.device}, got {tuple(qkv_bias.shape)}"
    return None


def unsupported_reason(qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], num_heads: int,
                       window: int, q_pool: bool) -> Optional[str]:
    """Why these inputs cannot go through the kernel (None when they can)."""
    reason = shape_reason(qkv, qkv_bias, num_heads, window, q_pool) or check_dtype("qkv", qkv)
    if reason is None and qkv.is_cuda and qkv.dtype == torch.float32:
        # ieee fp32 dots use no tensor cores and spill (issue 8): SDPA is faster on every card
        reason = "fp32 on CUDA goes to SDPA (the kernel's fp32 dot has no tensor cores)"
    if reason is None and qkv.stride(-1) != 1:
        reason = "qkv channels must be contiguous (stride(-1) == 1)"
    return reason


def output_shape(qkv: torch.Tensor, window: int, q_pool: bool) -> Tuple[int, int, int, int]:
    b, h, w, c3 = qkv.shape
    g = window_geometry(h, w, window, q_pool)
    return (b, g["hq"], g["wq"], c3 // 3)


# ----------------------------------------------------------------------------- launcher


def pick_config(n_q: int, head_dim: int, dtype: torch.dtype, capability: tuple = (9, 0)) -> LaunchConfig:
    """Block sizes for one window of n_q queries on a card (every choice is in all_configs).

    BLOCK_M: the window's queries rounded up to a power of two (>= 16), at most 128 (64 for
    fp32 / wide heads, twice the registers); 8 warps at 128 rows. BLOCK_N 64, except on
    sm_8x for head dims that need the second channel tile (D1 > 0: Hiera's 72 and 96): there
    the 64-key tiles ran out of the 255 registers (ptxas, triton 3.8: 4-72 B of spills at
    BLOCK_M 16-128, 255 registers), while 32-key tiles compile spill-free with mma.sync at
    176-183 registers for 72 and 255 (no spill) for 96, under triton 3.6's ptxas too. It also
    wastes fewer keys on 14x14 windows (196 keys: 224 loaded instead of 256). sm_90 keeps 64
    (wgmma, 175-250 registers, no spills).
    """
    wide = dtype == torch.float32 or next_pow2(head_dim) > 128
    cap = 64 if wide else 128  # fp32 / wide tiles need twice the registers and smem
    block_m = min(max(next_pow2(n_q), MIN_DOT_TILE), cap)
    narrow_keys = wide or (capability[0] < 9 and head_split(head_dim)[1] > 0)
    block_n = 32 if narrow_keys else 64
    return LaunchConfig(block_m, block_n, 4 if block_m <= 64 else 8, 2)


# Query-window sizes of SAM 2's Hiera blocks: pooled 2x2 / 4x4, 7x7 / 8x8, 14x14, global.
HIERA_WINDOW_QUERIES = (4, 16, 49, 64, 196, 4096)
# Capabilities whose tile choice differs (sm_86/89 take sm_80's: same rule).
CAPABILITIES = ((8, 0), (9, 0))


def all_configs(head_dims, dtypes=(torch.float16, torch.bfloat16),
                n_queries=HIERA_WINDOW_QUERIES, capabilities=CAPABILITIES):
    """Every (dtype, constexprs, LaunchConfig, capability) the launcher picks on a GPU for
    these head dims and window query counts (q pooling and the bias are runtime arguments,
    not variants). fp32 runs only under the interpreter (tests): on CUDA it is declined."""
    out = []
    for cap in capabilities:
        for dt in dtypes:
            for hd in head_dims:
                for n_q in n_queries:
                    cfg = pick_config(n_q, hd, dt, cap)
                    d0, d1 = head_split(hd)
                    item = (dt, dict(HEAD_DIM=hd, D0=d0, D1=d1, BLOCK_M=cfg.block_m,
                                     BLOCK_N=cfg.block_n, DOT_PREC=dot_precision(dt)), cfg, cap)
                    if item not in out:
                        out.append(item)
    return out


# CUDA grid limits: axis 0 up to 2^31 - 1, axes 1 and 2 up to 65,535.
MAX_GRID = (2**31 - 1, 65535, 65535)


def launch_grid(batch: int, n_win: int, num_heads: int, n_q: int, cfg: LaunchConfig) -> Tuple[int, int]:
    """(batch x windows x heads, query blocks): the large product on axis 0. On axis 1 it
    failed for set_image_batch of 16 images on tiny (stage-2 entry: 1,024 windows x 2 heads x
    32 = 65,536 > 65,535) and 8 on large (issue 8, item 5)."""
    grid = (batch * n_win * num_heads, triton.cdiv(n_q, cfg.block_m))
    if any(g > m for g, m in zip(grid, MAX_GRID)):
        raise ValueError(f"window_attention: launch grid {grid} exceeds the CUDA limits {MAX_GRID[:2]}")
    return grid


def window_attention_triton(qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], num_heads: int,
                            window: int, q_pool: bool,
                            out: Optional[torch.Tensor] = None, check: bool = True) -> torch.Tensor:
    """Launch the kernel (see the module docstring for the tensors). ``out`` may be given.
    ``check=False``: the caller has just run ``unsupported_reason`` (the selection layer)."""
    if check:
        raise_if(unsupported_reason(qkv, qkv_bias, num_heads, window, q_pool), "window_attention")
    b, h, w, c3 = qkv.shape
    c = c3 // 3
    hd = c // num_heads
    g = window_geometry(h, w, window, q_pool)
    shape = (b, g["hq"], g["wq"], c)
    if out is None:
        out = torch.empty(shape, device=qkv.device, dtype=qkv.dtype)
    elif tuple(out.shape) != shape or out.dtype != qkv.dtype or out.stride(-1) != 1:
        raise ValueError(f"window_attention: out must be {shape} {qkv.dtype} with unit channel stride")
    n_q = g["wqw"][0] * g["wqw"][1]
    n_win = g["n_win_y"] * g["n_win_x"]
    cfg = pick_config(n_q, hd, qkv.dtype, card(qkv.device).capability)
    grid = launch_grid(b, n_win, num_heads, n_q, cfg)
    # A padded token's k/v is the bias rounded to qkv's dtype (what the projection outputs).
    bias = qkv_bias.to(qkv.dtype) if qkv_bias is not None else qkv.new_zeros(c3)
    _window_attn_kernel[grid](
        qkv, bias, out,
        qkv.stride(0), qkv.stride(1), qkv.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, w, g["hq"], g["wq"], g["wk"][0], g["wk"][1], g["wqw"][0], g["wqw"][1],
        g["n_win_x"], n_win, num_heads, c,
        (1.0 / math.sqrt(hd)) * 1.4426950408889634, int(q_pool),
        HEAD_DIM=hd, D0=head_split(hd)[0], D1=head_split(hd)[1], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        DOT_PREC=dot_precision(qkv.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


# ----------------------------------------------------------------------------- reference


def window_attention_reference(qkv: torch.Tensor, qkv_bias: Optional[torch.Tensor], num_heads: int,
                               window: int, q_pool: bool) -> torch.Tensor:
    """PyTorch path: pad with the bias, split windows, pool q, SDPA, stitch, crop."""
    raise_if(shape_reason(qkv, qkv_bias, num_heads, window, q_pool), "window_attention")
    b, h, w, c3 = qkv.shape
    c = c3 // 3
    g = window_geometry(h, w, window, q_pool)
    (kh, kw), (qh, qw) = g["wk"], g["wqw"]
    ny, nx = g["n_win_y"], g["n_win_x"]
    hp, wp = ny * kh, nx * kw
    if (hp, wp) != (h, w):
        # A zero input token projects to the bias: fill the padding with it.
        fill = qkv_bias if qkv_bias is not None else qkv.new_zeros(c3)
        grid = fill.to(qkv.dtype).expand(b, hp, wp, c3).clone()
        grid[:, :h, :w] = qkv
    else:
        grid = qkv
    # (B, ny, kh, nx, kw, 3, heads, hd) -> (B*ny*nx, heads, kh, kw, 3, hd)
    tiles = grid.reshape(b, ny, kh, nx, kw, 3, num_heads, c // num_heads)
    tiles = tiles.permute(0, 1, 3, 6, 2, 4, 5, 7).reshape(b * ny * nx, num_heads, kh, kw, 3, -1)
    q, k, v = tiles.unbind(4)  # each (nW, heads, kh, kw, hd)
    if q_pool:
        nwh = q.shape[0] * num_heads
        q = q.reshape(nwh, kh, kw, -1).permute(0, 3, 1, 2)
        q = F.max_pool2d(q, Q_POOL_STRIDE, Q_POOL_STRIDE).permute(0, 2, 3, 1)
        q = q.reshape(-1, num_heads, q.shape[1], q.shape[2], q.shape[3])
    att = F.scaled_dot_product_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3))
    # (nW, heads, qh*qw, hd) -> (B, ny*qh, nx*qw, C), then crop the padding.
    att = att.reshape(b, ny, nx, num_heads, qh, qw, -1).permute(0, 1, 4, 2, 5, 3, 6)
    att = att.reshape(b, ny * qh, nx * qw, c)
    return att[:, : g["hq"], : g["wq"]]
