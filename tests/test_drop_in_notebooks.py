"""The official notebooks' code paths, run unchanged through ``sam2`` and ``sam2_fast``.

``image_notebook`` and ``video_notebook`` below are the calls of
``notebooks/image_predictor_example.ipynb`` and ``notebooks/video_predictor_example.ipynb``
(coordinates moved onto our frames), plus what downstream code does with the same API:
the embedding cache of web demos, boxes past the border from a detector, float images,
reverse tracking, clearing / removing objects, mask prompts and an object added inside
the propagation loop. Each flow gets its package's builders and predictor class (the
import swapped) and one official-format checkpoint with sensitive random weights; every
returned mask, score and logit must agree to 1e-4 relative (fp32; measured ~1e-6, see
the printed numbers).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import drop_in_harness as H
import video_utils as V

TOL = 1e-4


@pytest.fixture(scope="module")
def threads():
    with V.single_thread():
        yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, threads):
    return H.write_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "sam2.1_hiera_tiny.pt"))


@pytest.fixture(scope="module")
def frames():
    return H.bikes_frames()


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory, frames):
    return V.write_jpeg_folder(frames, str(tmp_path_factory.mktemp("video")))


# ------------------------------------------------------------------------------ image
def image_notebook(SAM2ImagePredictor, model, image, image2):
    """image_predictor_example.ipynb, step by step (plus the embedding cache of web demos)."""
    out = []
    h, w = image.shape[:2]
    predictor = SAM2ImagePredictor(model)
    predictor.set_image(image)

    # a single click, three masks; keep the best one's logits for the next call
    input_point = np.array([[0.45 * w, 0.55 * h]])
    input_label = np.array([1])
    masks, scores, logits = predictor.predict(point_coords=input_point, point_labels=input_label,
                                              multimask_output=True, return_logits=True)
    sorted_ind = np.argsort(scores)[::-1]
    masks, scores, logits = masks[sorted_ind], scores[sorted_ind], logits[sorted_ind]
    out.append(("click", (masks, scores, logits)))

    # a second click with the previous mask as input, one mask out
    input_point = np.array([[0.45 * w, 0.55 * h], [0.7 * w, 0.3 * h]])
    input_label = np.array([1, 1])
    mask_input = logits[np.argmax(scores), :, :]
    out.append(("two clicks + mask_input", predictor.predict(
        point_coords=input_point, point_labels=input_label, mask_input=mask_input[None, :, :],
        multimask_output=False, return_logits=True)))
    input_label = np.array([1, 0])  # the second one negative
    out.append(("negative click", predictor.predict(
        point_coords=input_point, point_labels=input_label, mask_input=mask_input[None, :, :],
        multimask_output=False, return_logits=True)))

    # a box, then a box with a negative click
    input_box = np.array([0.2 * w, 0.25 * h, 0.6 * w, 0.9 * h])
    out.append(("box", predictor.predict(point_coords=None, point_labels=None, box=input_box[None, :],
                                         multimask_output=False, return_logits=True)))
    out.append(("box + click", predictor.predict(point_coords=np.array([[0.4 * w, 0.5 * h]]),
                                                 point_labels=np.array([0]), box=input_box,
                                                 multimask_output=False, return_logits=True)))

    # several boxes at once (a torch tensor, as the notebook does), one reaching past the border
    input_boxes = torch.tensor([[0.05 * w, 0.1 * h, 0.5 * w, 0.8 * h], [0.3 * w, 0.3 * h, 0.7 * w, 0.6 * h],
                                [0.6 * w, 0.2 * h, w + 0.5, h + 3.0]])
    out.append(("batched boxes", predictor.predict(point_coords=None, point_labels=None, box=input_boxes,
                                                   multimask_output=False, return_logits=True)))
    out.append(("click past the border", predictor.predict(
        point_coords=np.array([[w + 4.0, 0.5 * h], [-2.0, 0.1 * h]]), point_labels=np.array([1, 0]),
        return_logits=True)))

    # web-demo embedding cache: store the embedding, embed something else, restore, predict
    saved_features, saved_hw = predictor._features, predictor._orig_hw
    predictor.set_image(image2)
    out.append(("second image", predictor.predict(point_coords=np.array([[40, 30]]),
                                                  point_labels=np.array([1]), return_logits=True)))
    predictor.reset_predictor()
    predictor._features = saved_features
    predictor._orig_hw = [image.shape[:2]]
    predictor._is_image_set = True
    out.append(("restored embedding", predictor.predict(point_coords=np.array([[0.45 * w, 0.55 * h]]),
                                                        point_labels=np.array([1]), return_logits=True)))
    assert [tuple(hw) for hw in saved_hw] == [image.shape[:2]]

    # the same picture as float32 in [0, 1]
    predictor.set_image(image.astype(np.float32) / 255.0)
    out.append(("float image", predictor.predict(point_coords=input_point[:1], point_labels=input_label[:1],
                                                 return_logits=True)))

    # batched images: boxes per image, then clicks per image
    predictor.set_image_batch([image, image2])
    boxes2 = np.array([[10, 10, 80, 60], [50, 40, 120, 90]])
    out.append(("predict_batch boxes", predictor.predict_batch(
        None, None, box_batch=[input_box[None], boxes2], multimask_output=False, return_logits=True)))
    out.append(("predict_batch clicks", predictor.predict_batch(
        [input_point, np.array([[40, 30]])], [np.array([1, 0]), np.array([1])], return_logits=True)))
    return out


@pytest.fixture(scope="module")
def images():
    return H.two_images()


@pytest.fixture(scope="module")
def image_runs(ckpt, images, threads):
    """Image notebook records of the reference (computed once) and a runner for ours."""
    expect = H.records_of(image_notebook(*H.build_image("sam2", ckpt), *images))
    ours = H.build_image("sam2_fast", ckpt)
    return expect, lambda: H.records_of(image_notebook(*ours, *images))


def test_image_notebook_same_results(image_runs):
    expect, run_ours = image_runs
    got = run_ours()
    worst = V.compare_records(got, expect, TOL)
    print(f"image notebook: {len(expect)} outputs, worst rel err {worst:.2e}")
    # the restored embedding is the first image's: the first click again, bitwise (unsorted)
    rec = {(name, j): t for name, j, _, t in got}
    order = torch.argsort(rec[("restored embedding[1]", 0)], descending=True)
    assert torch.equal(rec[("restored embedding[0]", 0)][order], rec[("click[0]", 0)])
    assert not torch.equal(rec[("second image[1]", 0)], rec[("restored embedding[1]", 0)])


def test_mutation_clamping_boxes_to_the_image_is_caught(monkeypatch, image_runs, images):
    """A "helpful" clamp of boxes that reach past the border (what issue 9 item 1 rules
    out) changes the notebook's outputs far beyond the tolerance."""
    import sam2_fast.sam2_image_predictor as image_predictor

    real = image_predictor.check_box
    h, w = images[0].shape[:2]  # every box past a border lies on this image

    def clamped(box):
        return np.clip(real(box), 0.0, np.array([w, h], dtype=np.float64))

    monkeypatch.setattr(image_predictor, "check_box", clamped)
    expect, run_ours = image_runs
    with pytest.raises(AssertionError, match="rel err"):
        V.compare_records(run_ours(), expect, TOL)


