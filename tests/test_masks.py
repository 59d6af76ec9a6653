"""8-connected components and mask clean-up against scipy.ndimage and the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

import sam2_fast.utils.masks as masks_mod
from sam2_fast.utils.masks import (connected_components, fill_holes_in_mask_scores,
                                   postprocess_low_res_masks, remove_sprinkles_in_mask_scores)

EIGHT = np.ones((3, 3), dtype=int)


def _scipy_cc(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    lab, n = ndimage.label(m, structure=EIGHT)
    sizes = np.bincount(lab.ravel())
    return lab, np.where(lab > 0, sizes[lab], 0), n


def _scipy_cc_torch(mask: torch.Tensor):
    """Drop-in for the reference's compiled get_connected_components (N, 1, H, W)."""
    m = mask.cpu().numpy().astype(bool)
    labels = np.zeros(m.shape, np.int32)
    areas = np.zeros(m.shape, np.int32)
    for i in range(m.shape[0]):
        labels[i, 0], areas[i, 0], _ = _scipy_cc(m[i, 0])
    return torch.from_numpy(labels).to(mask.device), torch.from_numpy(areas).to(mask.device)


def _assert_same_partition(ours: np.ndarray, ref: np.ndarray) -> None:
    """Same foreground and a one-to-one map between component ids."""
    assert np.array_equal(ours > 0, ref > 0)
    fg = ref > 0
    pairs = set(zip(ours[fg].tolist(), ref[fg].tolist()))
    assert len(pairs) == len(set(ours[fg].tolist())) == len(set(ref[fg].tolist()))


def _blobs(rng, shape, sigma=1.5, level=0.5):
    return ndimage.gaussian_filter(rng.random(shape), sigma) > level


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (13, 1), (37, 53), (61, 29), (64, 63)])
def test_matches_scipy_on_random_masks(shape):
    rng = np.random.default_rng(hash(shape) % 2**32)
    batch = [rng.random(shape) < p for p in (0.2, 0.45, 0.55, 0.7)]
    batch += [_blobs(rng, shape), np.zeros(shape, bool), np.ones(shape, bool)]
    m = torch.from_numpy(np.stack(batch))[:, None]  # (N, 1, H, W)
    labels, areas = connected_components(m)
    assert labels.shape == areas.shape == m.shape
    assert labels.dtype == areas.dtype == torch.int32
    for i, one in enumerate(batch):
        ref_lab, ref_area, _ = _scipy_cc(one)
        assert np.array_equal(areas[i, 0].numpy(), ref_area), i
        _assert_same_partition(labels[i, 0].numpy(), ref_lab)


def test_hard_shapes_diagonals_and_serpentine():
    h = w = 41
    serp = np.zeros((h, w), bool)
    serp[::2] = True
    serp[1::4, -1] = True
    serp[3::4, 0] = True  # one long snake through every row
    diag = np.eye(h, dtype=bool) | np.eye(h, dtype=bool)[::-1]  # an X: 8-connected only
    checker = (np.add.outer(np.arange(h), np.arange(w)) % 2) == 0  # one component in 8-conn
    for m in (serp, diag, checker, ~checker):
        ref_lab, ref_area, n = _scipy_cc(m)
        lab, area = connected_components(torch.from_numpy(m))
        assert np.array_equal(area.numpy(), ref_area)
        _assert_same_partition(lab.numpy(), ref_lab)
    assert _scipy_cc(serp)[2] == 1 and _scipy_cc(checker)[2] == 1


def test_device_plan_same_labels_far_fewer_syncs(monkeypatch):
    """Off the CPU the loop checks convergence every 3 rounds (2 pointer jumps per round):
    the same canonical labels as the CPU plan, with a fraction of the host reads (each one
    a CUDA sync). Forced here on CPU tensors; the CUDA test compares devices too."""
    rng = np.random.default_rng(7)
    h = w = 41
    serp = np.zeros((h, w), bool)
    serp[::2] = True
    serp[1::4, -1] = True
    serp[3::4, 0] = True
    batch = [rng.random((h, w)) < p for p in (0.2, 0.45, 0.55, 0.7)] + [_blobs(rng, (h, w)), serp, ~serp]
    m = torch.from_numpy(np.stack(batch))[:, None]
    real_equal = torch.equal
    calls = {"n": 0}

    def counted(a, b):
        calls["n"] += 1
        return real_equal(a, b)

    monkeypatch.setattr(torch, "equal", counted)
    cpu_lab, cpu_area = connected_components(m)
    cpu_syncs, calls["n"] = calls["n"], 0
    monkeypatch.setattr(masks_mod, "schedule", lambda device: (3, 2))
    dev_lab, dev_area = connected_components(m)
    dev_syncs = calls["n"]
    assert real_equal(dev_lab, cpu_lab) and real_equal(dev_area, cpu_area)
    for i, one in enumerate(batch):
        ref_lab, ref_area, _ = _scipy_cc(one)
        assert np.array_equal(dev_area[i, 0].numpy(), ref_area), i
        _assert_same_partition(dev_lab[i, 0].numpy(), ref_lab)
    print(f"host reads: CPU plan {cpu_syncs}, device plan {dev_syncs}")
    assert dev_syncs * 4 <= cpu_syncs


