"""Hiera trunk of the SAM 2 image encoder (hierarchical ViT with windowed attention).

Layout: every block works on channels-last maps (B, H, W, C). Four stages; at each stage
transition the first block of the new stage widens the channels (``dim_mul``), doubles the
heads (``head_mul``) and, for the first ``q_pool`` transitions, max-pools its *queries* by
``q_stride`` so the map shrinks while keys/values keep the full resolution.

Exactness notes (the official checkpoints were trained with these rules, we keep them):
* A windowed block pads the normalised map with zeros up to a multiple of the window. The
  padded tokens are NOT masked: they go through the qkv projection (so they carry the qkv
  bias) and take part in every softmax of their window.
* The transition block still uses the window size of the *previous* stage; its pooled
  queries live on a window of ``window // stride``.
* The input positional embedding is a bicubic resize of a background table plus a tiled
  window table of side ``window_spec[0]``.

State-dict keys match the official ``Hiera``: ``patch_embed.proj``, ``pos_embed``,
``pos_embed_window``, ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.layers.{0,1}, proj}``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import HieraConfig
from . import kernel_gate
from .common import MLP

_LN_EPS = 1e-6


def hiera_attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The attention of one Hiera block over all its windows at once (the kernel hook).

    The PyTorch path of a Hiera block's attention. Where the window-attention Triton kernel
    is enabled (``kernel_gate.kernel_enabled``), ``MultiScaleAttention``
    hands the whole block (partition, padding, q pooling, attention, un-partition) to the
    ``window_attention`` dispatcher instead and this function is not called.

    Args:
        q: (N, heads, Lq, D) queries. ``N = B * num_windows`` (``N = B`` for a global block,
           whose single "window" is the whole map). ``Lq = wq * wq`` where ``wq`` is the
           window side, or ``window // q_stride`` in a q-pooling block (then ``Lq = Lk / 4``).
           For a global block ``Lq = H * W`` (``(H//2) * (W//2)`` if it pools).
        k, v: (N, heads, Lk, D) keys / values, ``Lk = window * window`` (``H * W`` global).
        None of the three is contiguous; each is a ``transpose(1, 2)`` view with last stride 1:
           k, v (and q of a plain block) view the qkv projection, memory (N, Lk, 3, heads, D),
           strides (Lk*3*C, D, 3*C, 1) with C = heads*D; q of a q-pooling block views the
           pooled tensor, memory (N, Lq, heads, D), strides (Lq*C, D, C, 1).
        All three share dtype and device. Row ``i`` of a window is token (i // w, i % w) of
        that window, row-major. Tokens that pad a ragged window are ordinary rows here (they
        hold the qkv bias) and MUST be attended to: no mask, no causal structure.
        Head dim D: 96 (tiny/small), 56 (base_plus), 72 (large). Lk is 64, 16, 196 or 49
        (tiny/small/base_plus windows 8, 4, 14, 7), 64, 16, 256 or 64 (large: 8, 4, 16, 8),
        or H*W of a global block (4096 at image size 1024).

    Returns:
        (N, heads, Lq, D): ``softmax(q @ k^T / sqrt(D)) @ v`` for every window and head.
    """
    return F.scaled_dot_product_attention(q, k, v)


