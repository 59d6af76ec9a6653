"""Image predictor transforms against the reference's SAM2Transforms (torchvision based)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from support import assert_close_rel

import sam2_fast.utils.transforms as tf_mod
from sam2_fast.utils.transforms import ImageTransforms, SAM2Transforms, image_hw


@pytest.fixture(scope="module")
def ref_cls():
    from sam2.utils.transforms import SAM2Transforms as Ref
    return Ref


@pytest.fixture(scope="module")
def refs(ref_cls):
    cache = {}

    def get(size):  # the reference scripts a module per instance: build each size once
        if size not in cache:
            cache[size] = ref_cls(size, 0.0)
        return cache[size]
    return get


def _img(rng, h, w, c=3):
    shape = (h, w) if c is None else (h, w, c)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("size, hw", [(67, (37, 53)), (128, (301, 97)), (64, (64, 64)),
                                      (99, (20, 31)), (32, (257, 255))])
def test_image_parity_numpy_and_pil(refs, size, hw):
    rng = np.random.default_rng(size)
    img = _img(rng, *hw)
    ref = refs(size)
    ours = ImageTransforms(size)
    for given in (img, Image.fromarray(img)):
        a, b = ref(given), ours(given)
        assert b.shape == (3, size, size) and b.dtype == torch.float32
        assert torch.equal(a, b), (a - b).abs().max()
    assert image_hw(img) == image_hw(Image.fromarray(img)) == hw


def test_batch_parity_mixed_sizes(refs):
    rng = np.random.default_rng(1)
    imgs = [_img(rng, 41, 23), _img(rng, 17, 90), _img(rng, 64, 64)]
    a = refs(48).forward_batch(imgs)
    b = ImageTransforms(48).forward_batch(imgs)
    assert b.shape == (3, 3, 48, 48) and torch.equal(a, b)
    with pytest.raises(ValueError, match="at least one"):
        ImageTransforms(48).forward_batch([])


def test_mutation_no_antialias_fails_by_wide_margin(refs, monkeypatch):
    rng = np.random.default_rng(2)
    img = _img(rng, 211, 173)
    want = refs(40)(img)
    real = F.interpolate
    monkeypatch.setattr(tf_mod.F, "interpolate", lambda *a, **k: real(*a, **{**k, "antialias": False}))
    got = ImageTransforms(40)(img)
    err = ((got - want).norm() / want.norm()).item()
    assert err > 1e-2, err  # >= 100x the 1e-4 budget; the faithful path is exact


def test_grayscale_and_rgba_are_converted(refs):
    rng = np.random.default_rng(3)
    rgb = _img(rng, 29, 35)
    gray = rgb[..., 1]
    want_gray = refs(24)(np.repeat(gray[..., None], 3, -1))
    ours = ImageTransforms(24)
    assert torch.equal(ours(gray), want_gray)
    assert torch.equal(ours(gray[..., None]), want_gray)
    assert torch.equal(ours(Image.fromarray(gray)), want_gray)  # PIL mode "L"
    rgba = np.concatenate([rgb, _img(rng, 29, 35, 1)], -1)
    assert torch.equal(ours(rgba), refs(24)(rgb))
    assert torch.equal(ours(Image.fromarray(rgba)), refs(24)(rgb))  # PIL mode "RGBA"
    assert torch.equal(ours(torch.from_numpy(rgb)), refs(24)(rgb))  # HWC uint8 tensor


def test_float_images_in_unit_range_match_uint8(refs):
    """Issue 9 item 3: a float HWC image in [0, 1] is the uint8 image / 255, bitwise, as the
    reference's ToTensor takes it (float32 and float64, numpy and torch, grayscale too)."""
    rng = np.random.default_rng(4)
    rgb = _img(rng, 31, 45)
    want = refs(32)(rgb)
    ours = ImageTransforms(32)
    as32 = rgb.astype(np.float32) / 255
    for image in (as32, rgb / 255.0, torch.from_numpy(as32)):
        assert torch.equal(ours(image), want)
    assert torch.equal(refs(32)(as32), want)  # the reference agrees on the float input
    assert torch.equal(ours(rgb[..., 0] / 255.0), ours(rgb[..., 0]))
    batch = ours.forward_batch([as32, rgb])
    assert torch.equal(batch[0], batch[1])


