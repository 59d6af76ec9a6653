"""Memory cross-attention in the memory's own (64-d) value space.

In a cross-attention layer the values are ``v = W_v m + b_v`` with ``m`` the raw memory
tokens (``kv_in_dim`` = 64 channels: spatial memories and object-pointer tokens alike) and
the heads 256 wide. Softmax rows sum to one, so per head h

    softmax(S_h) V_h = (softmax(S_h) M) W_v,hᵀ + b_v,h

and with the output projection after it

    out = concat_h(softmax(S_h) M) W_fᵀ + b_f,  W_f[:, h] = W_o[:, h] W_v,h,  b_f = W_o b_v + b_o.

Attention then reads 64-d values instead of 256-d ones (PV work / 4), no value projection
of the memory is computed at all, and the output projection is 64 -> 256 instead of
256 -> 256. Exact up to rounding; it holds only while attention rows sum to one, i.e. not
under attention dropout (training), where the plain path runs.

``W_f``, ``b_f`` are derived from the official parameters on every call (the state dict is
untouched): a (256x256)·(256x64) product, 0.06 ms on this CPU, < 0.1% of a 512 px frame.
Recomputing rather than caching means they can never go stale (``load_state_dict``,
``.to()``, in-place edits through ``.data`` that bump no version counter), gradients reach
``W_v``/``W_o`` when training, and a captured CUDA graph re-derives them from the live
parameters on every replay. The one exception is eager inference under autocast
(:func:`autocast_fused_value_output`, the runtime's bf16 path): there the derivation is 4
small kernels plus 2 casts per layer (24 of a tiny frame's ~1000 launches; an eager GPU
frame is launch bound), so the low-precision product is kept, keyed on the four
parameters' version counters and storage, like ``runtime/weight_cache.py`` keeps the bf16
weights (an edit through ``.data`` is not seen there).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sam2_fast.modeling import kernel_gate

# Rows of queries per CPU chunk are chosen so that one chunk's score matrix holds about
# this many fp32 elements (16 MiB): measured best on this 2-core CPU at 512 px
# (512 queries x 7232 keys, 30.8 ms vs 33.9 for 256 rows and 42.7 for SDPA's math path).
_CPU_CHUNK_ELEMS = 1 << 22


def _no_autocast(device: torch.device):
    # the fused matrix is derived in fp32 even under autocast (a bf16 product would round
    # W_o W_v once more than the reference ever does); the caller's linear casts it later
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def fused_value_output(v_proj: nn.Linear, out_proj: nn.Linear, num_heads: int) -> Tuple[Tensor, Optional[Tensor]]:
    """(W_f (C, heads*kv_in), b_f (C,) or None): the value projection folded into ``out_proj``.

    ``v_proj``: kv_in -> heads*D; ``out_proj``: heads*D -> C. Computed in fp32 (or wider) and
    returned in ``out_proj``'s dtype.
    """
    w_v, w_o = v_proj.weight, out_proj.weight  # (heads*D, kv_in), (C, heads*D)
    c, inner = w_o.shape
    kv_in, d = w_v.shape[1], inner // num_heads
    work = torch.promote_types(w_o.dtype, torch.float32)  # fp32 at least (fp64 stays fp64)
    with _no_autocast(w_o.device):
        wo = w_o.to(work).view(c, num_heads, d).transpose(0, 1)  # (heads, C, D)
        wf = torch.matmul(wo, w_v.to(work).view(num_heads, d, kv_in))  # (heads, C, kv_in)
        wf = wf.transpose(0, 1).reshape(c, num_heads * kv_in)  # (C, heads*kv_in), head-major columns
        bias = None
        if v_proj.bias is not None:
            bias = torch.mv(w_o.to(work), v_proj.bias.to(work))  # (C,)
        if out_proj.bias is not None:
            bias = out_proj.bias.to(work) if bias is None else bias + out_proj.bias.to(work)
    return wf.to(w_o.dtype), (None if bias is None else bias.to(w_o.dtype))


def autocast_fused_value_output(v_proj: nn.Linear, out_proj: nn.Linear, num_heads: int,
                                holder: nn.Module) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`fused_value_output`, and under autocast its cast to the autocast dtype, which
    is exactly what ``F.linear`` would cast it to; kept on ``holder`` in eager inference
    under autocast (see the module docstring), recomputed everywhere else."""
    dev = out_proj.weight.device.type
    params = (v_proj.weight, v_proj.bias, out_proj.weight, out_proj.bias)
    if (not torch.is_autocast_enabled(dev) or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params))
            or any(p is not None and p.is_inference() for p in params)
            or (dev == "cuda" and torch.cuda.is_current_stream_capturing())):
        return fused_value_output(v_proj, out_proj, num_heads)
    lowp = torch.get_autocast_dtype(dev)
    key = (lowp, num_heads) + tuple(None if p is None else (p._version, p.data_ptr(), p.dtype, p.device)
                                    for p in params)
    hit = holder.__dict__.get("_fused_value_output")
    if hit is None or hit[0] != key:
        with torch.inference_mode(False), torch.no_grad():  # normal tensors, usable anywhere
            w, b = fused_value_output(v_proj, out_proj, num_heads)
            cast = (lambda t: t.to(lowp) if t is not None and t.dtype == torch.float32 else t)
            hit = (key, cast(w), cast(b))
        holder.__dict__["_fused_value_output"] = hit
    return hit[1], hit[2]