def test_mutation_four_connectivity_fails_by_wide_margin(monkeypatch):
    def cross_min(lab, outside):  # 4-neighbourhood instead of the 3x3 window
        p = torch.nn.functional.pad(lab, (1, 1, 1, 1), value=outside)
        c = p[:, 1:-1, 1:-1]
        return torch.stack([c, p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]).amin(0)

    m = np.random.default_rng(3).random((37, 41)) < 0.45
    _, ref_area, _ = _scipy_cc(m)
    monkeypatch.setattr(masks_mod, "_min3x3", cross_min)
    _, area = connected_components(torch.from_numpy(m))
    wrong = (area.numpy() != ref_area).mean()
    assert wrong > 0.2, wrong  # most foreground pixels get a wrong area


def test_leading_dims_and_empty():
    rng = np.random.default_rng(7)
    m = rng.random((2, 3, 11, 7)) < 0.5
    lab, area = connected_components(torch.from_numpy(m))
    for i in range(2):
        for j in range(3):
            assert np.array_equal(area[i, j].numpy(), _scipy_cc(m[i, j])[1])
    lab, area = connected_components(torch.zeros(0, 1, 5, 5, dtype=torch.bool))
    assert lab.shape == (0, 1, 5, 5)
    with pytest.raises(ValueError, match="at least 2 dims"):
        connected_components(torch.ones(5))


def _scores(rng, shape):
    """Smooth random logits in (-5, 5) with no exact zeros."""
    x = ndimage.gaussian_filter(rng.standard_normal(shape), (0, 0, 1.2, 1.2)) * 8
    x[x == 0] = 0.25
    return torch.from_numpy(x.astype(np.float32))


@pytest.mark.parametrize("max_area", [1, 7, 40])
def test_fill_holes_matches_scipy_and_reference(monkeypatch, max_area):
    import sam2.utils.misc as ref_misc

    rng = np.random.default_rng(max_area)
    mask = _scores(rng, (3, 1, 45, 39))
    bg = (mask <= 0).numpy()
    want = mask.clone()
    for i in range(3):
        lab, area, _ = _scipy_cc(bg[i, 0])
        hole = (lab > 0) & (area <= max_area)
        want[i, 0][torch.from_numpy(hole)] = 0.1
    ours = fill_holes_in_mask_scores(mask, max_area)
    assert torch.equal(ours, want)
    assert (ours != mask).sum() > 0  # the case has holes to fill, some on the border
    monkeypatch.setattr(ref_misc, "get_connected_components", _scipy_cc_torch)
    assert torch.equal(ours, ref_misc.fill_holes_in_mask_scores(mask, max_area))
    with pytest.raises(ValueError, match="positive"):
        fill_holes_in_mask_scores(mask, 0)


def test_border_touching_holes_are_filled():
    m = torch.full((1, 1, 9, 11), 3.0)
    m[0, 0, 0, 0] = -1.0  # corner hole
    m[0, 0, 4, 5] = -2.0  # interior hole
    m[0, 0, 5:, 8:] = -1.0  # large border region (12 px)
    out = fill_holes_in_mask_scores(m, 4)
    assert out[0, 0, 0, 0] == pytest.approx(0.1) and out[0, 0, 4, 5] == pytest.approx(0.1)
    assert (out[0, 0, 5:, 8:] == -1.0).all()


def test_remove_sprinkles_matches_scipy():
    rng = np.random.default_rng(11)
    mask = _scores(rng, (2, 1, 33, 47))
    fg = (mask > 0).numpy()
    want = mask.clone()
    for i in range(2):
        lab, area, _ = _scipy_cc(fg[i, 0])
        want[i, 0][torch.from_numpy((lab > 0) & (area <= 9))] = -0.1
    ours = remove_sprinkles_in_mask_scores(mask, 9)
    assert torch.equal(ours, want) and (ours != mask).sum() > 0


def test_postprocess_low_res_matches_reference_transforms(monkeypatch):
    import sam2.utils.misc as ref_misc
    from sam2.utils.transforms import SAM2Transforms

    monkeypatch.setattr(ref_misc, "get_connected_components", _scipy_cc_torch)
    rng = np.random.default_rng(5)
    masks = _scores(rng, (2, 3, 31, 29)) + 0.3
    ref = SAM2Transforms(64, 0.0)  # built once: its constructor scripts a module (slow)
    for hole, speck, thr in [(12, 0, 0.0), (0, 12, 0.0), (12, 9, 0.0), (25, 25, 0.5)]:
        ref.mask_threshold, ref.max_hole_area, ref.max_sprinkle_area = thr, hole, speck
        want = ref.postprocess_masks(masks, (31, 29))  # same size: isolates the clean-up
        ours = postprocess_low_res_masks(masks, thr, hole, speck)
        assert torch.equal(ours, want), (hole, speck, thr)
        assert (ours != masks).sum() > 0


@pytest.mark.cuda
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(2)
    m = torch.from_numpy(rng.random((4, 1, 256, 256)) < 0.5)
    lab_c, area_c = connected_components(m)
    lab_g, area_g = connected_components(m.cuda())
    assert lab_g.is_cuda and torch.equal(area_g.cpu(), area_c) and torch.equal(lab_g.cpu(), lab_c)
    s = _scores(rng, (4, 1, 256, 256))
    assert torch.equal(fill_holes_in_mask_scores(s.cuda(), 50).cpu(), fill_holes_in_mask_scores(s, 50))
