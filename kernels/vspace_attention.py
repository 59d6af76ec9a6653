"""Memory cross-attention in the value space: one head, d_qk != d_v, per-batch key ranges.

What it computes (one call per memory-attention layer; ``B`` objects share the launch):
    q       (B, Nq, DK)   16-bit, queries ALREADY rotated (RoPE applied once per frame)
    k       (B, Nk, DK)   16-bit, keys ALREADY rotated (once, when the memory is written)
    v       (B, Nk, DV)   16-bit, the RAW 64-d memory tokens (``kv_in_dim``), not ``v_proj``'d
    ranges  (B, 4) int32 | None   valid keys of each batch element: [r0, r1) and [r2, r3)
                          (a static bank: spatial slots first, pointer tokens from a fixed
                          offset); None = all Nk keys. Device tensor: the launch needs no
                          host sync and a CUDA graph replays it with new counts.
    returns (B, Nq, DV) in q's dtype: softmax(q k^T / sqrt(DK)) v. The caller applies the
    fused output matrix ``W_o W_v`` (DV -> 256) and bias ``W_o b_v + b_o`` after: softmax
    rows sum to 1, so this equals the reference's ``out_proj(attn(q, k, v_proj(m)))``.

Why this kernel (the "do less work" of issue 8). Tiny at 1024 px, full bank: Nq = 4096
queries, Nk = 7 x 4096 + 64 = 28,736 keys, DK = 256.
    reference per layer: QK 2*4096*28736*256 = 60.3 GFLOP + PV (d_v 256) 60.3 = 120.5 GFLOP
    value space:         QK 60.3 GFLOP            + PV (d_v 64)  15.1 = 75.3 GFLOP (-37.5 %)
    bytes: q 2.1 MB + k 14.7 MB + v 3.7 MB + out 0.5 MB = 21 MB -> 4.9 us at 4.3 TB/s,
    against 95 us of bf16 tensor-core time at the measured ~790 TFLOP/s of an H200: compute
    bound by 20x, so the goal is tensor-core occupancy, not bandwidth.
    Flash attention (SDPA's flash and cuDNN backends) needs d_v == d_qk, so PyTorch can only
    run this in the value space through its memory-efficient backend; our kernel must beat
    flash/cuDNN on the 256-d formulation by being 37.5 % cheaper. The selection layer
    (``select.py``) times both on the user's card and keeps the faster.
    Exp: 4096 x 28736 = 118 M exponentials per layer; at 16 MUFU ops/clk/SM x 132 SMs x
    1.98 GHz = 4.2 T/s that is 28 us, ~30 % of the tensor time: the softmax is the second
    limit, as in FlashAttention-3's analysis, so no extra work per score (masks only in the
    tail blocks, scale folded into one multiply).
Grid: (Nq / BLOCK_M, B, splits). B = 1 gives 32 query blocks for 132 SMs, so the keys are
split (split-KV) to whole waves of the card (``choose_splits``: 8 splits = 256 programs =
1.94 waves on an H200); partials are fp32 (splits x B x Nq x 64 x 4 B = 8 MB at 8 splits,
written once and read once by a second small kernel: 16 MB ~ 5 us at 3 TB/s against
~130 us of attention, so bf16 partials would save ~2 % and are not worth their rounding).
Loads: k/v rows are contiguous (channel stride 1, row stride a multiple of 16 bytes): the
compiler issues 16-byte vector loads and pipelines them (``num_stages``) into shared memory.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import LaunchConfig, card, raise_if

LOG2E = 1.4426950408889634
# (DK, DV) pairs the launcher takes (each one is an AOT-checked compiled variant).
# (256, 64): memory cross-attention in the value space; (256, 256): the same attention in
# the reference's value width (measured against flash/cuDNN; no model path uses it).
HEAD_DIMS = ((256, 64), (256, 256))
DTYPES = (torch.float16, torch.bfloat16)  # fp32 never takes a path without tensor cores
MERGE_BLOCK_M = 64


def merge_block_m(dv: int) -> int:
    """Merge rows per program: 64 at d_v 64; 32 at d_v 256 (64 spilled 24 regs on an H200)."""
    return MERGE_BLOCK_M if dv <= 64 else 32


@triton.jit
def _attend_block(q, k_ptrs, v_ptrs, tok, end, m_i, l_i, acc, qk_scale, MASKED: tl.constexpr):
    """Fold one block of keys into (m, l, acc). q is pre-scaled by nothing; scores in log2."""
    if MASKED:
        ok = tok < end
        k = tl.load(k_ptrs, mask=ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _attend_range(q, k_base, v_base, s_kt, s_vt, start, end, j_lo, j_hi, m_i, l_i, acc, qk_scale,
                  DK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr):
    """Blocks j_lo..j_hi (relative to ``start``) of the key range [start, end)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, DK)
    offs_v = tl.arange(0, DV)
    n_full = (end - start) // BLOCK_N
    for j in range(j_lo, tl.minimum(j_hi, n_full)):  # full blocks: no mask in the hot loop
        tok = start + j * BLOCK_N + offs_n
        m_i, l_i, acc = _attend_block(q, k_base + tok[:, None] * s_kt + offs_k[None, :],
                                      v_base + tok[:, None] * s_vt + offs_v[None, :],
                                      tok, end, m_i, l_i, acc, qk_scale, MASKED=False)
    for j in range(tl.maximum(j_lo, n_full), j_hi):  # at most one tail block
        tok = start + j * BLOCK_N + offs_n
        m_i, l_i, acc = _attend_block(q, k_base + tok[:, None] * s_kt + offs_k[None, :],
                                      v_base + tok[:, None] * s_vt + offs_v[None, :],
                                      tok, end, m_i, l_i, acc, qk_scale, MASKED=True)
    return m_i, l_i, acc


