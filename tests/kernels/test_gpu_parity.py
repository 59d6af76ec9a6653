"""The GPU check: every kernel on CUDA at SAM 2 shapes, bf16 included (skipped without CUDA).

    .venv/bin/python -m pytest -q tests/kernels/test_gpu_parity.py -m cuda
The interpreter computes bf16 tl.dot wrongly, so bf16 is only checked here. The value-space
memory kernel's CUDA check lives in test_vspace_attention.py (test_cuda_real_shape_bf16).
"""

from __future__ import annotations

import pytest
import torch
from ktest_util import assert_attention_error, rel

from sam2_fast.kernels import mask_upsample as mu
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
