"""Memory attention: reference against the official RoPEAttention, kernel against reference."""

from __future__ import annotations

import pytest
import torch
from ktest_util import assert_attention_error, needs_interp, poisoned, rel

from sam2_fast.kernels import memory_attention as ma

try:
    from sam2.modeling.sam.transformer import RoPEAttention
except Exception:  # pragma: no cover
    RoPEAttention = None


def _official(d, kv_dim, feat, seed=0):
    torch.manual_seed(seed)
    att = RoPEAttention(embedding_dim=d, num_heads=1, kv_in_dim=kv_dim, rope_k_repeat=True,
                        feat_sizes=feat, rope_theta=10000.0)
    with torch.no_grad():
        for p in att.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() > 1 else 1.0))
    return att.eval()


@pytest.mark.skipif(RoPEAttention is None, reason="sam2 reference not installed")
@pytest.mark.parametrize("n_mem,n_ptr", [(1, 0), (3, 4), (2, 16)])
def test_reference_matches_official_rope_attention(n_mem, n_ptr):
    """Our slot-bank formulation = the official cat + RoPE(k repeat) + SDPA layer."""
    d, kv_dim, side = 32, 16, 5  # square map (the official layer takes w = h = sqrt(Nq))
    att = _official(d, kv_dim, (side, side))
    nq = side * side
    tgt = torch.randn(2, nq, d)
    mems = torch.randn(2, n_mem, nq, kv_dim)
    ptrs = torch.randn(2, n_ptr, kv_dim)
    memory = torch.cat([mems.flatten(1, 2), ptrs], 1)
    with torch.no_grad():
        want = att(tgt, memory, memory, num_k_exclude_rope=n_ptr)
        # A bank with spare slots, stored in a shuffled order.
        bank = torch.randn(2, n_mem + 2, nq, kv_dim)
        order = torch.randperm(n_mem + 2)[:n_mem]
        bank[:, order] = mems
        cos, sin = ma.rope_tables(d, side, side)
        core = ma.memory_attention_reference(
            att.q_proj(tgt), att.k_proj(bank), att.v_proj(bank), order.int(),
            att.k_proj(ptrs) if n_ptr else None, att.v_proj(ptrs) if n_ptr else None, cos, sin)
        got = att.out_proj(core)
    assert rel(got, want) <= 1e-5, rel(got, want)


@pytest.mark.skipif(RoPEAttention is None, reason="sam2 reference not installed")
def test_mutation_rope_on_pointers_is_caught():
    """Rotating the pointer tokens too (a wrong rule) must fail by a wide margin."""
    d, side = 32, 4
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 16, d) * 2 for _ in range(3))
    ptr_k, ptr_v = torch.randn(1, 16, d) * 2, torch.randn(1, 16, d)
    cos, sin = ma.rope_tables(d, side, side)
    ids = torch.zeros(1, dtype=torch.int32)
    good = ma.memory_attention_reference(q, k[:, None], v[:, None], ids, ptr_k, ptr_v, cos, sin)
    bad_ptr = ma.apply_rope(ptr_k, cos, sin)
    bad = ma.memory_attention_reference(q, k[:, None], v[:, None], ids, bad_ptr, ptr_v, cos, sin)
    assert rel(bad, good) > 1e-2, rel(bad, good)


def test_rope_tables_match_official_cis():
    from sam2.modeling.position_encoding import compute_axial_cis

    cis = compute_axial_cis(dim=64, end_x=6, end_y=4)
    cos, sin = ma.rope_tables(64, 6, 4)
    assert torch.equal(cos, cis.real) and torch.equal(sin, cis.imag)


def test_unsupported_reasons_are_named():
    q = torch.randn(1, 16, 32)
    bank = torch.randn(1, 3, 16, 32)
    empty = torch.zeros(0, dtype=torch.int32)
    one = torch.ones(1, dtype=torch.int32)
    assert "no keys" in ma.shape_reason(q, bank, bank, empty, None, None, None, None)
    bad_hw = torch.randn(1, 3, 9, 32)
    cos, sin = ma.rope_tables(32, 4, 4)
    assert "HW == Nq" in ma.shape_reason(q, bad_hw, bad_hw, one, None, None, cos, sin)
    d16 = torch.randn(1, 3, 16, 16)  # the decoder's 16-wide heads: halves too narrow for tl.dot
    assert "head dim" in ma.unsupported_reason(torch.randn(1, 16, 16), d16, d16, one, None, None, None, None)
    assert "head dim" in ma.unsupported_reason(torch.randn(1, 16, 24), torch.randn(1, 3, 16, 24),
                                              torch.randn(1, 3, 16, 24), one, None, None, None, None)