@pytest.mark.parametrize("bad, match", [
    (np.full((8, 8, 3), 255.0, np.float32), r"float images must be in \[0, 1\].*divide by 255"),
    (np.full((8, 8, 3), -0.5, np.float64), r"values span \[-0.5, -0.5\]"),
    (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
    (np.zeros((8, 8, 3), np.int64), "uint8 .* or float"),
    (np.zeros((1, 8, 8, 3), np.uint8), "shape"),
    (np.zeros((8, 8, 2), np.uint8), "3 channels"),
    (np.zeros((0, 8, 3), np.uint8), "empty"),
    ([[1, 2], [3, 4]], "PIL image"),
])
def test_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        ImageTransforms(16)(bad)


def test_coords_and_boxes_parity(refs):
    ref, ours = refs(1024), SAM2Transforms(1024)
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(3, 5, 2, generator=g) * 300
    boxes = torch.rand(4, 4, generator=g) * 300
    for normalize in (False, True):
        hw = (377, 291) if normalize else None
        p = pts / 400 if not normalize else pts
        b = boxes / 400 if not normalize else boxes
        assert torch.equal(ours.transform_coords(p, normalize, hw), ref.transform_coords(p, normalize, hw))
        got, want = ours.transform_boxes(b, normalize, hw), ref.transform_boxes(b, normalize, hw)
        assert got.shape == (4, 2, 2) and torch.equal(got, want)
    assert torch.equal(pts, torch.rand(3, 5, 2, generator=torch.Generator().manual_seed(0)) * 300)
    with pytest.raises(ValueError, match="orig_hw"):
        ours.transform_coords(pts, normalize=True)
    with pytest.raises(ValueError, match="dimension of 4"):
        ours.transform_boxes(pts)


def test_postprocess_masks_parity(ref_cls, monkeypatch):
    import sam2.utils.misc as ref_misc
    from test_masks import _scipy_cc_torch

    monkeypatch.setattr(ref_misc, "get_connected_components", _scipy_cc_torch)
    g = torch.Generator().manual_seed(4)
    low = F.avg_pool2d(torch.randn(2, 3, 35, 33, generator=g), 3, 1, 1) * 6 + 0.2
    ref = ref_cls(64, 0.0, max_hole_area=10, max_sprinkle_area=6)
    for holes, specks in ((0, 0), (10, 6)):
        ref.max_hole_area, ref.max_sprinkle_area = holes, specks
        ours = ImageTransforms(64, 0.0, max_hole_area=holes, max_sprinkle_area=specks)
        got = ours.postprocess_masks(low, (101, 67))
        assert got.shape == (2, 3, 101, 67)
        assert_close_rel(got, ref.postprocess_masks(low, (101, 67)), 1e-6, "masks")
        assert torch.equal(got, ref.postprocess_masks(low, (101, 67)))


def test_runs_without_torchvision():
    code = (
        "import sys; sys.modules['torchvision'] = None\n"
        "import numpy as np\n"
        "from sam2_fast.utils.transforms import ImageTransforms\n"
        "x = ImageTransforms(16)(np.ones((9, 7, 3), np.uint8))\n"
        "assert x.shape == (3, 16, 16) and 'torchvision' not in [m for m in sys.modules if sys.modules[m]]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.cuda
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_preprocessing_close_to_cpu():
    rng = np.random.default_rng(9)
    img = _img(rng, 480, 640)
    cpu = ImageTransforms(1024)(img)
    gpu = ImageTransforms(1024, device="cuda")(img)
    assert gpu.is_cuda
    assert_close_rel(gpu.cpu(), cpu, 1e-6, "image")


def test_read_only_array_is_accepted_without_warning():
    """Frames from np.frombuffer / memory maps are read-only: wrapping them must neither warn
    (torch's non-writable-array warning) nor alias memory the caller froze."""
    import warnings

    from sam2_fast.utils.transforms import image_to_uint8_chw

    frame = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    frozen = frame.copy()
    frozen.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = image_to_uint8_chw(frozen)
    assert torch.equal(out, image_to_uint8_chw(frame))
    out.fill_(0)  # the result is the caller's to edit; the frozen frame is untouched
    assert np.array_equal(frozen, frame)
