"""SAM2Base parity with the official model: state dict, attributes, image features, the
prompt heads and the memory-selection pieces.

Both models hold the same sensitive random weights (``sensitize_``); ours is built entirely
from our config and modules (``sam2_base_harness``). Multi-frame tracking and its mutations
are in test_sam2_base_tracking.py.
"""

from __future__ import annotations

import pytest
import torch

from sam2_base_harness import SIZE, TOL, build_models, build_reference, random_frame, random_points
from support import rel_err

from sam2_fast.config import PRESETS, resolve_config
from sam2_fast.modeling.memory_select import memory_slot_frames, select_closest_cond_frames, sine_pe_1d
from sam2_fast.modeling.sam2_base import SAM2Base


# ----------------------------------------------------------------------------- static checks
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_state_dict_matches_reference(preset, monkeypatch):
    # built on the meta device (no memory, no init); Hiera calls .item() on a linspace
    linspace = torch.linspace
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
    with torch.device("meta"):
        ref = build_reference(preset, [])
        ours = SAM2Base(resolve_config(preset))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got.keys() == want.keys(), f"missing {sorted(want.keys() - got.keys())[:5]}, " \
                                      f"extra {sorted(got.keys() - want.keys())[:5]}"
    assert got == want
    # SAM2Base's own tensors come first, in the official order
    assert list(got)[:5] == list(want)[:5]


ATTRS = ("image_size", "num_maskmem", "hidden_dim", "mem_dim", "backbone_stride", "sam_image_embedding_size",
         "sam_prompt_embed_dim", "num_feature_levels", "use_high_res_features_in_sam",
         "directly_add_no_mem_embed", "max_cond_frames_in_attn", "memory_temporal_stride_for_eval",
         "use_obj_ptrs_in_encoder", "max_obj_ptrs_in_encoder", "add_tpos_enc_to_obj_ptrs",
         "proj_tpos_enc_in_obj_ptrs", "use_signed_tpos_enc_to_obj_ptrs", "only_obj_ptrs_in_the_past_for_eval",
         "pred_obj_scores", "fixed_no_obj_ptr", "soft_no_obj_ptr", "multimask_output_in_sam",
         "multimask_min_pt_num", "multimask_max_pt_num", "multimask_output_for_tracking",
         "use_multimask_token_for_obj_ptr", "sigmoid_scale_for_mem_enc", "sigmoid_bias_for_mem_enc",
         "binarize_mask_from_pts_for_mem_enc", "non_overlap_masks_for_mem_enc",
         "use_mask_input_as_output_without_sam", "sam_mask_decoder_extra_args")


@pytest.fixture(scope="module")
def tiny():
    return build_models()


def test_attributes_match_reference(tiny):
    ref, ours, _ = tiny
    for name in ATTRS:
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.device == torch.device("cpu")
    with pytest.raises(NotImplementedError):
        ours(torch.zeros(1))


@torch.no_grad()
def test_forward_image_and_backbone_features(tiny):
    ref, ours, _ = tiny
    img = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    r_out = ref._prepare_backbone_features(ref.forward_image(img))
    o_out = ours._prepare_backbone_features(ours.forward_image(img))
    assert o_out[3] == r_out[3]  # feat_sizes
    for level, (o, r) in enumerate(zip(o_out[1] + o_out[2], r_out[1] + r_out[2])):
        err = rel_err(o, r)
        assert err <= TOL, f"flattened feature/pos {level}: {err:.2e}"
    for o, r in zip(o_out[0]["backbone_fpn"], r_out[0]["backbone_fpn"]):
        assert o.shape == r.shape and rel_err(o, r) <= TOL



