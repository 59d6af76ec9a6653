"""Shared pieces of the fast-runtime tests (test_runtime.py, test_runtime_cuda.py; also
test_eager_glue.py and test_batched_objects.py): the tiny predictor, the clip and the
prompts it is tracked with, the tolerances, and a CPU stand-in for CUDA graph capture."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils import _pytree as pytree

from support import sensitize_
from video_utils import make_clip

from sam2_fast.build_sam import build_sam2_video_predictor

TRACK_TOL = 1e-4
SIZE = 128  # image side of the tiny predictor: 8x8 memory tokens
CONFIG = "sam2.1_hiera_tiny"

# bf16 tolerance: bf16 keeps 8 significant bits, so each rounding has relative error
# <= 2^-8. Independent roundings along a chain of d stages add up like a random walk,
# ~sqrt(d) * 2^-8. The tiny model's per-frame path has d ~ 50 stages (12 Hiera blocks x 2
# residual branches, FPN, 4 memory-attention layers x 3 branches, 2 decoder blocks x 4,
# upscaling), so sqrt(50) * 2^-8 ~ 0.028; a factor 4 covers the unit-gain sensitive
# weights and the tracking feedback over a few frames.
BF16_UNIT = 2.0 ** -8
BF16_TRACK_TOL = 4 * math.sqrt(50) * BF16_UNIT


def build_predictor(vos_optimized: bool):
    torch.manual_seed(0)  # the prompt encoder's random Fourier features are drawn at build time
    pred = build_sam2_video_predictor(CONFIG, device="cpu", vos_optimized=vos_optimized,
                                      hydra_overrides_extra=[f"++model.image_size={SIZE}"])
    return sensitize_(pred, 0, obj_score_bias=2.0)  # bias: the object is present on most frames


def runtime_clip() -> np.ndarray:
    """(11, 72, 88, 3) uint8: the clip ``track`` prompts."""
    return make_clip(11, 72, 88, seed=1)


def track(pred, clip) -> torch.Tensor:
    """Prompts on frames 0, 2 and 4: from frame 9 on, 3 conditioning + 5 recent frames fill
    8 of the 9-frame bucket (both bank buckets and their padding are used)."""
    state = pred.init_state(clip)
    pred.add_new_points_or_box(state, 0, 1, points=[[30, 36]], labels=[1])
    pred.add_new_points_or_box(state, 2, 1, points=[[40, 36], [10, 10]], labels=[1, 0])
    pred.add_new_points_or_box(state, 4, 1, box=[36, 20, 66, 50])
    masks = [m for _, _, m in pred.propagate_in_video(state)]
    return torch.stack(masks)  # (T, 1, 1, H, W) logits at video resolution


class ReplayByRerun:
    """CPU stand-in for CUDA graph capture with the same buffer semantics: the outputs of
    "capture" are fixed tensors that every replay overwrites in place, and a replay reads
    only the captured (static) input tensors. Bookkeeping bugs in GraphedStep (an input not
    copied in, a static buffer not read in place, an output handed out without a clone)
    then show up as wrong masks on CPU."""

    device_type = "cpu"

    def capture(self, run, warmup):
        for _ in range(warmup):
            run()
        outputs = run()

        def replay():
            fresh = pytree.tree_leaves(run())
            for dst, src in zip(pytree.tree_leaves(outputs), fresh):
                dst.copy_(src)

        return replay, outputs

    def recover(self):
        pass
