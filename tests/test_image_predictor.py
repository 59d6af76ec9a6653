"""SAM2ImagePredictor parity against sam2==1.1.0 (fp32, CPU, identical sensitive weights)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from image_harness import SMALL, build_pair, cached_pair, random_image, ref_image_predictor
from support import assert_close_rel, rel_err

from sam2_fast.sam2_image_predictor import SAM2ImagePredictor

TOL = 1e-4
T21 = "configs/sam2.1/sam2.1_hiera_t.yaml"
ALL_CONFIGS = [f"configs/{v}/{v}_hiera_{s}.yaml" for v in ("sam2", "sam2.1") for s in ("t", "s", "b+", "l")]


def _predictors(config=T21, **kwargs):
    ref_model, our_model = cached_pair(config)
    return ref_image_predictor(ref_model, **kwargs), SAM2ImagePredictor(our_model, **kwargs)


def _compare_embeddings(ref_p, our_p):
    assert_close_rel(our_p.get_image_embedding(), ref_p.get_image_embedding(), TOL, "image_embed")
    for i, (a, b) in enumerate(zip(our_p._features["high_res_feats"], ref_p._features["high_res_feats"])):
        assert_close_rel(a, b, TOL, f"high_res_feats[{i}]")


def _compare_predict(ref_p, our_p, **prompt):
    ref_out = ref_p.predict(return_logits=True, **prompt)
    our_out = our_p.predict(return_logits=True, **prompt)
    for name, a, b in zip(("masks", "iou", "low_res"), our_out, ref_out):
        assert a.shape == b.shape, f"{name}: {a.shape} vs {b.shape}"
        assert_close_rel(torch.from_numpy(a), torch.from_numpy(b), TOL, name)
    return our_out


def _object_scores(pred, coords, labels):
    """Object-score logits of the decoder for one click (the predictor does not return them)."""
    model = pred.model
    c = torch.as_tensor(coords, dtype=torch.float32)[None] / torch.tensor(pred._orig_hw[0][::-1]) * model.image_size
    sparse, dense = model.sam_prompt_encoder(points=(c, torch.as_tensor(labels)[None].int()), boxes=None, masks=None)
    feats = pred._features
    with torch.no_grad():
        out = model.sam_mask_decoder(
            image_embeddings=feats["image_embed"], image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
            repeat_image=False, high_res_features=list(feats["high_res_feats"]))
    return out[3]


@pytest.fixture(scope="module")
def set_pair():
    ref_p, our_p = _predictors()
    img = random_image(97, 131, seed=3)  # odd, non-square: resize and coordinate maps are exercised
    ref_p.set_image(img)
    our_p.set_image(img)
    return ref_p, our_p, img


def test_embeddings_match(set_pair):
    ref_p, our_p, _ = set_pair
    _compare_embeddings(ref_p, our_p)


@pytest.mark.parametrize("multimask", [True, False])
def test_single_point(set_pair, multimask):
    ref_p, our_p, _ = set_pair
    masks, iou, low = _compare_predict(ref_p, our_p, point_coords=np.array([[60.5, 41.0]]),
                                       point_labels=np.array([1]), multimask_output=multimask)
    assert masks.shape[0] == (3 if multimask else 1)
    # the sensitive weights must give a real mask, not a constant: both signs occur
    assert (masks > 0).any() and (masks < 0).any()


def test_object_scores(set_pair):
    ref_p, our_p, _ = set_pair
    a = _object_scores(our_p, [[60.5, 41.0]], [1])
    b = _object_scores(ref_p, [[60.5, 41.0]], [1])
    assert_close_rel(a, b, TOL, "object_score_logits")


def test_multi_point(set_pair):
    ref_p, our_p, _ = set_pair
    _compare_predict(ref_p, our_p, point_coords=np.array([[10, 20], [100.25, 80], [55, 5]]),
                     point_labels=np.array([1, 0, 1]), multimask_output=False)


def test_box_and_box_with_points(set_pair):
    ref_p, our_p, _ = set_pair
    _compare_predict(ref_p, our_p, box=np.array([12, 9, 111, 70]), multimask_output=False)
    _compare_predict(ref_p, our_p, box=np.array([12, 9, 111, 70]), point_coords=np.array([[50, 40]]),
                     point_labels=np.array([0]), multimask_output=True)


def test_mask_input_round_trip(set_pair):
    ref_p, our_p, _ = set_pair
    _, _, low = ref_p.predict(point_coords=np.array([[70, 30]]), point_labels=np.array([1]))
    best = low[np.newaxis, 0]  # (1, 4E, 4E) low-res logits reused as the next prompt
    _compare_predict(ref_p, our_p, point_coords=np.array([[70, 30]]), point_labels=np.array([1]),
                     mask_input=best, multimask_output=False)
    _compare_predict(ref_p, our_p, mask_input=best, multimask_output=False)


def test_several_objects_in_one_call(set_pair):
    ref_p, our_p, _ = set_pair
    coords = np.array([[[20, 30]], [[90, 60]], [[120, 10]]], dtype=np.float32)  # (B=3, N=1, 2)
    labels = np.ones((3, 1), dtype=np.int64)
    _compare_predict(ref_p, our_p, point_coords=coords, point_labels=labels, multimask_output=False)
    boxes = np.array([[5, 5, 60, 50], [40, 30, 130, 96]], dtype=np.float32)
    _compare_predict(ref_p, our_p, box=boxes, multimask_output=False)


def test_normalized_coords_false(set_pair):
    ref_p, our_p, _ = set_pair
    _compare_predict(ref_p, our_p, point_coords=np.array([[0.3, 0.7]]), point_labels=np.array([1]),
                     normalize_coords=False)


def test_batched_images():
    ref_p, our_p = _predictors()
    imgs = [random_image(90, 120, seed=5), random_image(133, 77, seed=6)]
    ref_p.set_image_batch(imgs)
    our_p.set_image_batch(imgs)
    _compare_embeddings(ref_p, our_p)
    kw = dict(point_coords_batch=[np.array([[30, 40]]), np.array([[20, 100], [50, 50]])],
              point_labels_batch=[np.array([1]), np.array([1, 0])],
              box_batch=[None, np.array([5, 10, 70, 120])], multimask_output=True, return_logits=True)
    ref_out = ref_p.predict_batch(**kw)
    our_out = our_p.predict_batch(**kw)
    for name, ours_l, ref_l in zip(("masks", "iou", "low_res"), our_out, ref_out):
        for i, (a, b) in enumerate(zip(ours_l, ref_l)):
            assert_close_rel(torch.from_numpy(a), torch.from_numpy(b), TOL, f"{name}[{i}]")


def test_postprocessing_thresholds_and_holes(monkeypatch):
    # the reference skips hole/sprinkle clean-up on CPU (its CUDA extension is missing):
    # point its connected components at an 8-connected scipy version so it runs here too
    import sam2.utils.misc as ref_misc
    from video_utils import scipy_components

    monkeypatch.setattr(ref_misc, "get_connected_components", scipy_components)
    ref_p, our_p = _predictors(mask_threshold=0.5, max_hole_area=40, max_sprinkle_area=30)
    img = random_image(64, 80, seed=9)
    ref_p.set_image(img)
    our_p.set_image(img)
    kw = dict(point_coords=np.array([[40, 30]]), point_labels=np.array([1]))
    ours, _, _ = our_p.predict(**kw)
    ref, _, _ = ref_p.predict(**kw)
    assert ours.dtype == ref.dtype == np.float32 and ours.shape == (3, 64, 80)
    assert set(np.unique(ours)) <= {0.0, 1.0}
    np.testing.assert_array_equal(ours, ref)
    # the clean-up must have acted, or this test would not exercise it
    plain = SAM2ImagePredictor(our_p.model, mask_threshold=0.5)
    plain.set_image(img)
    raw, _, _ = plain.predict(**kw)
    assert (raw != ours).any(), "hole filling / sprinkle removal changed nothing"


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_every_config(config):
    ref_model, our_model = build_pair(config, image_size=96 if config.endswith("l.yaml") else SMALL, seed=11)
    ref_p, our_p = ref_image_predictor(ref_model), SAM2ImagePredictor(our_model)
    img = random_image(70, 59, seed=1)
    ref_p.set_image(img)
    our_p.set_image(img)
    _compare_embeddings(ref_p, our_p)
    _compare_predict(ref_p, our_p, point_coords=np.array([[20, 33]]), point_labels=np.array([1]))
    _compare_predict(ref_p, our_p, box=np.array([3, 4, 50, 60]), multimask_output=False)


def test_real_frame_from_bikes():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "bikes.mp4")
    if not os.path.exists(path):
        pytest.skip("../shared/data/bikes.mp4 not present")
    av = pytest.importorskip("av")
    with av.open(path) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    ref_p, our_p = _predictors()
    ref_p.set_image(frame)
    our_p.set_image(frame)
    _compare_embeddings(ref_p, our_p)
    h, w = frame.shape[:2]
    _compare_predict(ref_p, our_p, point_coords=np.array([[w * 0.4, h * 0.6]]), point_labels=np.array([1]))


# ---------------------------------------------------------------- the test can fail
def _mutated_error(mutate) -> float:
    ref_model, our_model = build_pair(T21, seed=21)
    mutate(our_model)
    ref_p, our_p = ref_image_predictor(ref_model), SAM2ImagePredictor(our_model)
    img = random_image(80, 80, seed=4)
    ref_p.set_image(img)
    our_p.set_image(img)
    kw = dict(point_coords=np.array([[30, 50]]), point_labels=np.array([1]), return_logits=True)
    return rel_err(torch.from_numpy(our_p.predict(**kw)[0]), torch.from_numpy(ref_p.predict(**kw)[0]))


def test_mutation_swapped_positional_table_fails():
    def swap(model):
        with torch.no_grad():  # transpose the Hiera background position table: a wrong x/y order
            pe = model.image_encoder.trunk.pos_embed
            pe.copy_(pe.transpose(-1, -2).clone())
    err = _mutated_error(swap)
    assert err > 100 * TOL, f"a swapped positional table moved the logits by only {err:.2e}"


def test_tiny_weight_noise_passes():
    def jitter(model):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1e-6)
    err = _mutated_error(jitter)
    assert err < TOL, f"1e-6 weight noise moved the logits by {err:.2e}"


def test_sensitive_weights_give_large_logits(set_pair):
    _, our_p, _ = set_pair
    masks, _, _ = our_p.predict(point_coords=np.array([[60, 40]]), point_labels=np.array([1]), return_logits=True)
    assert np.abs(masks).max() > 1.0, "weights are too quiet to catch semantic bugs"


# ---------------------------------------------------------------- CUDA (run by the GPU check)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_parity_fp32_and_bf16_autocast():
    ref_model, our_model = build_pair(T21, image_size=256, seed=5)
    ref_model, our_model = ref_model.cuda(), our_model.cuda()
    ref_p, our_p = ref_image_predictor(ref_model), SAM2ImagePredictor(our_model)
    img = random_image(181, 243, seed=12)
    kw = dict(point_coords=np.array([[100, 60]]), point_labels=np.array([1]), return_logits=True)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ref_p.set_image(img)
        our_p.set_image(img)
        _compare_embeddings(ref_p, our_p)
        _compare_predict(ref_p, our_p, **kw)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref_p.set_image(img)
        our_p.set_image(img)
        a = our_p.predict(**kw)[0]
        b = ref_p.predict(**kw)[0]
    # bf16 keeps 8 mantissa bits: 2^-8 relative per rounding; ~30 chained roundings on the
    # image path add up like a random walk, x4 margin: 4 * sqrt(30) * 2^-8 ~= 0.086
    assert rel_err(torch.from_numpy(a), torch.from_numpy(b)) < 4 * 30 ** 0.5 * 2 ** -8
