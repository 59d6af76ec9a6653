"""Shared pieces of the ``StreamingTracker`` tests (test_stream.py, test_stream_frames.py):
the model, the clip, their sizes and the fixtures that build them once per module.

Model: SAM 2.1 tiny at image_size 64 with the sensitive weight recipe; the object-score bias
keeps objects present on most frames and absent on some (asserted in test_stream.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import video_utils as V
from support import sensitize_

S = 64
NUM_FRAMES = 24
CLIP_HW = (75, 101)
BIAS = -0.04  # object-score bias of tiny 2.1 (as in test_video_predictor): mostly present


def build_predictor():
    """The tiny video predictor every stream test tracks with (build it once per module,
    under ``V.single_thread()``)."""
    from sam2_fast.build_sam import build_sam2_video_predictor

    torch.manual_seed(0)
    pred = build_sam2_video_predictor("sam2.1_hiera_tiny", device="cpu",
                                      hydra_overrides_extra=[f"++model.image_size={S}"])
    return sensitize_(pred, 0, obj_score_bias=BIAS).eval()


def make_stream_clip() -> np.ndarray:
    """(NUM_FRAMES, 75, 101, 3) uint8."""
    return V.make_clip(NUM_FRAMES, *CLIP_HW, seed=1)


def stream_fixtures():
    """The fixtures ``predictor`` and ``clip``: a test module binds them under those names
    (``predictor, clip = stream_fixtures()``) and pytest builds each once per module."""

    @pytest.fixture(scope="module", name="predictor")
    def predictor():
        with V.single_thread():
            yield build_predictor()

    @pytest.fixture(scope="module", name="clip")
    def clip():
        return make_stream_clip()

    return predictor, clip