def attend_value_space(q_rot: Tensor, k_rot: Tensor, v_small: Tensor,
                       key_mask: Optional[Tensor] = None, key_ranges: Optional[Tensor] = None) -> Tensor:
    """softmax(q kᵀ / sqrt(Dqk)) v over raw (unprojected) values: the routing point.

    q_rot (B, Nq, Dqk) and k_rot (B, Nk, Dqk): projected and rotated; v_small (B, Nk, Dv);
    key_mask: None, (Nk,) or (B, Nk) bool, True where a key takes part; key_ranges: None or
    (B, 4) int32, the same valid keys as two ranges [r0, r1) and [r2, r3) (the static bank
    gives both). Returns (B, Nq, Dv).

    Where the memory-attention kernels are enabled (CUDA by default) the call goes to the
    dispatcher, whose selection layer runs our value-space Triton kernel or an SDPA backend,
    whichever measured fastest on this card (a masked call needs ``key_ranges`` for that).
    fp32 CPU inference takes the query-chunked product below: PyTorch's CPU flash kernel
    refuses Dv != Dqk and SDPA falls back to its math path (42.7 vs 30.8 ms at 512 px, 1024 x
    7232 keys, measured). Elsewhere SDPA, through the (B, 1, N, D) layout: its fused CUDA
    backends refuse 3-D inputs and would silently leave the math backend (measured on an
    H200: 4.1 ms instead of 0.16-0.27 for this shape).
    """
    needs_grad = torch.is_grad_enabled() and (q_rot.requires_grad or k_rot.requires_grad or v_small.requires_grad)
    if (not needs_grad and (key_mask is None or key_ranges is not None)
            and kernel_gate.kernel_enabled("memory_attention", q_rot.device.type)):
        ranges = None if key_mask is None else key_ranges
        return kernel_gate.dispatch().memory_attention_vspace(q_rot, k_rot, v_small, ranges)
    mask = None
    if key_mask is not None:
        mask = key_mask.view(-1, 1, key_mask.shape[-1])  # (1 or B, 1, Nk): broadcast over queries
    if (q_rot.device.type == "cpu" and q_rot.dtype == torch.float32 and v_small.shape[-1] != q_rot.shape[-1]
            and not torch.compiler.is_compiling() and not needs_grad):
        return _chunked_attention_cpu(q_rot, k_rot, v_small, mask)
    mask4 = None if mask is None else mask.unsqueeze(1)  # (1|B, 1, 1, Nk)
    return F.scaled_dot_product_attention(q_rot.unsqueeze(1), k_rot.unsqueeze(1), v_small.unsqueeze(1),
                                          attn_mask=mask4).squeeze(1)


def _chunked_attention_cpu(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Inference-only exact attention, a block of query rows at a time (scores stay in cache).

    q (B, Nq, D), k (B, Nk, D), v (B, Nk, Dv), mask None or (1|B, 1, Nk) bool -> (B, Nq, Dv).
    """
    b, nq, d = q.shape
    nk = k.shape[1]
    q = q * (1.0 / math.sqrt(d))  # (B, Nq, D): scaling the small side
    kt = k.transpose(1, 2)  # (B, D, Nk)
    bias = None
    if mask is not None:  # additive: 0 where valid, -inf where padded (as SDPA's boolean mask)
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    out = q.new_empty(b, nq, v.shape[-1])
    rows = max(1, min(nq, _CPU_CHUNK_ELEMS // max(1, b * nk)))
    for i in range(0, nq, rows):
        qi = q[:, i:i + rows]
        s = torch.bmm(qi, kt) if bias is None else torch.baddbmm(bias, qi, kt)  # (B, rows, Nk)
        torch.softmax(s, dim=-1, out=s)
        torch.bmm(s, v, out=out[:, i:i + rows])
    return out
