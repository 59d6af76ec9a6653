"""Fused RoPE attention of the memory-attention layers (one head, split-KV).

Cross-attention to the memory bank — what the model passes (one ``RoPEAttention`` call):
    q         (B, Nq, D)          ``q_proj(tgt + query_pos)``, NOT rotated (RoPE in-kernel).
    mem_k     (B, S_max, HW, D)   per-slot ``k_proj(memory + pos)`` of each spatial memory,
                                  NOT rotated; HW == Nq (each memory frame covers the same
                                  feature grid as the queries, like ``rope_k_repeat``).
    mem_v     (B, S_max, HW, D)   per-slot ``v_proj(memory)``.
    slot_ids  (S,) int32/int64    which slots to attend (any order, S >= 0), on q's device;
                                  conditioning and non-conditioning frames alike.
    ptr_k, ptr_v (B, P, D) | None projected object-pointer tokens (P = 4 per pointer, 0..64),
                                  attended WITHOUT RoPE (``num_k_exclude_rope`` = P).
    rope_cos, rope_sin (Nq, D/2) fp32 from ``rope_tables`` (cached by the dispatcher).
Returns (B, Nq, D) in q's dtype, the attention output before ``out_proj``.

Self-attention (``rope_self_attention``) is the same kernel with one slot holding k/v.

RoPE (SAM 2's 2-D axial form): channels (2j, 2j+1) are one complex number; pairs j < D/4 turn
by x * f_j, pairs j >= D/4 by y * f_(j - D/4), f_j = theta^(-4j/D), position t -> (x, y) =
(t % end_x, t // end_x). The rotation runs in fp32 and is rounded back to the input dtype
before the matmul, as the reference does. The kernel loads even and odd channels as two
halves, so q.k = q_even.k_even + q_odd.k_odd and no interleave is ever materialised.

Split-KV: the key blocks (spatial slots first, then pointer tokens) are cut into
``num_splits`` ranges, one program per (query block, batch, range); each writes a partial
output normalised by its own sum plus its log2-sum-exp, and a second kernel merges them.
Softmax and accumulators are fp32; fp32 inputs use ``input_precision="ieee"``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import LaunchConfig, check_dtype, dot_precision, next_pow2, raise_if
from ._softmax import online_softmax_step
from .vspace_attention import _vspace_merge_kernel

LOG2E = 1.4426950408889634
# Head dims the kernel takes: powers of two (so that D/2 halves tile exactly).
# 256: memory attention; 32: the mask decoder's token self-attention. The kernel multiplies
# D/2-wide halves, and 16-bit tl.dot needs K >= 16, so D = 16 (the decoder's cross-attention)
# is excluded. Other dims fall back to PyTorch (each one is a compiled variant to check).
HEAD_DIMS = (32, 256)
# Programs to aim for per SM when choosing the number of KV splits.
PROGRAMS_PER_SM = 2
# A split should still stream at least this many key blocks (the merge pass costs one).
MIN_BLOCKS_PER_SPLIT = 4


@triton.jit
def _rotate(e, o, cos_ptr, sin_ptr, pos, pos_ok, HALF: tl.constexpr):
    """Turn the pairs (e + i*o) of rows at positions ``pos`` by the RoPE angles (fp32)."""
    offs = tl.arange(0, HALF)
    m = pos_ok[:, None]
    c = tl.load(cos_ptr + pos[:, None] * HALF + offs[None, :], mask=m, other=1.0)
    s = tl.load(sin_ptr + pos[:, None] * HALF + offs[None, :], mask=m, other=0.0)
    e32 = e.to(tl.float32)
    o32 = o.to(tl.float32)
    return (e32 * c - o32 * s).to(e.dtype), (e32 * s + o32 * c).to(e.dtype)


@triton.jit
def _online_update(qe, qo, ke, ko, v, key_ok, m_i, l_i, acc, qk_scale, DOT_PREC: tl.constexpr):
    """One key block of online softmax: returns the new (m, l, acc)."""
    s = tl.dot(qe, tl.trans(ke), input_precision=DOT_PREC)
    s = tl.dot(qo, tl.trans(ko), s, input_precision=DOT_PREC) * qk_scale
    s = tl.where(key_ok[None, :], s, float("-inf"))
    return online_softmax_step(s, v, m_i, l_i, acc, DOT_PREC)


@triton.jit
def _mem_attn_kernel(
    q_ptr, mk_ptr, mv_ptr, slot_ptr, pk_ptr, pv_ptr, cos_ptr, sin_ptr,
    out_ptr, part_ptr, lse_ptr,
    s_qb, s_qt, s_mb, s_ms, s_mt, s_pb, s_pt, s_ob, s_ot,
    Nq, HW, S, P, n_splits, qk_scale,
    rope_q, rope_k,                 # runtime flags (1/0): rotate queries / memory keys
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    HALF: tl.constexpr = D // 2
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Nq

    q_rows = q_ptr + b.to(tl.int64) * s_qb + offs_m[:, None] * s_qt + 2 * offs_h[None, :]
    qe = tl.load(q_rows, mask=m_ok[:, None], other=0.0)
    qo = tl.load(q_rows + 1, mask=m_ok[:, None], other=0.0)
    if rope_q:
        qe, qo = _rotate(qe, qo, cos_ptr, sin_ptr, offs_m, m_ok, HALF)

    # Key blocks: S slots of cdiv(HW, BLOCK_N) blocks each, then the pointer tokens.
    blk_per_slot = tl.cdiv(HW, BLOCK_N)
    n_sp = S * blk_per_slot
    n_all = n_sp + tl.cdiv(P, BLOCK_N)
    per_split = tl.cdiv(n_all, n_splits)
    kb0 = split * per_split
    kb1 = tl.minimum(kb0 + per_split, n_all)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    mem_b = b.to(tl.int64) * s_mb
    for kb in range(kb0, tl.minimum(kb1, n_sp)):
        slot = tl.load(slot_ptr + kb // blk_per_slot).to(tl.int64)
        tok = (kb % blk_per_slot) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = tok < HW
        row = mem_b + slot * s_ms + tok[:, None] * s_mt
        ke = tl.load(mk_ptr + row + 2 * offs_h[None, :], mask=ok[:, None], other=0.0)
        ko = tl.load(mk_ptr + row + 2 * offs_h[None, :] + 1, mask=ok[:, None], other=0.0)
        v = tl.load(mv_ptr + row + offs_d[None, :], mask=ok[:, None], other=0.0)
        if rope_k:
            ke, ko = _rotate(ke, ko, cos_ptr, sin_ptr, tok, ok, HALF)
        m_i, l_i, acc = _online_update(qe, qo, ke, ko, v, ok, m_i, l_i, acc, qk_scale, DOT_PREC)
    ptr_b = b.to(tl.int64) * s_pb
    for kb in range(tl.maximum(kb0, n_sp), kb1):
        tok = (kb - n_sp) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = tok < P
        row = ptr_b + tok[:, None] * s_pt
        ke = tl.load(pk_ptr + row + 2 * offs_h[None, :], mask=ok[:, None], other=0.0)
        ko = tl.load(pk_ptr + row + 2 * offs_h[None, :] + 1, mask=ok[:, None], other=0.0)
        v = tl.load(pv_ptr + row + offs_d[None, :], mask=ok[:, None], other=0.0)
        m_i, l_i, acc = _online_update(qe, qo, ke, ko, v, ok, m_i, l_i, acc, qk_scale, DOT_PREC)

    has = l_i > 0.0  # a split can own no key block at all
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if n_splits > 1:
        row = (split * tl.num_programs(1) + b).to(tl.int64) * Nq + offs_m
        tl.store(part_ptr + row[:, None] * D + offs_d[None, :], o, mask=m_ok[:, None])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=m_ok)
    else:
        o_ptr = out_ptr + b.to(tl.int64) * s_ob + offs_m[:, None] * s_ot + offs_d[None, :]
        tl.store(o_ptr, o.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])


# The split-KV merge is the value-space kernel's (same partial/lse layout, any power-of-two
# width): one implementation of that reduction.
_merge_splits_kernel = _vspace_merge_kernel


# ----------------------------------------------------------------------------- RoPE tables


def rope_tables(head_dim: int, end_x: int, end_y: int, theta: float = 10000.0,
                device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (end_x*end_y, head_dim/2) fp32: the reference's axial angles."""
    if head_dim % 4:
        raise ValueError(f"axial RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[:quarter].float() / head_dim))
    t = torch.arange(end_x * end_y, dtype=torch.float32)
    xs = t % end_x
    ys = torch.div(t, end_x, rounding_mode="floor")
    angles = torch.cat([xs[:, None] * freqs[None, :], ys[:, None] * freqs[None, :]], dim=1)
    # torch.polar, not cos/sin: its complex path rounds differently, and it is what the
    # reference's tables are made with.
    cis = torch.polar(torch.ones_like(angles), angles)
    return cis.real.contiguous().to(device), cis.imag.contiguous().to(device)


# ----------------------------------------------------------------------------- checks


def shape_reason(q, mem_k, mem_v, slot_ids, ptr_k, ptr_v, rope_cos, rope_sin) -> Optional[str]:
    """Why these tensors are no valid memory-attention call (None when they are)."""
    if q.dim() != 3:
        return f"q must be (B, Nq, D), got {tuple(q.shape)}"
    b, nq, d = q.shape
    if mem_k.dim() != 4 or mem_k.shape[0] != b or mem_k.shape[-1] != d or mem_v.shape != mem_k.shape:
        return (f"mem_k/mem_v must both be (B={b}, S_max, HW, D={d}), got "
                f"{tuple(mem_k.shape)} / {tuple(mem_v.shape)}")
    if slot_ids.dim() != 1 or slot_ids.dtype not in (torch.int32, torch.int64):
        return f"slot_ids must be a 1-D int32/int64 tensor, got {slot_ids.dtype} {tuple(slot_ids.shape)}"
    if (ptr_k is None) != (ptr_v is None):
        return "ptr_k and ptr_v must be given together"
    if ptr_k is not None and (ptr_k.dim() != 3 or ptr_k.shape[0] != b or ptr_k.shape[2] != d
                              or ptr_v.shape != ptr_k.shape):
        return f"ptr_k/ptr_v must be (B={b}, P, D={d}), got {tuple(ptr_k.shape)} / {tuple(ptr_v.shape)}"
    n_ptr = 0 if ptr_k is None else ptr_k.shape[1]
    if slot_ids.numel() == 0 and n_ptr == 0:
        return "no keys: slot_ids is empty and there are no pointer tokens"
    if rope_cos is not None:
        if slot_ids.numel() and mem_k.shape[2] != nq:
            return f"RoPE on memory keys needs HW == Nq (rope_k_repeat), got HW={mem_k.shape[2]}, Nq={nq}"
        if rope_cos.shape != (nq, d // 2) or rope_sin.shape != rope_cos.shape:
            return f"rope_cos/rope_sin must be (Nq={nq}, D/2={d // 2}), got {tuple(rope_cos.shape)}"
    return None


def unsupported_reason(q, mem_k, mem_v, slot_ids, ptr_k, ptr_v, rope_cos, rope_sin) -> Optional[str]:
    """Why the kernel cannot take these inputs (None when it can)."""
    reason = shape_reason(q, mem_k, mem_v, slot_ids, ptr_k, ptr_v, rope_cos, rope_sin)
    if reason:
        return reason
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]} not in {HEAD_DIMS}"
    others = [mem_k, mem_v] + ([ptr_k, ptr_v] if ptr_k is not None else [])
    reason = check_dtype("q", q)
    if reason is None and q.is_cuda and q.dtype == torch.float32:
        reason = "fp32 on CUDA goes to SDPA (the kernel's fp32 dot has no tensor cores)"
    if reason or any(t.dtype != q.dtype for t in others):
        return reason or "q, mem_k, mem_v, ptr_k, ptr_v must share one dtype"
    if any(t.stride(-1) != 1 for t in [q] + others):
        return "all of q, mem_k, mem_v, ptr_k, ptr_v need contiguous channels (stride(-1) == 1)"
    if mem_k.stride() != mem_v.stride() or (ptr_k is not None and ptr_k.stride() != ptr_v.stride()):
        return "keys and values must have the same strides"
    if rope_cos is not None and (rope_cos.dtype != torch.float32 or not rope_cos.is_contiguous()
                                 or not rope_sin.is_contiguous() or rope_sin.dtype != torch.float32):
        return "rope_cos/rope_sin must be contiguous fp32"
    tables = [rope_cos, rope_sin] if rope_cos is not None else []
    devs = {t.device for t in [q, slot_ids] + others + tables}
    if len(devs) != 1:
        return f"all tensors must be on one device, got {sorted(map(str, devs))}"
    return None


