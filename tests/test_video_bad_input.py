"""Bad input to the video predictor: each gets a clear error and the session stays usable."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import video_utils as V

S = 64
NUM_FRAMES = 6


@pytest.fixture(scope="module")
def predictor():
    from sam2_fast.build_sam import build_sam2_video_predictor

    with V.single_thread():
        torch.manual_seed(0)
        yield build_sam2_video_predictor("sam2.1_hiera_tiny", device="cpu",
                                         hydra_overrides_extra=[f"++model.image_size={S}"])


@pytest.fixture(scope="module")
def clip():
    return V.make_clip(NUM_FRAMES, 37, 45, seed=3)


@pytest.fixture()
def state(predictor, clip):
    return predictor.init_state(list(clip))


def _still_usable(predictor, state, obj_id=1):
    """A valid click and a short propagation work after the error."""
    f, ids, masks = predictor.add_new_points_or_box(state, 0, obj_id, points=[[10, 12]], labels=[1])
    assert f == 0 and obj_id in ids and masks.shape == (len(ids), 1, 37, 45)
    frames = [f for f, _, _ in predictor.propagate_in_video(state, max_frame_num_to_track=2)]
    assert frames == [0, 1, 2]


# ------------------------------------------------------------------------------ videos
def test_missing_video(predictor, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predictor.init_state(str(tmp_path / "nope.mp4"))


def test_empty_video_file(predictor, tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        predictor.init_state(str(path))


def test_unreadable_video_file(predictor, tmp_path):
    path = tmp_path / "garbage.mp4"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="video"):
        predictor.init_state(str(path))


def test_folder_without_frames(predictor, tmp_path):
    (tmp_path / "notes.txt").write_text("no frames here")
    with pytest.raises(ValueError, match="no JPEG frames"):
        predictor.init_state(str(tmp_path))


def test_unreadable_first_frame(predictor, tmp_path, clip):
    folder = V.write_jpeg_folder(clip, str(tmp_path / "v"))
    with open(os.path.join(folder, "00000.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(ValueError, match="frame 0"):
        predictor.init_state(folder)


def test_unreadable_frame_mid_video_keeps_state(predictor, tmp_path, clip):
    folder = V.write_jpeg_folder(clip, str(tmp_path / "v"))
    with open(os.path.join(folder, "00004.jpg"), "wb") as f:
        f.write(b"broken")
    state = predictor.init_state(folder)
    predictor.add_new_points_or_box(state, 0, 1, points=[[10, 12]], labels=[1])
    with pytest.raises(ValueError, match="frame 4"):
        for _ in predictor.propagate_in_video(state):
            pass
    _still_usable(predictor, state)


def test_mixed_frame_sizes(predictor, clip):
    frames = list(clip)
    frames[2] = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(ValueError, match="frame 2"):
        predictor.init_state(frames)


# ------------------------------------------------------------------------------ prompts
def test_frame_index_out_of_range(predictor, state):
    with pytest.raises(IndexError, match="out of range"):
        predictor.add_new_points_or_box(state, NUM_FRAMES, 1, points=[[10, 12]], labels=[1])
    with pytest.raises(IndexError, match="out of range"):
        predictor.add_new_mask(state, -1, 1, mask=np.ones((37, 45), bool))
    with pytest.raises(IndexError, match="out of range"):
        predictor.clear_all_prompts_in_frame(state, 99, 1)
    assert state["obj_ids"] == []  # nothing was registered by the failed calls
    _still_usable(predictor, state)
    predictor.add_new_points_or_box(state, 3, 2, points=[[20, 12]], labels=[1])
    with pytest.raises(IndexError, match="out of range"):
        next(iter(predictor.propagate_in_video(state, start_frame_idx=NUM_FRAMES)))
    with pytest.raises(ValueError, match="max_frame_num_to_track"):
        next(iter(predictor.propagate_in_video(state, max_frame_num_to_track=-2)))
    assert 3 in state["temp_output_dict_per_obj"][1]["cond_frame_outputs"]  # nothing merged yet
    _still_usable(predictor, state)


def test_unknown_object_id(predictor, state):
    predictor.add_new_points_or_box(state, 0, 1, points=[[10, 12]], labels=[1])
    with pytest.raises(RuntimeError, match="object id 7"):
        predictor.remove_object(state, 7, strict=True)
    with pytest.raises(LookupError, match="unknown object id 7"):
        predictor.clear_all_prompts_in_frame(state, 0, 7)
    assert predictor.remove_object(state, 7) == ([1], [])  # not strict: a no-op, as the reference
    assert state["obj_ids"] == [1]
    _still_usable(predictor, state)


def test_points_without_labels(predictor, state):
    with pytest.raises(ValueError, match="without labels"):
        predictor.add_new_points_or_box(state, 0, 1, points=[[10, 12]])
    with pytest.raises(ValueError, match="without points"):
        predictor.add_new_points_or_box(state, 0, 1, labels=[1])
    with pytest.raises(ValueError, match="one label per point"):
        predictor.add_new_points_or_box(state, 0, 1, points=[[10, 12], [3, 4]], labels=[1])
    with pytest.raises(ValueError, match=r"unknown labels \[5\]"):
        predictor.add_new_points_or_box(state, 0, 1, points=[[10, 12]], labels=[5])
    with pytest.raises(ValueError, match=r"labels must be integers .*\['yes'\]"):
        predictor.add_new_points_or_box(state, 0, 1, points=[[10, 12]], labels=["yes"])
    with pytest.raises(ValueError, match="labels must be integers"):
        predictor.add_new_points_or_box(state, 0, 1, points=[[10, 12]], labels=[0.5])
    assert state["obj_ids"] == []
    _still_usable(predictor, state)


def test_empty_prompt(predictor, state):
    with pytest.raises(ValueError, match="empty prompt"):
        predictor.add_new_points_or_box(state, 0, 1)
    with pytest.raises(ValueError, match="empty prompt"):
        predictor.add_new_points_or_box(state, 0, 1, points=np.zeros((0, 2)), labels=np.zeros(0))
    with pytest.raises(ValueError, match="empty prompt"):
        predictor.add_new_mask(state, 0, 1, mask=np.zeros((0, 0), bool))
    with pytest.raises(ValueError, match="box must hold 4"):
        predictor.add_new_points_or_box(state, 0, 1, box=[1, 2, 3])
    with pytest.raises(ValueError, match="2-D"):
        predictor.add_new_mask(state, 0, 1, mask=np.ones((2, 37, 45), bool))
    assert state["obj_ids"] == []
    _still_usable(predictor, state)


def test_points_outside_the_frame_are_accepted_nan_and_swapped_boxes_are_not(predictor, state):
    """Issue 9: clicks and box corners past the border are prompts (as in the official
    predictor; parity in test_drop_in.py); what cannot be a coordinate is rejected."""
    w, h = state["video_width"], state["video_height"]
    with pytest.raises(ValueError, match="NaN or infinite"):
        predictor.add_new_points_or_box(state, 0, 1, points=[[float("nan"), 3]], labels=[1])
    with pytest.raises(ValueError, match="NaN or infinite"):
        predictor.add_new_points_or_box(state, 0, 1, box=[0, 0, float("inf"), h])
    with pytest.raises(ValueError, match="x0 <= x1 and y0 <= y1"):
        predictor.add_new_points_or_box(state, 0, 1, box=[w, 0, 0, h])
    with pytest.raises(ValueError, match="must be numbers"):
        predictor.add_new_points_or_box(state, 0, 1, points=[["left", 3]], labels=[1])
    assert state["obj_ids"] == []
    _, ids, masks = predictor.add_new_points_or_box(state, 0, 1, points=[[w + 5, 3], [4, -1]], labels=[1, 0])
    _, ids, masks = predictor.add_new_points_or_box(state, 0, 2, box=[-0.5, 0, w + 0.5, h + 10])
    _, ids, masks = predictor.add_new_points_or_box(state, 0, 3, points=[[0.5, 1.5]], labels=[1],
                                                    normalize_coords=False)
    assert ids == [1, 2, 3] and masks.shape == (3, 1, h, w)
    _still_usable(predictor, state)


def test_propagate_without_prompts(predictor, state):
    with pytest.raises(RuntimeError, match="No input points or masks"):
        next(iter(predictor.propagate_in_video(state)))
    _still_usable(predictor, state)


def test_object_without_prompts_after_clearing(predictor, state):
    predictor.add_new_points_or_box(state, 0, 1, points=[[10, 12]], labels=[1])
    predictor.add_new_points_or_box(state, 0, 2, points=[[30, 20]], labels=[1])
    predictor.clear_all_prompts_in_frame(state, 0, 2)
    with pytest.raises(RuntimeError, match="object id 2"):
        next(iter(predictor.propagate_in_video(state)))
    predictor.remove_object(state, 2)
    _still_usable(predictor, state)


def test_dict_style_access(predictor, state):
    assert state["num_frames"] == NUM_FRAMES
    assert (state["video_height"], state["video_width"]) == (37, 45)
    with pytest.raises(KeyError, match="readable keys"):
        state["no_such_key"]
    with pytest.raises(ValueError, match="keep_outputs"):
        predictor.init_state(np.zeros((2, 8, 8, 3), np.uint8), keep_outputs="some")