# ----------------------------------------------------------------------------- pieces
def test_select_closest_cond_frames_matches_reference():
    from sam2.modeling.sam2_utils import select_closest_cond_frames as ref_select

    gen = torch.Generator().manual_seed(5)
    for _ in range(200):
        frames = torch.randperm(40, generator=gen)[: int(torch.randint(1, 9, (1,), generator=gen))].tolist()
        cond = {t: f"out{t}" for t in frames}
        idx = int(torch.randint(0, 40, (1,), generator=gen))
        for limit in (-1, 2, 3, 5):
            got, want = select_closest_cond_frames(idx, cond, limit), ref_select(idx, cond, limit)
            assert list(got[0].items()) == list(want[0].items()) and got[1] == want[1]
    with pytest.raises(ValueError, match="max_cond_frames_in_attn"):
        select_closest_cond_frames(3, {0: 0, 1: 1, 2: 2}, 1)


def test_sine_pe_matches_reference():
    from sam2.modeling.sam2_utils import get_1d_sine_pe

    pos = torch.tensor([-7, -1, 0, 1, 3, 15]) / 15
    for dim in (64, 256):
        assert torch.equal(sine_pe_1d(pos, dim), get_1d_sine_pe(pos, dim))


def test_memory_slots_with_stride():
    # stride 3, forward from frame 20: the adjacent frame, then multiples of 3 from 18 down
    assert memory_slot_frames(20, 7, 3, False) == [(1, 6), (2, 9), (3, 12), (4, 15), (5, 18), (6, 19)]
    assert memory_slot_frames(20, 7, 3, True) == [(1, 36), (2, 33), (3, 30), (4, 27), (5, 24), (6, 21)]
    assert memory_slot_frames(9, 7, 1, False) == [(t, 9 - (7 - t)) for t in range(1, 7)]


@torch.no_grad()
def test_heads_with_resized_mask_prompt_and_non_overlap(tiny):
    ref, ours, hybrid = tiny
    gen = torch.Generator().manual_seed(21)
    feats = torch.randn(2, 256, SIZE // 16, SIZE // 16, generator=gen)
    high = [torch.randn(2, 32, SIZE // 4, SIZE // 4, generator=gen), torch.randn(2, 64, SIZE // 8, SIZE // 8, generator=gen)]
    mask = torch.randn(2, 1, SIZE, SIZE, generator=gen)  # full-size logits: resized with antialias
    pts = random_points(gen, 2, 3)
    for model, tol in ((hybrid, 0.0), (ours, TOL)):
        got = model._forward_sam_heads(feats, pts, mask, high, multimask_output=True)
        want = ref._forward_sam_heads(feats, pts, mask, high, multimask_output=True)
        for g, w in zip(got, want):
            assert rel_err(g, w) <= tol
    logits = torch.randn(3, 1, 9, 11, generator=gen) * 5
    assert torch.equal(ours._apply_non_overlapping_constraints(logits), ref._apply_non_overlapping_constraints(logits))


@torch.no_grad()
def test_prev_logits_and_no_memory_encoder(tiny):
    ref, ours, _ = tiny
    gen = torch.Generator().manual_seed(22)
    feats, pos, sizes = random_frame(gen, 1)
    pts = random_points(gen, 1, 2)
    prev = torch.randn(1, 1, SIZE // 4, SIZE // 4, generator=gen) * 4
    kw = dict(frame_idx=0, is_init_cond_frame=True, current_vision_feats=feats, current_vision_pos_embeds=pos,
              feat_sizes=sizes, point_inputs=pts, mask_inputs=None,
              output_dict={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}, num_frames=4,
              run_mem_encoder=False, prev_sam_mask_logits=prev)
    got, want = ours.track_step(**kw), ref.track_step(**kw)
    assert got["maskmem_features"] is None and got["maskmem_pos_enc"] is None
    for k in ("pred_masks", "obj_ptr", "object_score_logits"):
        assert rel_err(got[k], want[k]) <= TOL, k
    with pytest.raises(ValueError, match="prev_sam_mask_logits"):
        ours.track_step(**{**kw, "point_inputs": None})
    with pytest.raises(ValueError, match="cond_frame_outputs"):
        ours.track_step(**{**kw, "is_init_cond_frame": False, "prev_sam_mask_logits": None})
