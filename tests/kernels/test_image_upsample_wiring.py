"""The image predictor's mask upsampling goes through the upsample kernel when it is enabled."""

from __future__ import annotations

import numpy as np
import torch
from ktest_util import needs_interp

from sam2_fast.kernels import dispatch as K
from sam2_fast.utils import transforms as T

from support import rel_err

pytestmark = needs_interp


def test_image_masks_upsampled_by_the_kernel_match_interpolate():
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
    assert rel_err(fused, plain) < 1e-6


def test_mutation_wrong_sampling_is_caught():
    low = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    good = T.upsample_masks(low, (37, 41))
    shifted = torch.nn.functional.interpolate(low, (37, 41), mode="bilinear", align_corners=True)
    assert rel_err(shifted, good) > 1e-3 and np.isfinite(good.numpy()).all()
