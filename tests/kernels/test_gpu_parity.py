"""The GPU check: every kernel on CUDA at SAM 2 shapes, bf16 included (skipped without CUDA).

    .venv/bin/python -m pytest -q tests/kernels/test_gpu_parity.py -m cuda
The interpreter computes bf16 tl.dot wrongly, so bf16 is only checked here.
"""

from __future__ import annotations

import pytest
import torch
from ktest_util import assert_attention_error, rel

from sam2_fast.kernels import mask_upsample as mu
from sam2_fast.kernels import memory_attention as ma
from sam2_fast.kernels import window_attention as wa

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp32 attention on CUDA is declined by the launchers (no tensor cores): 16-bit only here.
DTYPES16 = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES16)
@pytest.mark.parametrize("case", [(1, 256, 256, 1, 96, 8, False), (2, 256, 256, 2, 56, 8, True),
                                  (1, 66, 66, 4, 72, 14, False), (1, 64, 64, 8, 72, 14, True),
                                  (1, 64, 64, 4, 96, 0, False)])
def test_window_attention_gpu(case, dtype):
    b, h, w, heads, hd, window, pool = case
    c = heads * hd
    qkv = torch.randn(b, h, w, 3 * c, device="cuda").to(dtype)
    bias = torch.randn(3 * c, device="cuda")  # fp32 bias with 16-bit qkv, as under autocast
    exact = wa.window_attention_reference(qkv.double(), bias.to(dtype).double(), heads, window, pool)
    same = wa.window_attention_reference(qkv, bias, heads, window, pool)
    out = torch.full(exact.shape, float("nan"), device="cuda", dtype=dtype)
    wa.window_attention_triton(qkv, bias, heads, window, pool, out=out)
    assert_attention_error(out, same, exact, f"window{case} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES16)
@pytest.mark.parametrize("b,n_mem,n_ptr", [(1, 7, 64), (3, 2, 4), (1, 1, 0)])
def test_memory_cross_attention_gpu(b, n_mem, n_ptr, dtype):
    side, d = 64, 256
    n = side * side
    q = torch.randn(b, n, d, device="cuda").to(dtype)
    bank_k = torch.randn(b, n_mem + 1, n, d, device="cuda").to(dtype)
    bank_v = torch.randn_like(bank_k)
    ids = torch.arange(n_mem, device="cuda", dtype=torch.int32).flip(0)
    pk = torch.randn(b, n_ptr, d, device="cuda").to(dtype) if n_ptr else None
    pv = torch.randn(b, n_ptr, d, device="cuda").to(dtype) if n_ptr else None
    cos, sin = ma.rope_tables(d, side, side, device="cuda")
    dbl = (lambda t: None if t is None else t.double())
    exact = ma.memory_attention_reference(q.double(), bank_k.double(), bank_v.double(), ids,
                                          dbl(pk), dbl(pv), cos, sin)
    same = ma.memory_attention_reference(q, bank_k, bank_v, ids, pk, pv, cos, sin)
    out = torch.full_like(q, float("nan"))
    ma.memory_attention_triton(q, bank_k, bank_v, ids, pk, pv, cos, sin, out=out)
    assert_attention_error(out, same, exact, f"memory b={b} mems={n_mem} ptr={n_ptr} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [(480, 854), (1080, 1920), (17, 29)])
def test_upsample_masks_gpu(size, dtype):
    logits = (torch.randn(8, 1, 256, 256, device="cuda") * 4).to(dtype)
    mask, big = mu.upsample_masks_triton(logits, size, want_logits=True)
    ref_mask, ref_big = mu.upsample_masks_reference(logits, size, want_logits=True)
    assert rel(big, ref_big) < 4 * torch.finfo(dtype).eps
    tol = 16 * torch.finfo(dtype).eps * ref_big.float().abs().max().item()
    assert not ((mask != ref_mask) & (ref_big.float().abs() > tol)).any()


def test_fp32_attention_on_cuda_is_declined():
    """fp32 never takes a Triton attention path without tensor cores (issue 8): named reason."""
    qkv = torch.randn(1, 16, 16, 3 * 96, device="cuda")
    assert "fp32 on CUDA" in wa.unsupported_reason(qkv, None, 1, 8, False)