# ---------------------------------------------------------------- kernel (interpreter)

# (B, end_x, end_y, D, S_max, slots used, pointer tokens, splits)
KERNEL_CASES = [
    (1, 4, 4, 256, 2, 1, 0, 1),     # full head dim, one memory
    (1, 3, 5, 256, 9, 8, 64, 3),    # 7 memories + 1 cond frame, 16 pointers, split-KV
    (2, 5, 3, 256, 4, 2, 4, 2),     # batch of objects, 1 pointer
    (3, 5, 5, 32, 8, 7, 12, 4),     # decoder-size head, 3 objects
    (1, 7, 3, 32, 3, 3, 0, 1),      # 21 queries (not a block multiple)
    (2, 4, 4, 256, 3, 0, 8, 1),     # no spatial memory at all, pointers only
]


@pytest.mark.interp
@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_cross_attention_kernel(case, dtype):
    b, ex, ey, d, s_max, n_used, n_ptr, splits = case
    torch.manual_seed(sum(case))
    nq = ex * ey
    q = torch.randn(b, nq, d).to(dtype)
    mk, mv = torch.randn(b, s_max, nq, d).to(dtype), torch.randn(b, s_max, nq, d).to(dtype)
    ids = torch.randperm(s_max)[:n_used].to(torch.int32)
    pk = torch.randn(b, n_ptr, d).to(dtype) if n_ptr else None
    pv = torch.randn(b, n_ptr, d).to(dtype) if n_ptr else None
    cos, sin = ma.rope_tables(d, ex, ey)
    dbl = (lambda t: None if t is None else t.double())
    exact = ma.memory_attention_reference(q.double(), mk.double(), mv.double(), ids, dbl(pk), dbl(pv), cos, sin)
    same = ma.memory_attention_reference(q, mk, mv, ids, pk, pv, cos, sin)
    out = poisoned(q.shape, dtype)
    got = ma.memory_attention_triton(q, mk, mv, ids, pk, pv, cos, sin, out=out, num_splits=splits)
    assert got.data_ptr() == out.data_ptr()
    assert_attention_error(got, same, exact, f"memory_attention{case} {dtype}")


@pytest.mark.interp
@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,side,d,splits", [(1, 5, 256, 1), (2, 4, 256, 3), (1, 6, 32, 2)])
def test_self_attention_kernel(b, side, d, splits, dtype):
    torch.manual_seed(side)
    n = side * side
    q, k, v = (torch.randn(b, n, d).to(dtype) for _ in range(3))
    cos, sin = ma.rope_tables(d, side, side)
    ids = torch.zeros(1, dtype=torch.int32)
    exact = ma.memory_attention_reference(q.double(), k.double()[:, None], v.double()[:, None], ids,
                                          rope_cos=cos, rope_sin=sin)
    same = ma.memory_attention_reference(q, k[:, None], v[:, None], ids, rope_cos=cos, rope_sin=sin)
    out = poisoned(q.shape, dtype)
    ma.memory_attention_triton(q, k[:, None], v[:, None], ids, rope_cos=cos, rope_sin=sin, out=out,
                               num_splits=splits)
    assert_attention_error(out, same, exact, f"self_attention b={b} side={side} d={d} {dtype}")


@pytest.mark.interp
@needs_interp
def test_kernel_prerotated_keys_and_mutation():
    """rope_k=False takes rotated keys; feeding unrotated keys that way is far off."""
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 16, 32) * 2 for _ in range(3))
    cos, sin = ma.rope_tables(32, 4, 4)
    ids = torch.zeros(1, dtype=torch.int32)
    want = ma.memory_attention_reference(q, k[:, None], v[:, None], ids, rope_cos=cos, rope_sin=sin)
    k_rot = ma.apply_rope(k, cos, sin)
    got = ma.memory_attention_triton(q, k_rot[:, None], v[:, None], ids, rope_cos=cos, rope_sin=sin,
                                     rope_k=False)
    assert rel(got, want) < 1e-5
    wrong = ma.memory_attention_triton(q, k[:, None], v[:, None], ids, rope_cos=cos, rope_sin=sin,
                                       rope_k=False)
    assert rel(wrong, want) > 1e-2