# Integers that change from call to call are not specialised (a new value class would compile
# a new variant in the first frames): n_splits (often 1: 8 -> 1 when the batch grows) and Nk
# (4100 keys after the first frame, 8200, ..., 28,736: divisible by 16 or not as the bank
# fills; it only bounds the tail block's row mask, which does not affect vector width).
# Strides stay specialised: divisibility by 16 is what lets the loads be 16-byte vectors.
# AOT: 6 -> 4 attention variants per dtype and target (Nk % 16 no longer splits them).
@triton.jit(do_not_specialize=["Nk", "n_splits"])
def _vspace_attn_kernel(
    q_ptr, k_ptr, v_ptr, rng_ptr, out_ptr, part_ptr, lse_ptr,
    s_qb, s_qt, s_kb, s_kt, s_vb, s_vt, s_ob, s_ot,
    Nq, Nk, n_splits, qk_scale,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_RANGES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, DK)
    offs_v = tl.arange(0, DV)
    m_ok = offs_m < Nq
    q = tl.load(q_ptr + b.to(tl.int64) * s_qb + offs_m[:, None] * s_qt + offs_k[None, :],
                mask=m_ok[:, None], other=0.0)

    if HAS_RANGES:
        r0 = tl.load(rng_ptr + b * 4)
        r1 = tl.load(rng_ptr + b * 4 + 1)
        r2 = tl.load(rng_ptr + b * 4 + 2)
        r3 = tl.load(rng_ptr + b * 4 + 3)
    else:  # every key; no table to build or copy per call
        r0 = 0
        r1 = Nk
        r2 = 0
        r3 = 0
    nb0 = tl.cdiv(r1 - r0, BLOCK_N)
    nb1 = tl.cdiv(r3 - r2, BLOCK_N)
    per_split = tl.cdiv(nb0 + nb1, n_splits)
    j0 = split * per_split
    j1 = tl.minimum(j0 + per_split, nb0 + nb1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    k_base = k_ptr + b.to(tl.int64) * s_kb
    v_base = v_ptr + b.to(tl.int64) * s_vb
    m_i, l_i, acc = _attend_range(q, k_base, v_base, s_kt, s_vt, r0, r1, j0, tl.minimum(j1, nb0),
                                  m_i, l_i, acc, qk_scale, DK, DV, BLOCK_N)
    m_i, l_i, acc = _attend_range(q, k_base, v_base, s_kt, s_vt, r2, r3, tl.maximum(j0 - nb0, 0),
                                  j1 - nb0, m_i, l_i, acc, qk_scale, DK, DV, BLOCK_N)

    has = l_i > 0.0  # a split may own no key block (or a batch element no keys at all)
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if n_splits > 1:
        row = (split * tl.num_programs(1) + b).to(tl.int64) * Nq + offs_m
        tl.store(part_ptr + row[:, None] * DV + offs_v[None, :], o, mask=m_ok[:, None])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=m_ok)
    else:
        o_ptrs = out_ptr + b.to(tl.int64) * s_ob + offs_m[:, None] * s_ot + offs_v[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])