# ----------------------------------------------------------------------------- launcher


def pick_config(head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """Block sizes per (head dim, dtype); every choice is listed by ``all_configs``."""
    if dtype == torch.float32:
        # fp32 tiles are twice as large: keep q + one k/v stage under sm_86's 99 KiB.
        return LaunchConfig(32 if head_dim >= 128 else 64, 32, 4, 1 if head_dim >= 256 else 2)
    if head_dim >= 256:
        return LaunchConfig(64, 32, 4, 2)
    return LaunchConfig(64, 64, 4, 2)


MERGE_BLOCK_M = 32


def all_configs(head_dims=HEAD_DIMS, dtypes=(torch.float16, torch.bfloat16)):
    """Every (kernel name, dtype, constexprs, LaunchConfig) the launcher can use."""
    out = []
    for dt in dtypes:
        for d in head_dims:
            cfg = pick_config(d, dt)
            # RoPE and split-KV are runtime flags: one variant per (dtype, head dim).
            out.append(("attn", dt, dict(D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                         DOT_PREC=dot_precision(dt)), cfg))
            out.append(("merge", dt, dict(DV=d, BLOCK_M=MERGE_BLOCK_M), LaunchConfig(MERGE_BLOCK_M, 0, 4, 1)))
    return out


def choose_splits(n_q_blocks: int, n_key_blocks: int, device: torch.device) -> int:
    """Enough KV splits to give every SM ``PROGRAMS_PER_SM`` programs (1 off the GPU)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-PROGRAMS_PER_SM * sms // max(n_q_blocks, 1))
    return max(1, min(want, n_key_blocks // MIN_BLOCKS_PER_SPLIT))


def memory_attention_triton(q, mem_k, mem_v, slot_ids, ptr_k=None, ptr_v=None,
                            rope_cos=None, rope_sin=None, rope_k: bool = True,
                            out: Optional[torch.Tensor] = None,
                            num_splits: Optional[int] = None) -> torch.Tensor:
    """Launch the fused kernel (tensors: module docstring). RoPE is skipped when rope_cos is None;
    ``rope_k=False`` takes memory keys that were stored already rotated."""
    raise_if(unsupported_reason(q, mem_k, mem_v, slot_ids, ptr_k, ptr_v, rope_cos, rope_sin),
             "memory_attention")
    b, nq, d = q.shape
    hw = mem_k.shape[2]
    n_ptr = 0 if ptr_k is None else ptr_k.shape[1]
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"memory_attention: out must be {tuple(q.shape)} {q.dtype}, unit channel stride")
    cfg = pick_config(d, q.dtype)
    n_qb = triton.cdiv(nq, cfg.block_m)
    n_kb = slot_ids.numel() * triton.cdiv(hw, cfg.block_n) + triton.cdiv(n_ptr, cfg.block_n)
    splits = num_splits if num_splits is not None else choose_splits(n_qb * b, n_kb, q.device)
    splits = max(1, min(int(splits), n_kb))
    if splits > 1:
        part = torch.empty((splits, b, nq, d), device=q.device, dtype=torch.float32)
        lse = torch.empty((splits, b, nq), device=q.device, dtype=torch.float32)
    else:
        # Unused, but fp32 like the real ones so that one compiled variant serves all calls.
        part = lse = torch.empty(1, device=q.device, dtype=torch.float32)
    pk, pv = (ptr_k, ptr_v) if ptr_k is not None else (q, q)
    if rope_cos is not None:
        cos, sin = rope_cos, rope_sin
    else:
        cos = sin = torch.empty(1, device=q.device, dtype=torch.float32)
    _mem_attn_kernel[(n_qb, b, splits)](
        q, mem_k, mem_v, slot_ids, pk, pv, cos, sin, out, part, lse,
        q.stride(0), q.stride(1), mem_k.stride(0), mem_k.stride(1), mem_k.stride(2),
        pk.stride(0), pk.stride(1), out.stride(0), out.stride(1),
        nq, hw, slot_ids.numel(), n_ptr, splits, LOG2E / math.sqrt(d),
        int(rope_cos is not None), int(rope_cos is not None and rope_k),
        D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PREC=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        _merge_splits_kernel[(triton.cdiv(nq, MERGE_BLOCK_M), b)](
            part, lse, out, out.stride(0), out.stride(1), nq, b, splits,
            DV=d, BLOCK_M=MERGE_BLOCK_M, num_warps=4, num_stages=1)
    return out


# ----------------------------------------------------------------------------- reference


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x (..., N, D) by per-position angles (N, D/2), in >= fp32."""
    work = torch.promote_types(x.dtype, torch.float32)
    xe, xo = x.to(work).unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos.to(work), sin.to(work)
    return torch.stack([xe * c - xo * s, xe * s + xo * c], dim=-1).flatten(-2).to(x.dtype)


def memory_attention_reference(q, mem_k, mem_v, slot_ids, ptr_k=None, ptr_v=None,
                               rope_cos=None, rope_sin=None, rope_k: bool = True) -> torch.Tensor:
    """PyTorch path: rotate, gather the slots, append the pointers, SDPA."""
    raise_if(shape_reason(q, mem_k, mem_v, slot_ids, ptr_k, ptr_v, rope_cos, rope_sin),
             "memory_attention")
    b, nq, d = q.shape
    sel = slot_ids.long()
    k = mem_k.index_select(1, sel)  # (B, S, HW, D)
    v = mem_v.index_select(1, sel)
    if rope_cos is not None:
        q = apply_rope(q, rope_cos, rope_sin)
        if rope_k:
            k = apply_rope(k, rope_cos, rope_sin)  # same table for every memory frame
    k, v = k.flatten(1, 2), v.flatten(1, 2)  # (B, S*HW, D)
    if ptr_k is not None:
        k, v = torch.cat([k, ptr_k], 1), torch.cat([v, ptr_v], 1)
    return F.scaled_dot_product_attention(q, k, v)
