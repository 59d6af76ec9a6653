"""``sam2_fast.utils.amg`` against ``sam2.utils.amg``: same names, same results.

The reference's ``remove_small_regions`` imports OpenCV inside the function; OpenCV is not a
dependency here, so the reference runs against a stand-in ``cv2`` module whose
``connectedComponentsWithStats`` is scipy's 8-connected labelling (raster-order labels,
as OpenCV's); with the real OpenCV installed the same test runs against it too.
"""

from __future__ import annotations

import inspect
import sys
import types

import numpy as np
import pytest
import torch
from scipy import ndimage

import sam2_fast.utils.amg as ours

ref = pytest.importorskip("sam2.utils.amg")


def _masks(seed: int, b: int = 9, h: int = 13, w: int = 17) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, h, w, generator=g) > 0.5
    m[0] = False  # empty
    m[1] = True  # full
    m[2] = False
    m[2, 0, 0] = True  # only the first pixel
    m[3] = False
    m[3, -1, -1] = True  # only the last pixel
    return m


def test_same_public_names_and_signatures():
    for name in ["MaskData", "is_box_near_crop_edge", "box_xyxy_to_xywh", "batch_iterator",
                 "mask_to_rle_pytorch", "rle_to_mask", "area_from_rle", "calculate_stability_score",
                 "build_point_grid", "build_all_layer_point_grids", "generate_crop_boxes", "uncrop_boxes_xyxy",
                 "uncrop_points", "uncrop_masks", "remove_small_regions", "coco_encode_rle", "batched_mask_to_box"]:
        ref_obj, our_obj = getattr(ref, name), getattr(ours, name)
        if inspect.isfunction(ref_obj):
            assert list(inspect.signature(our_obj).parameters) == list(inspect.signature(ref_obj).parameters), name


@pytest.mark.parametrize("shape", [(9, 13, 17), (4, 1, 1), (5, 1, 7), (5, 64, 48)])
def test_rle_round_trip_matches_reference(shape):
    m = _masks(shape[1] * 7 + shape[2], *shape) if shape[1] * shape[2] > 1 else torch.rand(*shape) > 0.5
    got, want = ours.mask_to_rle_pytorch(m), ref.mask_to_rle_pytorch(m)
    assert got == want
    for rle in want:
        assert np.array_equal(ours.rle_to_mask(rle), ref.rle_to_mask(rle))
        assert ours.area_from_rle(rle) == ref.area_from_rle(rle)
    assert ours.mask_to_rle_pytorch(m[:0]) == []


def test_rle_to_mask_rejects_counts_of_the_wrong_size():
    with pytest.raises(ValueError, match="sum to 5"):
        ours.rle_to_mask({"size": [2, 3], "counts": [2, 3]})


def test_boxes_stability_and_edges_match_reference():
    m = _masks(1, 11, 20, 30)
    assert torch.equal(ours.batched_mask_to_box(m), ref.batched_mask_to_box(m))
    assert torch.equal(ours.batched_mask_to_box(m.reshape(11, 1, 20, 30)), ref.batched_mask_to_box(m.reshape(11, 1, 20, 30)))
    assert torch.equal(ours.batched_mask_to_box(m[0]), ref.batched_mask_to_box(m[0]))
    logits = torch.randn(6, 25, 31, generator=torch.Generator().manual_seed(2)) * 3
    for thr, off in [(0.0, 1.0), (0.5, 0.25)]:
        assert torch.equal(ours.calculate_stability_score(logits, thr, off), ref.calculate_stability_score(logits, thr, off))
    boxes = torch.tensor([[0, 0, 10, 10], [25, 5, 59, 40], [80, 0, 99, 10], [3, 3, 5, 5]])
    for crop in ([0, 0, 60, 50], [40, 0, 100, 50]):
        assert torch.equal(ours.is_box_near_crop_edge(boxes, crop, [0, 0, 100, 50]),
                           ref.is_box_near_crop_edge(boxes, crop, [0, 0, 100, 50]))
        assert torch.equal(ours.uncrop_boxes_xyxy(boxes, crop), ref.uncrop_boxes_xyxy(boxes, crop))
        assert torch.equal(ours.uncrop_points(boxes[:, :2].float(), crop), ref.uncrop_points(boxes[:, :2].float(), crop))
    crop = [40, 10, 60, 30]
    assert torch.equal(ours.uncrop_masks(m[:, :20, :20], crop, 50, 100), ref.uncrop_masks(m[:, :20, :20], crop, 50, 100))
    box = torch.tensor([3.0, 4.0, 10.0, 20.0])
    assert torch.equal(ours.box_xyxy_to_xywh(box), ref.box_xyxy_to_xywh(box))
    assert box.tolist() == [3.0, 4.0, 10.0, 20.0]  # a copy, not in place