@triton.jit(do_not_specialize=["B", "n_splits"])
def _vspace_merge_kernel(part_ptr, lse_ptr, out_ptr, s_ob, s_ot, Nq, B, n_splits,
                         DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """out = sum_s w_s part_s / sum_s w_s, w_s = 2^(lse_s - max lse) (0 for empty splits)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = tl.arange(0, DV)
    m_ok = offs_m < Nq
    top = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(n_splits):
        row = (s * B + b).to(tl.int64) * Nq + offs_m
        top = tl.maximum(top, tl.load(lse_ptr + row, mask=m_ok, other=float("-inf")))
    top = tl.where(top > float("-inf"), top, 0.0)
    den = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    for s in range(n_splits):
        row = (s * B + b).to(tl.int64) * Nq + offs_m
        lse = tl.load(lse_ptr + row, mask=m_ok, other=float("-inf"))
        w = tl.where(lse > float("-inf"), tl.exp2(lse - top), 0.0)
        part = tl.load(part_ptr + row[:, None] * DV + offs_v[None, :], mask=m_ok[:, None], other=0.0)
        den += w
        acc += w[:, None] * part
    o = acc / tl.where(den > 0.0, den, 1.0)[:, None]
    o_ptrs = out_ptr + b.to(tl.int64) * s_ob + offs_m[:, None] * s_ot + offs_v[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])


# ----------------------------------------------------------------------------- configs


def pick_config(dk: int, dv: int, capability: tuple = (9, 0)) -> LaunchConfig:
    """Tiles per card family; shared memory as compiled (triton 3.8, d_v 64 / 256).

    sm_90 (227 KiB a block): 128x64 tiles, 3 stages: q 64 KiB + 3 x (k 32 + v 8) = 184 KiB at
    (256, 64), 8 warps = two warpgroups of 64 query rows each (wgmma M = 64); d_v 256 below.
    sm_80 (163 KiB): 128x64, 2 stages, 104 KiB (q stays in registers for
    mma.sync); d_v 256 below. sm_86/89 (99 KiB): 64x32, 2 stages, 52 / 68 KiB.
    """
    major, minor = capability
    if (major, minor) in ((8, 6), (8, 7), (8, 9)) or major >= 12:
        # d_v 256: 8 warps (the sm_80 tile below; 4 warps spill without ranges under triton 3.6)
        return LaunchConfig(64, 32, 4, 2) if dv <= 64 else LaunchConfig(64, 32, 8, 2)
    # d_v 256 (the memory self-attention's candidate): the fp32 accumulator is 4x wider, so
    # the key tile or the query tile halves to stay spill-free (triton 3.8 AOT, bf16/fp16,
    # ranges or not): sm_80 64x64x4 warps -> 64x32x8 warps (178-179 registers, 0 spills,
    # 68 KiB; the old tile spilled 4-52 B, 128x32 still 4 B without ranges); sm_90 128x64 -> 64x64 (226 registers, 0 spills, 160 KiB; the
    # old tile spilled, 128x32 fits at exactly 255 registers, no headroom for another ptxas).
    # One resident program per SM either way (PROGRAMS_PER_SM).
    if major == 8:
        return LaunchConfig(128, 64, 8, 2) if dv <= 64 else LaunchConfig(64, 32, 8, 2)
    return LaunchConfig(128, 64, 8, 3) if dv <= 64 else LaunchConfig(64, 64, 8, 2)


# Capabilities whose tile choice differs (every one is compiled by the AOT test).
CAPABILITIES = ((8, 0), (8, 6), (9, 0))


def all_configs():
    """Every (kernel, dtype, constexprs, LaunchConfig, capability) the launcher can use."""
    out = []
    for cap in CAPABILITIES:
        for dt in DTYPES:
            for dk, dv in HEAD_DIMS:
                cfg = pick_config(dk, dv, cap)
                for has in (False, True):
                    out.append(("attn", dt, dict(DK=dk, DV=dv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                                 HAS_RANGES=has), cfg, cap))
                out.append(("merge", dt, dict(DV=dv, BLOCK_M=merge_block_m(dv)),
                            LaunchConfig(merge_block_m(dv), 0, 4, 1), cap))
    return out


# Resident programs per SM of every tile ``pick_config`` returns, from the compiled kernels
# (triton 3.8 AOT, ``ctas_per_sm`` of their shared memory and registers; checked for every
# variant by tests/kernels/test_aot_compile.py::test_vspace_occupancy_is_documented):
# sm_90 128x64x3 stages 184 KiB shared (124-189 registers x 256 threads) -> 1;
# sm_80 128x64x2 104 KiB (166 registers x 256) -> 1; sm_86/89 64x32x2 52 KiB (134-141 x 128)
# -> 1 (2 x 53 KiB > 100 KiB); d_v 256: sm_90 64x64 160 KiB (226 x 256), sm_80 64x32 68 KiB
# (179 x 256: 2 x 45.8 k > 64 k registers), sm_86 68 KiB -> 1. Shared memory or registers bound them all.
PROGRAMS_PER_SM = 1
# Split-KV cost model (``choose_splits``), in units of one key block streamed by one program:
PROGRAM_OVERHEAD_BLOCKS = 2  # q tile in (BM x DK x 2 B = 64 KiB ~ 1.6 k/v blocks of 40 KiB) + output
SPLIT_OVERHEAD_BLOCKS = 2    # fp32 partial out (BM x DV x 4 = 32 KiB) and read back by the merge
TAIL_WAVES = 0.25            # the last wave's spread, in programs (see choose_splits)
SPLIT_MARGIN = 0.03          # a split must be modelled this much faster than fewer splits
MIN_BLOCKS_PER_SPLIT = 8     # below this a program's fixed costs dominate
MAX_SPLITS = 8               # partials: splits x B x Nq x DV x 4 B (8 MB at B = 1, d_v 64)


def split_cost(programs: int, n_key_blocks: int, slots: int, splits: int) -> float:
    """Modelled time of one launch in key-block units (see ``choose_splits``)."""
    waves = -(-programs * splits // slots)
    per_program = (-(-n_key_blocks // splits) + PROGRAM_OVERHEAD_BLOCKS
                   + (SPLIT_OVERHEAD_BLOCKS if splits > 1 else 0))
    return (waves + TAIL_WAVES) * per_program


def choose_splits(programs: int, n_key_blocks: int, sms: int, programs_per_sm: int = PROGRAMS_PER_SM) -> int:
    """KV splits so that B x query blocks x splits programs fill whole waves of the card.

    programs: B x query blocks (the grid without splits); n_key_blocks: cdiv(Nk, BLOCK_N);
    sms: the card's SM count (0 off the GPU: 1 split). slots = sms x programs_per_sm run at
    once; ``splits`` gives programs x splits programs in ceil(programs x splits / slots) whole
    waves, each program streaming ceil(n_key_blocks / splits) blocks plus fixed costs:
        cost(s) = (waves(s) + TAIL_WAVES) x (ceil(n_key_blocks / s) + 2 + (2 if s > 1))
    TAIL_WAVES charges the last wave's spread (programs of one wave do not end together;
    shorter programs shorten it). Splits run 1..min(MAX_SPLITS, n_key_blocks / 8); the fewest
    splits within SPLIT_MARGIN of the lowest cost win (gains the model cannot resolve do not
    pay for the partials and the merge).
    H200 (132 SMs), tiny's full bank: 4096 queries / 128 = 32 programs, 28,736 keys / 64 =
    449 blocks:
        s = 1: 32 programs, 1 wave, cost 1.25 x 451 = 564    (measured 669 us)
        s = 4: 128 programs, 0.97 wave, 1.25 x 117 = 146      (274 us, the old choice)
        s = 8: 256 programs, 1.94 waves -> 2, 2.25 x 61 = 137  (241 us)  <- chosen
    (measured: NOTES.md, first H200 run; both split rows then included a per-call copy of the
    key ranges, so the 4-vs-8 gap is to be re-measured: kernel_candidates.py sweeps 1-16
    splits with ranges given). 8 objects: 256 programs are 1.94 waves already: 2 splits
    (cost 973 vs 1015 at 1). A100 (108 SMs): 6 splits (192 programs, 1.78 waves, cost 178
    vs 263 at 4 = 1.19 waves); L4 (58 SMs, 64-row tiles): 7 splits at 1 object, 1 at 8
    (512 programs = 8.8 waves: splits gain < 3 %).
    """
    if sms <= 0 or programs <= 0:
        return 1
    slots = sms * max(1, programs_per_sm)
    top = max(1, min(MAX_SPLITS, n_key_blocks // MIN_BLOCKS_PER_SPLIT))
    costs = {s: split_cost(programs, n_key_blocks, slots, s) for s in range(1, top + 1)}
    best = min(costs.values())
    return min(s for s, c in costs.items() if c <= best * (1 + SPLIT_MARGIN))


# ----------------------------------------------------------------------------- checks


def unsupported_reason(q, k, v, ranges) -> Optional[str]:
    """Why the kernel cannot take these inputs (None when it can)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        return f"q, k, v must be (B, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    b, _, dk = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[2] != dk or v.shape[1] != k.shape[1]:
        return f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if (dk, v.shape[2]) not in HEAD_DIMS:
        return f"(d_qk, d_v) = {(dk, v.shape[2])} not in {HEAD_DIMS}"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v must share one 16-bit dtype (fp32 goes to SDPA), got {q.dtype}/{k.dtype}/{v.dtype}"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "q, k, v need contiguous channels (stride(-1) == 1)"
    if ranges is not None and (ranges.shape != (b, 4) or ranges.dtype != torch.int32
                               or not ranges.is_contiguous()):
        return f"ranges must be a contiguous (B={b}, 4) int32 tensor, got {ranges.dtype} {tuple(ranges.shape)}"
    devs = {t.device for t in (q, k, v) + ((ranges,) if ranges is not None else ())}
    if len(devs) != 1:
        return f"all tensors must be on one device, got {sorted(map(str, devs))}"
    return None


