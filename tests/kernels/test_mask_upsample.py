"""Fused mask upsampling + threshold against F.interpolate(bilinear, align_corners=False) > t."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ktest_util import AlignCornersScale, needs_interp

from sam2_fast.kernels import mask_upsample as mu

# (N, h, w, H, W): ragged up-sampling, odd sizes, a down-sampling case, many objects
CASES = [
    (3, 7, 9, 29, 50),
    (1, 16, 16, 45, 80),    # 16:9-ish frame from a square low-res map
    (2, 20, 30, 9, 13),     # down-sampling (antialias off, same formula)
    (8, 5, 6, 17, 133),     # 8 objects, wide row spanning two column tiles
    (1, 1, 1, 3, 4),        # single source pixel
]


def _check(logits, size, threshold, mask, big):
    ref_mask, ref_big = mu.upsample_masks_reference(logits, size, threshold, want_logits=True)
    assert mask.dtype == torch.bool and mask.shape == ref_mask.shape
    assert not torch.isnan(big.float()).any(), "logits output not fully written"
    ulp = torch.finfo(logits.dtype).eps
    # fp32 source coordinates: both sides land within a few ulps of the largest logit.
    tol = 16 * ulp * ref_big.float().abs().max().item()
    diff = (big.float() - ref_big.float()).abs().max().item()
    assert diff <= tol, f"logits differ by {diff:.3e} (tolerance {tol:.3e})"
    # Masks agree except where the reference logit is within rounding of the threshold.
    undecided = (ref_big.float() - threshold).abs() <= tol
    wrong = (mask != ref_mask) & ~undecided
    assert not wrong.any(), f"{int(wrong.sum())} mask pixels differ away from the threshold"


@pytest.mark.interp
@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("threshold", [0.0, 0.7])
def test_kernel_matches_interpolate(case, dtype, threshold):
    check_kernel(case, dtype, threshold)


def check_kernel(case, dtype, threshold):
    n, h, w, H, W = case
    torch.manual_seed(sum(case))
    logits = (torch.randn(n, 1, h, w) * 4).to(dtype)
    mask_buf = torch.full((n, 1, H, W), 7, dtype=torch.uint8)  # poison: neither 0 nor 1
    big_buf = torch.full((n, 1, H, W), float("nan"), dtype=dtype)
    mask, big = mu.upsample_masks_triton(logits, (H, W), threshold, want_logits=True,
                                         mask_out=mask_buf, logits_out=big_buf)
    assert bool((mask_buf <= 1).all()), "mask output not fully written"
    _check(logits, (H, W), threshold, mask_buf.view(torch.bool), big)


@pytest.mark.interp
@needs_interp
def test_kernel_strided_input_and_mask_only():
    """A non-contiguous (channel-sliced) input and the mask-only variant."""
    torch.manual_seed(1)
    full = torch.randn(4, 3, 9, 11)
    logits = full[:, 1:2]  # (4, 1, 9, 11) view with plane stride 3*9*11
    mask, none = mu.upsample_masks_triton(logits, (31, 40))
    assert none is None
    ref_mask, _ = mu.upsample_masks_reference(logits, (31, 40))
    assert torch.equal(mask, ref_mask)


@pytest.mark.interp
@needs_interp
def test_mutation_align_corners_scale_is_caught(monkeypatch):
    """Product mutation: the launcher passes the align_corners=True scale (h-1)/(H-1); the
    real parity check fails."""
    monkeypatch.setattr(mu, "_upsample_threshold_kernel", AlignCornersScale(mu._upsample_threshold_kernel))
    with pytest.raises(AssertionError, match="logits differ") as info:
        check_kernel(CASES[0], torch.float32, 0.0)
    print(info.value)


def test_reference_rejects_bad_rank():
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        mu.upsample_masks_reference(torch.randn(3, 8, 8), (16, 16))
    assert "size" in mu.unsupported_reason(torch.randn(1, 1, 4, 4), (0, 5))


@pytest.mark.interp
@needs_interp
def test_logits_only_writes_no_mask():
    """want_mask=False (what the predictors ask for): logits exact, no mask tensor at all."""
    torch.manual_seed(4)
    logits = torch.randn(3, 1, 9, 11)
    mask, big = mu.upsample_masks_triton(logits, (31, 40), want_logits=True, want_mask=False)
    assert mask is None
    _, both = mu.upsample_masks_triton(logits, (31, 40), want_logits=True)  # checked above
    assert torch.equal(big, both)  # same arithmetic, only the mask store is gone
    with pytest.raises(ValueError, match="neither the mask nor the logits"):
        mu.upsample_masks_triton(logits, (31, 40), want_logits=False, want_mask=False)