def test_grids_and_crops_match_reference():
    for n in (1, 7, 32):
        assert np.array_equal(ours.build_point_grid(n), ref.build_point_grid(n))
    for args in [(32, 0, 1), (16, 2, 2), (9, 1, 1)]:
        for a, b in zip(ours.build_all_layer_point_grids(*args), ref.build_all_layer_point_grids(*args)):
            assert np.array_equal(a, b)
    for size, layers, ratio in [((180, 240), 0, 512 / 1500), ((272, 640), 1, 512 / 1500), ((1080, 1920), 2, 0.2)]:
        assert ours.generate_crop_boxes(size, layers, ratio) == ref.generate_crop_boxes(size, layers, ratio)


def test_batch_iterator_and_mask_data_match_reference():
    a, b = np.arange(10), torch.arange(10) * 2
    assert [[x.tolist() for x in batch] for batch in ours.batch_iterator(4, a, b)] == \
        [[x.tolist() for x in batch] for batch in ref.batch_iterator(4, a, b)]
    with pytest.raises(ValueError, match="same size"):
        list(ours.batch_iterator(4, a, b[:3]))

    def fill(cls):
        d = cls(t=torch.arange(6), n=np.arange(6) * 10, l=list("abcdef"))
        d.cat(cls(t=torch.arange(2) + 100, n=np.arange(2), l=["y", "z"]))
        d.filter(torch.tensor([True, False, True, True, False, False, True, True]))
        d.filter(torch.tensor([4, 0, 2]))
        d.to_numpy()
        return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in d.items()}

    assert fill(ours.MaskData) == fill(ref.MaskData)
    with pytest.raises(TypeError, match="'x' is int"):
        ours.MaskData(x=3)


class _ScipyCv2(types.ModuleType):
    """The one OpenCV call the reference's remove_small_regions makes, on scipy."""

    def __init__(self):
        super().__init__("cv2")

    @staticmethod
    def connectedComponentsWithStats(image, connectivity):
        assert connectivity == 8
        labels, n = ndimage.label(image, structure=np.ones((3, 3), int))
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        stats = np.zeros((n + 1, 5), np.int32)
        stats[:, -1] = areas
        return n + 1, labels.astype(np.int32), stats, None


def _region_cases():
    rng = np.random.default_rng(0)
    cases = [ndimage.gaussian_filter(rng.random((40, 50)), 1.5) > t for t in (0.45, 0.5, 0.55)]
    cases.append(rng.random((30, 30)) > 0.7)  # only specks: islands mode keeps the largest
    two = np.zeros((12, 12), bool)
    two[1:3, 1:3] = True
    two[8:10, 8:10] = True  # two islands of equal size: the raster-first one is kept
    cases += [two, np.zeros((5, 5), bool), np.ones((5, 5), bool)]
    return cases


@pytest.mark.parametrize("backend", ["scipy-cv2", "cv2"])
def test_remove_small_regions_matches_reference(monkeypatch, backend):
    if backend == "cv2":
        pytest.importorskip("cv2")
    else:
        monkeypatch.setitem(sys.modules, "cv2", _ScipyCv2())
    for mask in _region_cases():
        for mode in ("holes", "islands"):
            for area in (1, 3, 6, 50, 10_000):
                got, got_changed = ours.remove_small_regions(mask, area, mode)
                want, want_changed = ref.remove_small_regions(mask, area, mode)
                assert got_changed == want_changed, (mode, area)
                assert np.array_equal(got, want), (mode, area)
    with pytest.raises(ValueError, match="mode"):
        ours.remove_small_regions(mask, 3, "specks")


def test_coco_rle_matches_reference_and_decodes():
    mask_utils = pytest.importorskip("pycocotools.mask")
    m = _masks(5, 6, 21, 14)
    for rle, mask in zip(ref.mask_to_rle_pytorch(m), m.numpy()):
        got = ours.coco_encode_rle(rle)
        assert got == ref.coco_encode_rle(rle)
        assert isinstance(got["counts"], str)
        assert np.array_equal(mask_utils.decode(got).astype(bool), mask)


def test_coco_rle_without_pycocotools_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(ImportError, match="pip install pycocotools"):
        ours.coco_encode_rle({"size": [1, 1], "counts": [1]})
