"""The image predictor's tensor-level pair ``_prep_prompts`` / ``_predict``, as in sam2==1.1.0.

SAM 2 has no public ``predict_torch`` (SAM 1's), so code that batches prompts on the device
calls these two directly: ``_prep_prompts(point_coords, point_labels, box, mask_logits,
normalize_coords, img_idx=-1)`` -> ``(mask_input, unnorm_coords, labels, unnorm_box)`` tensors,
then ``_predict(point_coords, point_labels, boxes, mask_input, multimask_output,
return_logits, img_idx)`` -> torch ``(masks (B, C, H, W), iou (B, C), low_res (B, C, h, w))``.
Both packages, identical sensitive weights (image_size 64, fp32 CPU).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import video_utils as V
from image_harness import build_pair, random_image, ref_image_predictor
from support import rel_err

from sam2_fast.image_prompts import PromptError
from sam2_fast.sam2_image_predictor import SAM2ImagePredictor

T21 = "configs/sam2.1/sam2.1_hiera_t.yaml"
S = 64
TOL = 1e-5  # the image parity tests' bound (measured <= 8.8e-7 relative, float32 op order)


@pytest.fixture(scope="module")
def predictors():
    with V.single_thread():
        ref_model, our_model = build_pair(T21, S)
        images = [random_image(50, 70, seed=1), random_image(40, 36, seed=2)]
        ref, ours = ref_image_predictor(ref_model), SAM2ImagePredictor(our_model)
        ref.set_image(images[0])
        ours.set_image(images[0])
        ref_b, ours_b = ref_image_predictor(ref_model), SAM2ImagePredictor(our_model)
        ref_b.set_image_batch(images)
        ours_b.set_image_batch(images)
        yield ref, ours, ref_b, ours_b


def test_same_signatures_as_official():
    from sam2.sam2_image_predictor import SAM2ImagePredictor as Ref
    for name in ("_prep_prompts", "_predict"):
        ref = [(p.name, p.default) for p in inspect.signature(getattr(Ref, name)).parameters.values()]
        ours = [(p.name, p.default) for p in inspect.signature(getattr(SAM2ImagePredictor, name)).parameters.values()]
        assert ours == ref, f"{name}: {ours} vs official {ref}"


def _same(ours, ref, what):
    assert type(ours) is type(ref), f"{what}: {type(ours).__name__} vs {type(ref).__name__}"
    if ref is None:
        return
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, f"{what}: {ours.shape} {ours.dtype} vs {ref.shape} {ref.dtype}"
    if ref.dtype == torch.bool:
        assert (ours != ref).float().mean() <= 1e-3, f"{what}: {(ours != ref).float().mean():.2e} of pixels differ"
    else:
        assert rel_err(ours.float(), ref.float()) <= TOL, f"{what}: rel err {rel_err(ours.float(), ref.float()):.2e}"


CASES = {
    "points": dict(point_coords=np.array([[[10.0, 12.0], [30.0, 25.0]], [[40.0, 5.0], [3.0, 44.0]]]),
                   point_labels=np.array([[1, 0], [1, 1]]), box=None),
    "boxes": dict(point_coords=None, point_labels=None, box=np.array([[5.0, 5.0, 40.0, 30.0], [20, 10, 66, 48]])),
    "both": dict(point_coords=np.array([[[10.0, 12.0]], [[50.0, 20.0]]]), point_labels=np.array([[1], [0]]),
                 box=np.array([[5.0, 5.0, 40.0, 30.0], [20, 10, 66, 48]])),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("multimask,logits", [(True, False), (False, True)])
def test_prep_and_predict_match_the_reference(predictors, case, multimask, logits):
    ref, ours, _, _ = predictors
    kw = CASES[case]
    prepped = [p._prep_prompts(kw["point_coords"], kw["point_labels"], kw["box"], None, True) for p in (ours, ref)]
    for what, o, r in zip(("mask_input", "coords", "labels", "box"), *prepped):
        _same(o, r, f"_prep_prompts {what}")
    mask_in, coords, labels, box = prepped[0]
    got = ours._predict(coords, labels, box, mask_in, multimask_output=multimask, return_logits=logits)
    want = ref._predict(*prepped[1][1:3], prepped[1][3], prepped[1][0], multimask_output=multimask,
                        return_logits=logits)
    for what, o, r in zip(("masks", "iou", "low_res"), got, want):
        _same(o, r, f"_predict {what}")
    assert got[0].shape[:2] == (2, 3 if multimask else 1)


def test_mask_input_round_trip_and_batch_index(predictors):
    ref, ours, ref_b, ours_b = predictors
    pts, lab = np.array([[20.0, 20.0]]), np.array([1])
    for o, r in ((ours, ref), (ours_b, ref_b)):
        idx = -1 if o is ours else 0  # the batch predictor answers for its first image
        po = o._prep_prompts(pts, lab, None, None, True, img_idx=idx)
        pr = r._prep_prompts(pts, lab, None, None, True, img_idx=idx)
        first_o = o._predict(po[1], po[2], multimask_output=False, img_idx=idx)
        first_r = r._predict(pr[1], pr[2], multimask_output=False, img_idx=idx)
        mo = o._prep_prompts(pts, lab, None, first_o[2][0].numpy(), True, img_idx=idx)[0]
        mr = r._prep_prompts(pts, lab, None, first_r[2][0].numpy(), True, img_idx=idx)[0]
        _same(mo, mr, "mask_input")
        for what, a, b in zip(("masks", "iou", "low_res"), o._predict(po[1], po[2], None, mo, False, img_idx=idx),
                              r._predict(pr[1], pr[2], None, mr, False, img_idx=idx)):
            _same(a, b, f"second pass {what}")


def test_bad_tensor_prompts_are_named(predictors):
    _, ours, _, _ = predictors
    with pytest.raises(PromptError, match=r"\(B, N, 2\)"):
        ours._predict(torch.zeros(3, 2), torch.ones(3, dtype=torch.int32))
    with pytest.raises(PromptError, match="together"):
        ours._predict(torch.zeros(1, 1, 2), None)
    with pytest.raises(PromptError, match="img_idx 3 is out of range"):
        ours._prep_prompts(np.array([[1.0, 2.0]]), np.array([1]), None, None, True, img_idx=3)
    fresh = SAM2ImagePredictor(ours.model)
    with pytest.raises(RuntimeError, match="must be set"):
        fresh._predict(torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.int32))
    ours._predict(torch.full((1, 1, 2), 16.0), torch.ones(1, 1, dtype=torch.int32))  # still usable