# ------------------------------------------------------------------------------ video
def video_notebook(predictor, video_dir, frames):
    """video_predictor_example.ipynb, step by step, plus the calls downstream tools make."""
    h, w = frames.shape[1:3]
    last = len(frames) - 1

    class Outputs(list):
        def append(self, item):  # copy now: the reference's obj_ids list changes later
            name, (frame_idx, obj_ids, masks) = item
            super().append((name, (frame_idx, list(obj_ids), masks.clone())))

    out = Outputs()

    def track(name, **kwargs):
        for frame_idx, obj_ids, mask_logits in predictor.propagate_in_video(inference_state, **kwargs):
            out.append((name, (frame_idx, obj_ids, mask_logits)))

    inference_state = predictor.init_state(video_path=video_dir)
    predictor.reset_state(inference_state)

    # Example 1: one click, then a second click to refine, then track
    ann_frame_idx, ann_obj_id = 0, 1
    points = np.array([[0.55 * w, 0.6 * h]], dtype=np.float32)
    labels = np.array([1], np.int32)
    out.append(("click", predictor.add_new_points_or_box(inference_state=inference_state, frame_idx=ann_frame_idx,
                                                         obj_id=ann_obj_id, points=points, labels=labels)))
    points = np.array([[0.55 * w, 0.6 * h], [0.6 * w, 0.4 * h]], dtype=np.float32)
    labels = np.array([1, 1], np.int32)
    out.append(("refine", predictor.add_new_points_or_box(inference_state=inference_state, frame_idx=ann_frame_idx,
                                                          obj_id=ann_obj_id, points=points, labels=labels)))
    track("propagate")
    # a negative click on a tracked frame corrects it; track again
    out.append(("correct", predictor.add_new_points_or_box(inference_state, frame_idx=5, obj_id=ann_obj_id,
                                                           points=np.array([[0.3 * w, 0.7 * h]], np.float32),
                                                           labels=np.array([0], np.int32))))
    track("propagate after correction")

    # Example 2: a box (past the right border, as detectors give), then box + click
    predictor.reset_state(inference_state)
    box = np.array([0.45 * w, 0.1 * h, w + 0.5, 0.95 * h], dtype=np.float32)
    out.append(("box", predictor.add_new_points_or_box(inference_state, 0, 4, box=box)))
    out.append(("box + click", predictor.add_new_points_or_box(inference_state, 0, 4, box=box,
                                                               points=np.array([[0.7 * w, 0.3 * h]], np.float32),
                                                               labels=np.array([1], np.int32))))
    track("propagate box")

    # Example 3: several objects, then reverse from the last frame
    predictor.reset_state(inference_state)
    out.append(("obj 2", predictor.add_new_points_or_box(inference_state, 0, 2, points=np.array(
        [[0.3 * w, 0.5 * h], [0.4 * w, 0.3 * h]], np.float32), labels=np.array([1, 0], np.int32))))
    out.append(("obj 3", predictor.add_new_points_or_box(inference_state, 2, 3, points=np.array(
        [[0.75 * w, 0.55 * h]], np.float32), labels=np.array([1], np.int32))))
    track("propagate two objects")
    out.append(("click on last", predictor.add_new_points_or_box(inference_state, last, 3, points=np.array(
        [[0.8 * w, 0.5 * h]], np.float32), labels=np.array([1], np.int32))))
    track("reverse", start_frame_idx=last, reverse=True)

    # an object added inside the loop joins from the next call
    for frame_idx, obj_ids, mask_logits in predictor.propagate_in_video(inference_state):
        out.append(("loop", (frame_idx, obj_ids, mask_logits)))
        if frame_idx == 3:
            out.append(("added in loop", predictor.add_new_points_or_box(
                inference_state, frame_idx, "late", points=np.array([[0.2 * w, 0.8 * h]], np.float32),
                labels=np.array([1], np.int32))))
    track("propagate with late object", max_frame_num_to_track=4)

    # clear an object's prompts on a frame, remove an object, a mask prompt from a tracked mask
    out.append(("clear", predictor.clear_all_prompts_in_frame(inference_state, last, 3)))
    obj_ids, updated = predictor.remove_object(inference_state, 2)
    for frame_idx, masks in updated:
        out.append(("remove", (frame_idx, obj_ids, masks)))
    mask = (out[-1][1][2][0, 0] > 0).cpu().numpy() if updated else np.zeros((h, w), bool)
    mask[: h // 3, : w // 3] = True
    out.append(("mask", predictor.add_new_mask(inference_state, 1, 7, mask)))
    track("propagate after mask")
    return out


def test_video_notebook_same_results(ckpt, video_dir, frames, threads):
    ref = H.build_video("sam2", ckpt)
    ours = H.build_video("sam2_fast", ckpt)
    with H.reference_cpu_patches(ref):
        expect = H.records_of(video_notebook(ref, video_dir, frames))
        got = H.records_of(video_notebook(ours, video_dir, frames))
    tracked = [("propagate",) + r[1:] for r in expect if r[0].startswith(("propagate", "reverse", "loop"))]
    present, absent = V.presence(tracked)
    assert present > absent > 0, f"weights must keep objects mostly present: {present} present, {absent} absent"
    worst = V.compare_records(got, expect, TOL)
    steps = sorted({name for name, *_ in expect})
    print(f"video notebook: {len(expect)} outputs over {steps}; worst rel err {worst:.2e}")
    loop = [ids for name, _, ids, _ in expect if name == "loop"]
    assert loop and all(ids == loop[0] for ids in loop) and "late" not in loop[0]
    assert any("late" in ids for name, _, ids, _ in expect if name == "propagate with late object")
