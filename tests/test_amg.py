"""SAM2AutomaticMaskGenerator parity against sam2==1.1.0's (fp32, CPU, identical sensitive weights).

Sensitive random weights give masks that cover most of the image, so the official
settings would keep one mask after NMS. The cases below therefore raise ``mask_threshold``
(masks become local: boxes differ and NMS has real choices) and some set
``box_nms_thresh=1.0`` (nothing suppressed: every grid mask that passes the filters is
compared). Each case compares the full records: count, matched mask IoU, scores, boxes,
areas, points and crop boxes.

Measured (tiny, image_size 128, 6x6 points, this CPU): matched mask IoU 1.0 and identical
boxes/areas/points in every case; |predicted_iou| and |stability_score| differences at
most 1.8e-7 (float32 rounding of the two decoders), except one stability score that
differs by 9e-5 = one pixel of its count flipping (a refined logit within float noise of
threshold + offset).
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest
import torch

from image_harness import cached_pair, random_image

pytest.importorskip("sam2")
pytest.importorskip("torchvision")

import sam2_fast.automatic_mask_generator as amg_mod  # noqa: E402
from sam2_fast.automatic_mask_generator import SAM2AutomaticMaskGenerator  # noqa: E402

T21 = "configs/sam2.1/sam2.1_hiera_t.yaml"
MIN_IOU = 0.99  # matched-mask IoU bound of the issue (measured: 1.0)
SCORE_TOL = 2e-6  # predicted IoU: ~10x the measured 1.8e-7 (issue bound: 1e-4)
FLIPS = 4  # stability score: pixels of its two counts that may flip (measured: 1, in the m2m case)
BASE = dict(points_per_side=6, mask_threshold=4.0, pred_iou_thresh=0.52, stability_score_thresh=0.35)
LOCAL = dict(mask_threshold=8.0, pred_iou_thresh=0.5, stability_score_thresh=0.1)  # small, local masks
CASES = {
    "filters": dict(BASE, box_nms_thresh=1.0),
    "nms": dict(BASE, **LOCAL),
    "m2m": dict(BASE, use_m2m=True, stability_score_thresh=0.6, box_nms_thresh=1.0),
    "crops": dict(BASE, **LOCAL, points_per_side=4, crop_n_layers=1),
    "holes": dict(BASE, min_mask_region_area=8, box_nms_thresh=1.0),
    "single": dict(BASE, multimask_output=False, pred_iou_thresh=0.0, box_nms_thresh=1.0),
}


def _ref_generator(model, **kwargs):
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator as Ref

    gen = Ref(model, **kwargs)
    s = model.image_size  # the reference hard-codes the backbone sizes of a 1024 input
    gen.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return gen


def _ref_records(model, image, **kwargs):
    # the reference's hole filling needs its CUDA extension; point it at scipy instead
    from video_utils import install_scipy_components

    undo = install_scipy_components()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return _ref_generator(model, **kwargs).generate(image)
    finally:
        undo()


def _as_masks(records) -> np.ndarray:
    segs = [r["segmentation"] for r in records]
    if segs and isinstance(segs[0], dict):
        from sam2.utils.amg import rle_to_mask

        if isinstance(segs[0]["counts"], str):
            mask_utils = pytest.importorskip("pycocotools.mask")
            segs = [mask_utils.decode(s).astype(bool) for s in segs]
        else:
            segs = [rle_to_mask(s) for s in segs]
    return np.stack(segs) if segs else np.zeros((0, 1, 1), bool)


def assert_same_records(ours, ref) -> dict:
    """Same number of masks; each reference mask matched one-to-one (IoU >= MIN_IOU) by one
    of ours with the same scores (SCORE_TOL), box, area, point and crop box."""
    assert len(ours) == len(ref), f"{len(ours)} masks, reference {len(ref)}"
    if not ref:
        return {"count": 0}
    a, b = _as_masks(ref).reshape(len(ref), -1), _as_masks(ours).reshape(len(ours), -1)
    inter = a.astype(np.float64) @ b.T.astype(np.float64)
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    iou = inter / np.maximum(union, 1)
    match = iou.argmax(1)
    assert len(set(match.tolist())) == len(ref), "two reference masks matched the same mask of ours"
    best = iou[np.arange(len(ref)), match]
    assert best.min() >= MIN_IOU, f"matched mask IoU {best.min():.4f} < {MIN_IOU}"
    worst = 0.0
    for r, j in zip(ref, match):
        o = ours[j]
        assert set(o) == set(r)
        d_iou, d_stab = abs(o["predicted_iou"] - r["predicted_iou"]), abs(o["stability_score"] - r["stability_score"])
        worst = max(worst, d_iou)
        assert d_iou <= SCORE_TOL, ("predicted_iou", o["predicted_iou"], r["predicted_iou"])
        # a pixel count ratio: one logit within float noise of threshold +- offset moves it by 1/union
        stab_tol = max(SCORE_TOL, FLIPS / max(r["area"], 1))
        assert d_stab <= stab_tol, ("stability_score", o["stability_score"], r["stability_score"], stab_tol)
        assert np.allclose(o["bbox"], r["bbox"], atol=1), (o["bbox"], r["bbox"])
        assert abs(o["area"] - r["area"]) <= (1 - MIN_IOU) * r["area"] + 1
        assert np.allclose(o["point_coords"], r["point_coords"]) and o["crop_box"] == r["crop_box"]
        assert type(o["area"]) is int and all(type(v) is float for v in o["bbox"])
    return {"count": len(ref), "min_iou": float(best.min()), "score_err": worst}


@pytest.fixture(scope="module")
def synthetic():
    ref_model, our_model = cached_pair(T21)
    return ref_model, our_model, random_image(120, 160, seed=7), {}


def _run_case(synthetic, name):
    ref_model, our_model, image, cache = synthetic
    if name not in cache:
        cache[name] = _ref_records(ref_model, image, **CASES[name])
    ours = SAM2AutomaticMaskGenerator(our_model, **CASES[name]).generate(image)
    return ours, cache[name]


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_reference(synthetic, name):
    ours, ref = _run_case(synthetic, name)
    stats = assert_same_records(ours, ref)
    # the case must exercise what it is named for (not an empty or trivial comparison)
    assert stats["count"] >= (1 if name in ("nms", "crops") else 5), stats
    if name == "crops":
        assert len({tuple(r["crop_box"]) for r in ref}) > 1, "no mask came from a sub-crop"
    if name == "nms":
        assert 1 < len(ref) < 0.5 * 36 * 3, "NMS kept everything or only one mask"


@pytest.mark.parametrize("mode", ["uncompressed_rle", "coco_rle"])
def test_output_modes(synthetic, mode):
    if mode == "coco_rle":
        pytest.importorskip("pycocotools")
    ref_model, our_model, image, _ = synthetic
    kw = dict(CASES["filters"], points_per_side=4, output_mode=mode)
    ours = SAM2AutomaticMaskGenerator(our_model, **kw).generate(image)
    ref = _ref_records(ref_model, image, **kw)
    assert_same_records(ours, ref)
    assert [o["segmentation"] for o in ours] == [r["segmentation"] for r in ref]  # identical encodings
    assert all(o["segmentation"]["size"] == list(image.shape[:2]) for o in ours)


def test_automatic_batch_gives_the_same_masks(synthetic):
    _, our_model, image, _ = synthetic
    kw = dict(CASES["filters"], points_per_side=4)
    fixed = SAM2AutomaticMaskGenerator(our_model, points_per_batch=5, **kw).generate(image)
    auto_gen = SAM2AutomaticMaskGenerator(our_model, points_per_batch=None, **kw)
    assert auto_gen._auto_points_per_batch(image.shape[:2]) >= 16  # one call for the 4x4 grid
    stats = assert_same_records(auto_gen.generate(image), fixed)
    assert stats["count"] > 0


def test_real_frame_from_bikes():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "bikes.mp4")
    if not os.path.exists(path):
        pytest.skip("../shared/data/bikes.mp4 not present")
    av = pytest.importorskip("av")
    with av.open(path) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")  # (272, 640, 3)
    ref_model, our_model = cached_pair(T21)
    kw = dict(CASES["filters"], mask_threshold=0.0, pred_iou_thresh=0.5, stability_score_thresh=0.5)
    stats = assert_same_records(SAM2AutomaticMaskGenerator(our_model, **kw).generate(frame),
                                _ref_records(ref_model, frame, **kw))
    assert stats["count"] >= 5, stats


# ---------------------------------------------------------------- the tests can fail
@pytest.mark.parametrize("bug", ["stability_offset", "uncrop_points", "rle_runs"])
def test_mutation_is_caught(synthetic, monkeypatch, bug):
    A = amg_mod.A
    if bug == "stability_offset":  # the offset halved: scores computed at threshold +- offset / 2
        real = A.calculate_stability_score
        monkeypatch.setattr(A, "calculate_stability_score", lambda m, t, off: real(m, t, 0.5 * off))
        name = "filters"
    elif bug == "uncrop_points":  # points of sub-crops left in crop coordinates
        monkeypatch.setattr(A, "uncrop_points", lambda points, crop_box: points)
        name = "crops"
    else:  # RLE runs shifted by one pixel
        real_rle = A.mask_to_rle_pytorch
        monkeypatch.setattr(A, "mask_to_rle_pytorch", lambda t: real_rle(torch.roll(t, 1, dims=1)))
        name = "filters"
    ours, ref = _run_case(synthetic, name)
    with pytest.raises(AssertionError):
        assert_same_records(ours, ref)


# ---------------------------------------------------------------- bad input
def test_bad_arguments_are_named(synthetic):
    _, model, image, _ = synthetic
    with pytest.raises(ValueError, match="Exactly one of points_per_side or point_grids"):
        SAM2AutomaticMaskGenerator(model, points_per_side=8, point_grids=[np.zeros((1, 2))])
    with pytest.raises(ValueError, match="output_mode 'png'"):
        SAM2AutomaticMaskGenerator(model, output_mode="png")
    with pytest.raises(ValueError, match="point_grids has 1 grids but crop_n_layers=1"):
        SAM2AutomaticMaskGenerator(model, points_per_side=None, point_grids=[np.full((4, 2), 0.5)], crop_n_layers=1)
    with pytest.raises(ValueError, match="points_per_batch must be positive"):
        SAM2AutomaticMaskGenerator(model, points_per_batch=0)
    gen = SAM2AutomaticMaskGenerator(model, points_per_side=2)
    with pytest.raises(ValueError, match=r"float images must be in \[0, 1\]"):  # [0, 1] floats work
        gen.generate(image.astype(np.float32))
    with pytest.raises(ValueError, match="dtype int16"):
        gen.generate(image.astype(np.int16))
    with pytest.raises(ValueError, match="channels"):
        gen.generate(np.zeros((20, 20, 5), np.uint8))
    assert isinstance(gen.generate(image[..., 0]), list)  # grayscale works, and the generator stays usable


def test_coco_rle_without_pycocotools_fails_at_construction(synthetic, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(ImportError, match="pip install pycocotools"):
        SAM2AutomaticMaskGenerator(synthetic[1], output_mode="coco_rle")


def test_explicit_point_grids(synthetic):
    ref_model, our_model, image, _ = synthetic
    grid = np.array([[0.25, 0.25], [0.5, 0.5], [0.75, 0.3], [0.1, 0.9]])
    kw = dict(BASE, points_per_side=None, point_grids=[grid], box_nms_thresh=1.0)
    stats = assert_same_records(SAM2AutomaticMaskGenerator(our_model, **kw).generate(image),
                                _ref_records(ref_model, image, **kw))
    assert stats["count"] > 0