# ----------------------------------------------------------------------------- launcher


@functools.lru_cache(maxsize=1024)
def _splits_for(programs: int, n_key_blocks: int, sms: int) -> int:
    """``choose_splits`` once per shape and card (its cost loop took ~7 us per call)."""
    return choose_splits(programs, n_key_blocks, sms)


def vspace_attention_triton(q, k, v, ranges: Optional[torch.Tensor] = None,
                            out: Optional[torch.Tensor] = None, num_splits: Optional[int] = None,
                            config: Optional[LaunchConfig] = None, check: bool = True) -> torch.Tensor:
    """Launch (tensors: module docstring). ``config`` overrides the per-card tile choice.
    ``check=False``: the caller has just run ``unsupported_reason`` (the selection layer does
    for every call), so the launch skips the second pass over the inputs."""
    if check:
        raise_if(unsupported_reason(q, k, v, ranges), "vspace_attention")
    b, nq, dk = q.shape
    nk, dv = k.shape[1], v.shape[2]
    if out is None:
        out = torch.empty((b, nq, dv), device=q.device, dtype=q.dtype)
    gpu = card(q.device)  # cached per device: no property query per call
    cfg = config or pick_config(dk, dv, gpu.capability)
    n_qb = triton.cdiv(nq, cfg.block_m)
    if num_splits is None:
        num_splits = _splits_for(n_qb * b, triton.cdiv(nk, cfg.block_n), gpu.sms)
    splits = max(1, int(num_splits))
    if splits > 1:
        part = torch.empty((splits, b, nq, dv), device=q.device, dtype=torch.float32)
        lse = torch.empty((splits, b, nq), device=q.device, dtype=torch.float32)
    else:
        part = lse = torch.empty(1, device=q.device, dtype=torch.float32)
    _vspace_attn_kernel[(n_qb, b, splits)](
        q, k, v, ranges if ranges is not None else part, out, part, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), nq, nk, splits, LOG2E / math.sqrt(dk),
        DK=dk, DV=dv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_RANGES=ranges is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        mbm = merge_block_m(dv)
        _vspace_merge_kernel[(triton.cdiv(nq, mbm), b)](
            part, lse, out, out.stride(0), out.stride(1), nq, b, splits,
            DV=dv, BLOCK_M=mbm, num_warps=4, num_stages=1)
    return out


# ----------------------------------------------------------------------------- reference


def ranges_mask(ranges: torch.Tensor, nk: int) -> torch.Tensor:
    """(B, 4) ranges -> (B, 1, Nk) bool key mask (True = attend)."""
    t = torch.arange(nk, device=ranges.device)
    r = ranges.long()
    ok = ((t >= r[:, 0:1]) & (t < r[:, 1:2])) | ((t >= r[:, 2:3]) & (t < r[:, 3:4]))
    return ok[:, None, :]


def vspace_attention_reference(q, k, v, ranges: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PyTorch path: SDPA (its memory-efficient backend takes d_v != d_qk; masks rule out flash).

    Called through the (B, 1, N, D) layout: SDPA's fused CUDA backends refuse 3-D inputs and
    would silently leave the math backend (measured on an H200: 4.1 ms instead of ~0.2)."""
    mask = None if ranges is None else ranges_mask(ranges, k.shape[1])[:, None]  # (B, 1, 1, Nk)
    return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=mask)[:, 0]