# ----------------------------------------------------------------------------- windows
def split_windows(x: torch.Tensor, win: int, fill: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(B, H, W, C) -> (B * nh * nw, win, win, C) and the window grid (nh, nw).

    The map is padded at the bottom/right up to a multiple of ``win``: with zeros, or with
    the per-channel vector ``fill`` (C,).
    """
    b, h, w, c = x.shape
    extra_h, extra_w = -h % win, -w % win
    if extra_h or extra_w:
        if fill is None:
            x = F.pad(x, (0, 0, 0, extra_w, 0, extra_h))
        else:
            padded = x.new_empty(b, h + extra_h, w + extra_w, c)
            padded[:, :h, :w] = x
            padded[:, h:] = fill
            padded[:, :h, w:] = fill
            x = padded
    nh, nw = (h + extra_h) // win, (w + extra_w) // win
    grid = x.view(b, nh, win, nw, win, c).transpose(2, 3)  # (B, nh, nw, win, win, C)
    return grid.reshape(b * nh * nw, win, win, c), (nh, nw)


def merge_windows(windows: torch.Tensor, grid: Tuple[int, int], out_hw: Tuple[int, int]) -> torch.Tensor:
    """Inverse of ``split_windows``: (B * nh * nw, win, win, C) -> (B, H, W, C) cropped to ``out_hw``."""
    nh, nw = grid
    n, win, _, c = windows.shape
    b = n // (nh * nw)
    full = windows.view(b, nh, nw, win, win, c).transpose(2, 3)  # (B, nh, win, nw, win, C)
    full = full.reshape(b, nh * win, nw * win, c)
    h, w = out_hw
    if full.shape[1] != h or full.shape[2] != w:
        full = full[:, :h, :w, :]
    return full


def max_pool_hw(x: torch.Tensor, stride: Tuple[int, int]) -> torch.Tensor:
    """Max-pool the two spatial dims of (N, H, W, *rest) with kernel == stride (floor mode).

    ``F.max_pool2d`` on a channels-last permuted view (no copy: the pooled dims of every
    caller's layout have a contiguous channel block), bitwise equal to a reshape + ``amax``
    over the strided window dims but ~20x faster on CPU (measured 0.19 vs 5.0 ms for a
    (1, 128, 128, 96) map; ~29 ms per frame at 256 px before).
    """
    sh, sw = stride
    n, h, w = x.shape[:3]
    rest = x.shape[3:]
    ho, wo = h // sh, w // sw
    if ho == 0 or wo == 0:  # max_pool2d refuses an empty output; floor mode gives one
        return x.new_empty((n, ho, wo, *rest))
    chans = x.reshape(n, h, w, -1)  # (N, H, W, C): a view for contiguous trailing dims
    pooled = F.max_pool2d(chans.permute(0, 3, 1, 2), kernel_size=(sh, sw), stride=(sh, sw))
    return pooled.permute(0, 2, 3, 1).reshape(n, ho, wo, *rest)  # (N, ho, wo, *rest)


def _project_real_tokens_only(device_type: str) -> bool:
    """Ragged windowed blocks: project the real tokens and fill the padding with the qkv bias
    (True), or zero-pad the map and project every token, as the reference does (False).

    The one device choice of this file. CPU: the fill saves the padded tokens' GEMM work,
    -35 ms per frame at 512 px (commit 8bbfdfc). CUDA: the GEMM work is microseconds, but
    the fill costs 3 copy kernels (bottom strip, right strip, interior) against one pad,
    and an eager GPU frame is launch bound: 5 ragged blocks of tiny at 1024 px (and at
    128/256 px) are 10 launches more than the reference (``benchmarks/op_census.py``).
    Both are bitwise equal (tests/test_image_encoder.py).
    """
    return device_type != "cuda"


# ----------------------------------------------------------------------------- blocks
# The fused kernel pools queries 2x2 only (Hiera's q_stride in every official config).
_KERNEL_Q_STRIDE = (2, 2)


class MultiScaleAttention(nn.Module):
    """Multi-head attention of one block, windowed or global, with optional query pooling.

    Parameters ``qkv`` (dim -> 3*dim_out) and ``proj`` (dim_out -> dim_out).
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, window: int,
                 q_stride: Optional[Tuple[int, int]] = None) -> None:
        super().__init__()
        if dim_out % num_heads != 0:
            raise ValueError(f"Hiera attention width {dim_out} is not divisible by {num_heads} heads")
        self.dim_out, self.num_heads = dim_out, num_heads
        self.window = window  # 0 = global attention
        self.q_stride = q_stride
        self.qkv = nn.Linear(dim, 3 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)

    def _fused_kernel_ok(self, x: torch.Tensor) -> bool:
        """Hand the block to the window-attention dispatcher only when its Triton kernel runs
        (so that elsewhere this module's PyTorch path, and its numerics, stay as they are)."""
        if self.q_stride is not None and tuple(self.q_stride) != _KERNEL_Q_STRIDE:
            return False
        return kernel_gate.kernel_enabled("window_attention", x.device.type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, dim) normalised map -> (B, H', W', dim_out); H' = H // stride when pooling."""
        if self._fused_kernel_ok(x):
            # partition, padding, q pooling and un-partition happen inside the kernel
            kernels = kernel_gate.dispatch()
            qkv = self.qkv(x)  # (B, H, W, 3*dim_out) on the unpadded map
            pool = self.q_stride is not None
            if kernels.window_attention_reason(qkv, self.qkv.bias, self.num_heads, self.window,
                                               pool) is None:
                out = kernels.window_attention(qkv, self.qkv.bias, self.num_heads, self.window,
                                               pool)  # (B, H', W', dim_out)
                return self.proj(out)
            # declined (reason counted by the dispatcher): the PyTorch path below
        b, h, w, _ = x.shape
        heads, d = self.num_heads, self.dim_out // self.num_heads
        if (self.window > 0 and (h % self.window or w % self.window) and self.qkv.bias is not None
                and _project_real_tokens_only(x.device.type)):
            # Ragged map: a zero-padded token projects to exactly the qkv bias, so project
            # the real tokens only and pad the projection with the bias (as the window
            # kernel does). At 512 px stage 3 is 32x32 in 14-windows (42x42 padded): 42% of
            # the projection work was padding; measured ~2% of a tracked frame on CPU.
            wins, grid = split_windows(self.qkv(x), self.window, fill=self.qkv.bias)  # (N, win, win, 3*dim_out)
        elif self.window > 0:
            wins, grid = split_windows(x, self.window)  # (N, win, win, dim): whole windows
            wins = self.qkv(wins)
        else:
            wins, grid = self.qkv(x), (1, 1)  # the whole map is one window
        n, wh, ww, _ = wins.shape
        qkv = wins.view(n, wh, ww, 3, heads, d)  # padded tokens hold the bias
        q = qkv[:, :, :, 0]  # (N, wh, ww, heads, D)
        if self.q_stride is not None:
            q = max_pool_hw(q, self.q_stride)  # (N, wh//s, ww//s, heads, D), per window
        qh, qw = q.shape[1], q.shape[2]
        q = q.reshape(n, qh * qw, heads, d).transpose(1, 2)  # (N, heads, Lq, D)
        k = qkv[:, :, :, 1].reshape(n, wh * ww, heads, d).transpose(1, 2)  # (N, heads, Lk, D)
        v = qkv[:, :, :, 2].reshape(n, wh * ww, heads, d).transpose(1, 2)  # (N, heads, Lk, D)

        out = hiera_attention_core(q, k, v)  # (N, heads, Lq, D)
        out = out.transpose(1, 2).reshape(n, qh, qw, self.dim_out)  # (N, qh, qw, dim_out)

        if self.q_stride is not None:
            out_hw = (h // self.q_stride[0], w // self.q_stride[1])
        else:
            out_hw = (h, w)
        if self.window > 0:
            out = merge_windows(out, grid, out_hw)  # (B, H', W', dim_out), padding dropped
        # the projection is per token, so applying it after dropping the padding is exact
        return self.proj(out)


class MultiScaleBlock(nn.Module):
    """Pre-norm transformer block on (B, H, W, C) maps: attention + GELU MLP (ratio 4)."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, window: int,
                 q_stride: Optional[Tuple[int, int]] = None, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.window, self.q_stride = window, q_stride
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, window, q_stride)
        self.norm2 = nn.LayerNorm(dim_out, eps=_LN_EPS)
        self.mlp = MLP(dim_out, int(dim_out * mlp_ratio), dim_out, num_layers=2, activation=nn.GELU)
        if dim != dim_out:
            # a widening block needs a projected (and pooled) residual path
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)  # (B, H, W, dim)
        if self.dim != self.dim_out:
            # the residual of a widening block is taken AFTER norm1 (official behaviour)
            residual = self.proj(y)  # (B, H, W, dim_out)
            if self.q_stride is not None:
                residual = max_pool_hw(residual, self.q_stride)  # (B, H', W', dim_out)
        else:
            residual = x
        x = residual + self.attn(y)  # (B, H', W', dim_out)
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------- trunk
class PatchEmbed(nn.Module):
    """7x7 stride-4 convolution: (B, 3, S, S) image -> (B, S/4, S/4, C) channels-last map."""

    def __init__(self, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def _block_plan(cfg: HieraConfig) -> List[dict]:
    """Per block: dim, dim_out, heads, window (0 = global) and q_stride, as the official trunk."""
    stage_of_block = [s for s, n in enumerate(cfg.stages) for _ in range(n)]
    first_of_stage = {sum(cfg.stages[:s]) for s in range(1, len(cfg.stages))}
    pooled = sorted(first_of_stage)[: cfg.q_pool]
    plan, dim, heads = [], cfg.embed_dim, cfg.num_heads
    for i, stage in enumerate(stage_of_block):
        dim_out = dim
        # a stage's first block still windows like the previous stage (it lags by one)
        window = cfg.window_spec[stage - 1 if i in first_of_stage else stage]
        if i in first_of_stage:
            dim_out = int(dim * cfg.dim_mul)
            heads = int(heads * cfg.head_mul)
        if i in cfg.global_att_blocks:
            window = 0
        plan.append(dict(dim=dim, dim_out=dim_out, num_heads=heads, window=window,
                         q_stride=tuple(cfg.q_stride) if i in pooled else None))
        dim = dim_out
    return plan


class Hiera(nn.Module):
    """Hiera trunk: (B, 3, S, S) -> one (B, C_i, S/(4*2^i), S/(4*2^i)) map per stage, highest res first."""

    def __init__(self, cfg: HieraConfig) -> None:
        super().__init__()
        if len(cfg.stages) != len(cfg.window_spec):
            raise ValueError(f"Hiera: {len(cfg.stages)} stages but {len(cfg.window_spec)} window sizes")
        if not 0 <= cfg.q_pool <= len(cfg.stages) - 1:
            raise ValueError(f"Hiera: q_pool={cfg.q_pool} must be in [0, {len(cfg.stages) - 1}]")
        self.cfg = cfg
        self.stage_ends = [sum(cfg.stages[: s + 1]) - 1 for s in range(len(cfg.stages))]
        self.patch_embed = PatchEmbed(cfg.embed_dim)
        # "windowed" positional embedding: a resized background table + a tiled window table
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.embed_dim, *cfg.window_pos_embed_bkg_spatial_size))
        win0 = cfg.window_spec[0]
        self.pos_embed_window = nn.Parameter(torch.zeros(1, cfg.embed_dim, win0, win0))
        self.blocks = nn.ModuleList(MultiScaleBlock(**spec) for spec in _block_plan(cfg))
        # output channels, lowest resolution first (the neck's ``backbone_channel_list`` order)
        self.channel_list = [self.blocks[i].dim_out for i in reversed(self.stage_ends)]

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """(1, h, w, C) embedding added to the patch map.

        A function of the weights and the map size only, so eager inference keeps the last
        one (bicubic resize + tile + add: ~30 ms per frame at 512 px on one CPU core, 2% of
        a tracked frame), keyed on both tables' version counters, storage, dtype and
        device: ``load_state_dict``, in-place updates and ``.to()`` all rebuild it (an edit
        through ``.data`` bumps no version counter and is not seen). Compiled code, CUDA
        graph capture (which records the computation itself), calls that need gradients and
        tables created under ``torch.inference_mode`` (no version counter) compute it inline.
        """
        win = self.pos_embed_window.shape[-1]
        if h % win or w % win:
            raise ValueError(
                f"Hiera: the patch map {h}x{w} must be a multiple of the first window ({win}); "
                f"use an image size that is a multiple of {4 * win}"
            )
        tables = (self.pos_embed, self.pos_embed_window)
        if not self._may_cache_position(tables):
            return self._position_embedding(h, w)
        key = (h, w) + tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tables)
        cached = self.__dict__.get("_pos_cache")
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable anywhere
                cached = (key, self._position_embedding(h, w).contiguous())
            self.__dict__["_pos_cache"] = cached
        return cached[1]

    @staticmethod
    def _may_cache_position(tables) -> bool:
        if torch.compiler.is_compiling():
            return False
        if torch.is_grad_enabled() and any(t.requires_grad for t in tables):
            return False
        if any(t.is_inference() for t in tables):  # built in inference mode: no version counter
            return False
        cuda = tables[0].device.type == "cuda"
        return not (cuda and torch.cuda.is_current_stream_capturing())

    def _position_embedding(self, h: int, w: int) -> torch.Tensor:
        win = self.pos_embed_window.shape[-1]
        background = F.interpolate(self.pos_embed, size=(h, w), mode="bicubic")  # (1, C, h, w)
        tiled = self.pos_embed_window.repeat(1, 1, h // win, w // win)  # (1, C, h, w)
        return (background + tiled).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self.patch_embed.proj.in_channels:
            raise ValueError(f"Hiera expects (B, 3, H, W) images, got shape {tuple(x.shape)}")
        x = self.patch_embed(x)  # (B, H/4, W/4, C0)
        x = x + self.position_embedding(x.shape[1], x.shape[2])
        feats: List[torch.Tensor] = []
        ends = set(self.stage_ends)
        for i, block in enumerate(self.blocks):
            x = block(x)  # (B, H_i, W_i, C_i)
            if i in ends:
                feats.append(x.permute(0, 3, 1, 2))  # (B, C_i, H_i, W_i)
        return feats
