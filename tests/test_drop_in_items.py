"""Issue 9, item by item: code written for the official package runs unchanged.

The value parity of each item with ``sam2`` (prompts past the border, the embedding cache,
float images, objects added inside the loop) is in ``test_drop_in_notebooks.py``; here each
item's contract is pinned, with mutations of the product code where a check could be
vacuous.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
import warnings

import numpy as np
import pytest
import torch

import video_utils as V
from image_harness import cached_pair, random_image
from support import sensitize_

from sam2_fast.image_prompts import PromptError
from sam2_fast.sam2_image_predictor import SAM2ImagePredictor

T21 = "configs/sam2.1/sam2.1_hiera_t.yaml"
S = 64
CLIP_HW = (37, 45)


@pytest.fixture(scope="module")
def threads():
    with V.single_thread():
        yield


@pytest.fixture(scope="module")
def image_pair(threads):
    ref, ours = cached_pair(T21)
    return ref, ours


@pytest.fixture(scope="module")
def video_predictor(threads):
    from sam2_fast.build_sam import build_sam2_video_predictor

    torch.manual_seed(0)
    return build_sam2_video_predictor("sam2.1_hiera_tiny", device="cpu",
                                      hydra_overrides_extra=[f"++model.image_size={S}"])


@pytest.fixture(scope="module")
def clip():
    return V.make_clip(6, *CLIP_HW, seed=3)


# ------------------------------------------------------------------------------ item 1
def test_item1_prompts_past_the_border_accepted_nan_rejected(image_pair, video_predictor, clip):
    _, model = image_pair
    pred = SAM2ImagePredictor(model)
    pred.set_image(random_image(50, 70, seed=2))
    for kwargs in (dict(point_coords=[[75, -3]], point_labels=[1]), dict(box=[-2, 5, 70.5, 53]),
                   dict(point_coords=[[1.2, 0.5]], point_labels=[1], normalize_coords=False)):
        masks, _, _ = pred.predict(**kwargs)
        assert masks.shape[-2:] == (50, 70)
    for bad in (dict(point_coords=[[np.nan, 3]], point_labels=[1]), dict(box=[0, 0, np.inf, 3]),
                dict(point_coords=[[1, 2, 3]], point_labels=[1])):
        with pytest.raises(PromptError):
            pred.predict(**bad)
    state = video_predictor.init_state(clip)
    _, ids, masks = video_predictor.add_new_points_or_box(state, 0, 1, points=[[50, -4]], labels=[1])
    assert ids == [1] and masks.shape == (1, 1) + CLIP_HW


# ------------------------------------------------------------------------------ item 2
def test_item2_image_state_is_plain_assignable_attributes(image_pair):
    _, model = image_pair
    a, b = SAM2ImagePredictor(model), SAM2ImagePredictor(model)
    assert (a._features, a._orig_hw, a._is_image_set) == (None, None, False)
    img = random_image(61, 83, seed=4)
    a.set_image(img)
    assert isinstance(a._features, dict) and set(a._features.keys()) == {"image_embed", "high_res_feats"}
    assert "image_embed" in a._features and len(a._features["high_res_feats"]) == 2
    assert a._orig_hw == [(61, 83)] and a._is_image_set is True
    want = a.predict(point_coords=[[30, 20]], point_labels=[1], return_logits=True)
    # the web-demo cache: features computed by one predictor restored into another
    b._features = {k: v for k, v in a._features.items()}
    b._orig_hw = [img.shape[:2]]
    b._is_image_set = True
    got = b.predict(point_coords=[[30, 20]], point_labels=[1], return_logits=True)
    assert all(np.array_equal(x, y) for x, y in zip(got, want))
    # a half-restored state is named, not a KeyError / TypeError from deep inside
    b._features = None
    with pytest.raises(RuntimeError, match="_features is not a dict"):
        b.predict(point_coords=[[30, 20]], point_labels=[1])
    b._features, b._orig_hw = a._features, None
    with pytest.raises(RuntimeError, match="_orig_hw must list"):
        b.predict(point_coords=[[30, 20]], point_labels=[1])
    b.reset_predictor()
    assert (b._features, b._orig_hw, b._is_image_set) == (None, None, False)


# ------------------------------------------------------------------------------ item 3
def test_item3_float_image_in_unit_range_same_as_uint8(image_pair):
    from image_harness import ref_image_predictor

    ref_model, model = image_pair
    img = random_image(45, 60, seed=6)
    ours, ref = SAM2ImagePredictor(model), ref_image_predictor(ref_model)
    ours.set_image(img)
    want = ours.predict(point_coords=[[20, 20]], point_labels=[1], return_logits=True)
    for image in (img.astype(np.float32) / 255, img / 255.0):
        ours.set_image(image)
        got = ours.predict(point_coords=[[20, 20]], point_labels=[1], return_logits=True)
        assert all(np.array_equal(x, y) for x, y in zip(got, want))
    ref.set_image(img.astype(np.float32) / 255)  # the official predictor takes it the same way
    torch.testing.assert_close(ref.get_image_embedding(), ours.get_image_embedding(), rtol=1e-4, atol=1e-5)
    doc = SAM2ImagePredictor.set_image.__doc__
    assert "0.0..1.0" in doc and "0..255" in doc
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        ours.set_image(img.astype(np.float32))


# ------------------------------------------------------------------------------ item 4
MISC_NAMES = ("load_video_frames", "fill_holes_in_mask_scores", "get_connected_components", "mask_to_box",
              "concat_points", "get_sdpa_settings")


def test_item4_utils_misc_same_names_and_signatures():
    import sam2.utils.misc as ref_misc

    import sam2_fast.utils.misc as misc

    for name in MISC_NAMES:
        ref_sig, sig = inspect.signature(getattr(ref_misc, name)), inspect.signature(getattr(misc, name))
        assert list(ref_sig.parameters) == list(sig.parameters), name
        assert [p.default for p in ref_sig.parameters.values()] == [p.default for p in sig.parameters.values()], name
    assert misc.get_sdpa_settings() == ref_misc.get_sdpa_settings()


def test_item4_utils_misc_same_results(tmp_path, clip):
    import sam2.utils.misc as ref_misc

    import sam2_fast.utils.misc as misc

    folder = V.write_jpeg_folder(clip, str(tmp_path / "v"))
    want, h, w = ref_misc.load_video_frames(folder, 32, True, compute_device=torch.device("cpu"))
    got, h2, w2 = misc.load_video_frames(folder, 32, True, compute_device=torch.device("cpu"))
    assert (h, w) == (h2, w2) == CLIP_HW and torch.equal(got, want)  # bitwise
    lazy, _, _ = misc.load_video_frames(folder, 32, True, async_loading_frames=True, compute_device="cpu")
    assert len(lazy) == len(want) and torch.equal(lazy[3], want[3])

    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.normal(0.3, 1.0, (3, 1, 24, 24)).astype(np.float32))
    masks = scores > 0.8
    labels, areas = misc.get_connected_components(masks)
    ref_labels, ref_areas = V.scipy_components(masks)  # the official kernel's contract
    assert torch.equal(areas, ref_areas)
    for n in range(masks.shape[0]):  # the same partition of each image (ids may differ)
        pairs = {(int(a), int(b)) for a, b in zip(labels[n].flatten(), ref_labels[n].flatten())}
        assert len({a for a, _ in pairs}) == len({b for _, b in pairs}) == len(pairs) > 2
    undo = V.install_scipy_components()  # the reference's fill needs its extension otherwise
    try:
        assert torch.equal(misc.fill_holes_in_mask_scores(scores, 8), ref_misc.fill_holes_in_mask_scores(scores, 8))
    finally:
        undo()
    boxed = torch.zeros(4, 1, 9, 11, dtype=torch.bool)
    boxed[0, 0, 2:5, 3:8] = True
    boxed[1, 0, 8, 0] = True
    boxed[3] = True  # [2] stays empty
    assert torch.equal(misc.mask_to_box(boxed), ref_misc.mask_to_box(boxed))
    old = {"point_coords": torch.ones(1, 2, 2), "point_labels": torch.ones(1, 2, dtype=torch.int32)}
    new_p, new_l = torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.int32)
    for prev in (None, old):
        a, b = misc.concat_points(prev, new_p, new_l), ref_misc.concat_points(prev, new_p, new_l)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_item4_vos_alias():
    from sam2_fast.build_sam import build_sam2_video_predictor
    from sam2_fast.sam2_video_predictor import SAM2VideoPredictor, SAM2VideoPredictorVOS

    assert issubclass(SAM2VideoPredictorVOS, SAM2VideoPredictor)
    pred = build_sam2_video_predictor("sam2.1_hiera_tiny", device="cpu", vos_optimized=True,
                                      hydra_overrides_extra=["++model.image_size=64"])
    assert isinstance(pred, SAM2VideoPredictorVOS) and "runtime_info" in pred.__dict__
    plain = build_sam2_video_predictor("sam2.1_hiera_tiny", device="cpu", hydra_overrides_extra=["++model.image_size=64"])
    assert type(plain) is SAM2VideoPredictor


# ------------------------------------------------------------------------------ item 5
OFFICIAL_KEYS = ["images", "num_frames", "offload_video_to_cpu", "offload_state_to_cpu", "video_height",
                 "video_width", "device", "storage_device", "point_inputs_per_obj", "mask_inputs_per_obj",
                 "cached_features", "constants", "obj_id_to_idx", "obj_idx_to_id", "obj_ids",
                 "output_dict_per_obj", "temp_output_dict_per_obj", "frames_tracked_per_obj"]


def test_item5_state_is_a_read_only_mapping_over_the_official_keys(video_predictor, clip):
    from collections.abc import Mapping

    state = video_predictor.init_state(clip)
    video_predictor.add_new_points_or_box(state, 0, 1, points=[[10, 12]], labels=[1])
    assert isinstance(state, Mapping) and list(state) == OFFICIAL_KEYS and len(state) == len(OFFICIAL_KEYS)
    assert list(state.keys()) == OFFICIAL_KEYS and "obj_ids" in state and "nope" not in state
    items = dict(state.items())
    assert items["obj_ids"] == [1] and items["obj_id_to_idx"] == {1: 0}
    assert 0 in state["point_inputs_per_obj"][0] and state.get("nope", 5) == 5
    with pytest.raises(TypeError, match="read-only"):
        state["num_frames"] = 3
    with pytest.raises(TypeError, match="read-only"):
        del state["obj_ids"]
    images = state["images"]
    assert images.shape == (6, 3, S, S) and len(images) == 6 and images.dtype == torch.float32
    assert images[-1].shape == (3, S, S) and images[1:4].shape == (3, 3, S, S) and images[[0, 5]].shape[0] == 2
    assert torch.equal(images[2:3][0], images[2])


def test_item5_images_sized_without_loading_every_frame(video_predictor):
    frames = np.random.default_rng(0).integers(0, 255, (300, 12, 14, 3), dtype=np.uint8)
    state = video_predictor.init_state(frames)
    images = state["images"]
    assert images.shape == (300, 3, S, S) and images.numel() == 300 * 3 * S * S
    assert images.num_resident <= images.cache_size < 300


def test_item5_deepcopy_and_pickle_continue_identically(video_predictor, clip):
    state = video_predictor.init_state(list(clip))
    video_predictor.add_new_points_or_box(state, 0, 1, points=[[10, 12]], labels=[1])
    video_predictor.add_new_points_or_box(state, 2, 2, box=[20, 5, 40, 30])
    copied, unpickled = copy.deepcopy(state), pickle.loads(pickle.dumps(state))
    assert copied.images is not state.images and copied["obj_ids"] == unpickled["obj_ids"] == [1, 2]
    state.images.close()  # the copies reopened the video: they do not share the source
    runs = [[m for _, _, m in video_predictor.propagate_in_video(s)] for s in (copied, unpickled)]
    fresh = video_predictor.init_state(list(clip))
    video_predictor.add_new_points_or_box(fresh, 0, 1, points=[[10, 12]], labels=[1])
    video_predictor.add_new_points_or_box(fresh, 2, 2, box=[20, 5, 40, 30])
    want = [m for _, _, m in video_predictor.propagate_in_video(fresh)]
    for run in runs:
        assert len(run) == len(want) and all(torch.equal(a, b) for a, b in zip(run, want))


# ------------------------------------------------------------------------------ item 6
def test_item6_objects_added_in_the_loop_join_next_call_removed_ones_stop_it(video_predictor, clip):
    state = video_predictor.init_state(clip)
    video_predictor.add_new_points_or_box(state, 0, 1, points=[[10, 12]], labels=[1])
    seen = []
    for f, ids, masks in video_predictor.propagate_in_video(state):
        seen.append((f, list(ids), masks.shape[0]))
        if f == 1:
            video_predictor.add_new_points_or_box(state, f, 2, points=[[30, 20]], labels=[1])
    assert seen == [(f, [1], 1) for f in range(6)]
    assert [(f, ids) for f, ids, _ in video_predictor.propagate_in_video(state, max_frame_num_to_track=2)] == \
        [(0, [1, 2]), (1, [1, 2]), (2, [1, 2])]
    with pytest.raises(RuntimeError, match=r"\[2\] were removed .* call propagate_in_video again"):
        for f, _, _ in video_predictor.propagate_in_video(state):
            if f == 2:
                video_predictor.remove_object(state, 2)
    assert [f for f, _, _ in video_predictor.propagate_in_video(state, max_frame_num_to_track=1)] == [0, 1]
    with pytest.raises(RuntimeError, match="removed"):
        for f, _, _ in video_predictor.propagate_in_video(state):
            video_predictor.reset_state(state)
    video_predictor.add_new_points_or_box(state, 0, 3, points=[[10, 12]], labels=[1])
    assert len(list(video_predictor.propagate_in_video(state))) == 6


# ------------------------------------------------------------------------------ item 7
def test_item7_one_box_and_label_check_for_both_predictors(monkeypatch, image_pair, video_predictor, clip):
    import sam2_fast.image_prompts as IP

    _, model = image_pair
    pred = SAM2ImagePredictor(model)
    pred.set_image(random_image(40, 40, seed=1))
    state = video_predictor.init_state(clip)
    calls = {
        "image": lambda **kw: pred.predict(**kw),
        "video": lambda **kw: video_predictor.add_new_points_or_box(
            state, 0, 1, **{{"point_coords": "points", "point_labels": "labels"}.get(k, k): v for k, v in kw.items()}),
    }
    messages = {}
    for name, call in calls.items():
        with pytest.raises(PromptError, match=r"x0 <= x1 and y0 <= y1") as box_err:
            call(box=[30, 5, 10, 20])
        with pytest.raises(PromptError, match=r"must be integers .*\['yes'\]") as label_err:
            call(point_coords=[[5, 5]], point_labels=["yes"])
        messages[name] = (str(box_err.value), str(label_err.value).split(" must")[1])
    assert messages["image"] == messages["video"]
    # one place: with the shared corner check gone, both predictors take the swapped box
    monkeypatch.setattr(IP, "check_box_corners", lambda corners: None)
    for call in calls.values():
        call(box=[30, 5, 10, 20])


# ------------------------------------------------------------------------------ item 8
def _faststart_mp4(path: str, frames: np.ndarray) -> bytes:
    """An mp4 with its index first (as streamed / web videos are), so a cut file still opens."""
    import av

    with av.open(path, "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=10, options={"x264-params": "bframes=2:b-adapt=0"})
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.codec_context.gop_size = 6
        for a in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return open(path, "rb").read()


def test_item8_truncated_mp4_has_the_decodable_frame_count(tmp_path, video_predictor):
    pytest.importorskip("av")
    frames = V.make_clip(30, 48, 64, seed=2)
    data = _faststart_mp4(str(tmp_path / "full.mp4"), frames)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.warns(UserWarning, match=r"frames are indexed but only the first \d+ decode"):
        state = video_predictor.init_state(str(cut))
    n = state["num_frames"]
    assert 0 < n < 30 and state.images._decoder.dropped_tail > 0
    full = video_predictor.init_state(str(tmp_path / "full.mp4"))
    assert full["num_frames"] == 30
    for t in (n - 1, 0, n // 2):  # every frame reported decodes, and is the full file's frame
        assert torch.equal(state["images"][t], full["images"][t])
    video_predictor.add_new_points_or_box(state, n - 1, 1, points=[[20, 20]], labels=[1])
    assert len(list(video_predictor.propagate_in_video(state, start_frame_idx=n - 1, reverse=True))) == n


@pytest.fixture(scope="module")
def mini_predictor():
    """The miniature SAM 2.1 of test_video_memory_bound (long streams in seconds)."""
    from sam2_fast.config import PRESETS, HieraConfig
    from sam2_fast.sam2_video_predictor import SAM2VideoPredictor

    trunk = HieraConfig(embed_dim=16, num_heads=1, stages=(1, 1, 1, 1), global_att_blocks=(2,),
                        window_spec=(8, 4, 4, 2), window_pos_embed_bkg_spatial_size=(2, 2))
    cfg = dataclasses.replace(PRESETS["sam2.1_hiera_tiny"], image_size=32, trunk=trunk, d_model=64,
                              mem_dim=32, mem_attn_layers=1, mem_attn_ffn_dim=64)
    torch.manual_seed(0)
    return sensitize_(SAM2VideoPredictor(cfg), seed=0).eval()


def test_item8_prompt_on_a_dropped_frame_warns(mini_predictor):
    frames = np.random.default_rng(1).integers(0, 200, (40, 16, 16, 3), dtype=np.uint8)
    for policy in ("reachable", "all"):
        state = mini_predictor.init_state(frames, keep_outputs=policy)
        mini_predictor.add_new_points_or_box(state, 0, 1, points=[[4, 5]], labels=[1])
        list(mini_predictor.propagate_in_video(state))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mini_predictor.add_new_points_or_box(state, 38, 1, points=[[8, 8]], labels=[1])  # still kept
            mini_predictor.add_new_points_or_box(state, 3, 1, points=[[8, 8]], labels=[0])
        dropped = [w for w in caught if "outputs were dropped" in str(w.message)]
        if policy == "all":
            assert not dropped  # a correction, as documented
            continue
        assert len(dropped) == 1 and "frame 3 of object 1" in str(dropped[0].message)
        obj = state.objects[0]
        assert obj.was_dropped(3) and not obj.was_dropped(0) and not obj.was_dropped(38)
        assert 3 in state["temp_output_dict_per_obj"][0]["cond_frame_outputs"]  # a new conditioning frame
