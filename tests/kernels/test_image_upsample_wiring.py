"""The image predictor's mask upsampling goes through the upsample kernel when it is enabled."""

from __future__ import annotations

import pytest
import torch
from ktest_util import AlignCornersScale, needs_interp

from sam2_fast.kernels import dispatch as K
from sam2_fast.kernels import mask_upsample as mu
from sam2_fast.utils import transforms as T

from support import rel_err

pytestmark = needs_interp


# 10x the measured kernel-vs-F.interpolate error (2.5e-7, fp32, interpreter, this case).
UPSAMPLE_TOL = 3e-6


def check_image_upsampling():
    g = torch.Generator().manual_seed(3)
    low = torch.randn(2, 3, 32, 32, generator=g) * 4  # (B, C, h, w) decoder logits
    orig_hw = (75, 101)  # odd original image: ragged output rows and columns
    K.reset_launch_counts()
    plain = T.upsample_masks(low, orig_hw)
    assert K.launch_counts() == {}, "the CPU default must not launch kernels"
    with K.force_kernels():
        fused = T.upsample_masks(low, orig_hw)
    assert K.launch_counts() == {"mask_upsample": 1}, K.launch_counts()
    assert fused.shape == plain.shape == (2, 3, 75, 101)
    err = rel_err(fused, plain)
    assert err <= UPSAMPLE_TOL, f"kernel vs F.interpolate: rel err {err:.2e} > {UPSAMPLE_TOL:.1e}"
    return err


def test_image_masks_upsampled_by_the_kernel_match_interpolate():
    print(f"rel err {check_image_upsampling():.2e}")


def test_mutation_wrong_sampling_is_caught(monkeypatch):
    """Product mutation: the launcher passes the align_corners=True scale; the image
    predictor's upsampling then fails the real wiring check."""
    monkeypatch.setattr(mu, "_upsample_threshold_kernel", AlignCornersScale(mu._upsample_threshold_kernel))
    with pytest.raises(AssertionError, match="kernel vs F.interpolate") as info:
        check_image_upsampling()
    print(info.value)
