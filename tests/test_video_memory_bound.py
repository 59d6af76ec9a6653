"""A long stream in bounded memory: ``init_state(..., keep_outputs="reachable")``.

Tracks thousands of tiny frames with a miniature SAM 2.1 (same architecture, fewer and
narrower layers) and checks that the tensor bytes the session holds stop growing, that the
frame source keeps a bounded number of decoded frames, and that dropping unreachable
outputs does not change a single mask. The default policy (keep everything, which reverse
tracking and corrections need) is shown to grow, so the check can fail.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import video_utils as V
from support import sensitize_

NUM_FRAMES = 2000
SAMPLE_EVERY = 100


@pytest.fixture(scope="module")
def predictor():
    from sam2_fast.config import PRESETS, HieraConfig
    from sam2_fast.sam2_video_predictor import SAM2VideoPredictor

    trunk = HieraConfig(embed_dim=16, num_heads=1, stages=(1, 1, 1, 1), global_att_blocks=(2,),
                        window_spec=(8, 4, 4, 2), window_pos_embed_bkg_spatial_size=(2, 2))
    cfg = dataclasses.replace(PRESETS["sam2.1_hiera_tiny"], image_size=32, trunk=trunk, d_model=64,
                              mem_dim=32, mem_attn_layers=1, mem_attn_ffn_dim=64, fill_hole_area=8)
    with V.single_thread():
        torch.manual_seed(0)
        yield sensitize_(SAM2VideoPredictor(cfg), seed=0).eval()


@pytest.fixture(scope="module")
def stream():
    """(T, 16, 16, 3) uint8: a bright square wandering over noise."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 120, (NUM_FRAMES, 16, 16, 3), dtype=np.uint8)
    for t in range(NUM_FRAMES):
        x, y = 2 + (t // 3) % 9, 3 + (t // 7) % 8
        frames[t, y : y + 5, x : x + 5] = 230
    return frames


def _track(predictor, frames, keep_outputs, limit=None):
    state = predictor.init_state(frames, keep_outputs=keep_outputs)
    predictor.add_new_points_or_box(state, 0, 1, points=[[4, 5]], labels=[1])
    predictor.add_new_points_or_box(state, 0, 2, points=[[12, 12]], labels=[1])
    masks, sizes, resident = [], {}, []
    for f, _, m in predictor.propagate_in_video(state, max_frame_num_to_track=limit):
        if f < 300:
            masks.append(m.clone())
        if f % SAMPLE_EVERY == 0:
            sizes[f] = state.tensor_bytes()
            resident.append(getattr(state["images"], "num_resident", 0))
    return state, masks, sizes, resident


@pytest.fixture(scope="module")
def keep_all(predictor, stream):
    """The default policy over the first 300 frames."""
    return _track(predictor, stream, "all", limit=299)


def test_default_keeps_everything_and_grows(keep_all):
    _, _, sizes, _ = keep_all
    assert sizes[200] > sizes[100] > sizes[0], f"keep_outputs='all' should grow: {sizes}"


def test_reachable_outputs_stay_flat_over_a_long_stream(predictor, stream, keep_all):
    state, masks, sizes, resident = _track(predictor, stream, "reachable")
    assert len(sizes) == NUM_FRAMES // SAMPLE_EVERY
    settled = sizes[SAMPLE_EVERY]  # the memory / pointer windows are full by then
    late = {f: b for f, b in sizes.items() if f >= SAMPLE_EVERY}
    assert max(late.values()) <= settled, f"session tensor bytes kept growing: {late}"
    # only the windows are left: conditioning frame + num_maskmem / pointer reach
    kept = {len(obj.outputs["non_cond_frame_outputs"]) for obj in state.objects}
    assert max(kept) <= 2 * predictor.max_obj_ptrs_in_encoder, kept
    assert max(resident) <= 32, f"frame source holds {max(resident)} decoded frames"

    # dropping outputs forward tracking cannot reach changes no result
    full_masks = keep_all[1]
    assert len(full_masks) == len(masks) == 300
    for f, (a, b) in enumerate(zip(masks, full_masks)):
        assert torch.equal(a, b), f"frame {f}: keep_outputs='reachable' changed the masks"
    shown = torch.stack([(m > 0).any(dim=(1, 2, 3)) for m in masks])  # (300, 2)
    assert shown.any(), "the objects never appear: the comparison would be vacuous"
