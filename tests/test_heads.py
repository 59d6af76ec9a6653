"""Parity of the SAM heads (prompt encoder, two-way transformer, mask decoder) with sam2 1.1.0.

Each test builds the reference module with the same hyper-parameters, redraws its weights
with ``sensitize_``, loads them strictly into ours and compares outputs (fp32, CPU) on odd,
non-square grids.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from sam2.modeling.sam.mask_decoder import MaskDecoder as RefMaskDecoder
from sam2.modeling.sam.prompt_encoder import PromptEncoder as RefPromptEncoder
from sam2.modeling.sam.transformer import TwoWayTransformer as RefTwoWayTransformer

from sam2_fast.config import PRESETS, MaskDecoderExtraArgs
from sam2_fast.modeling import transformer as tf_mod
from sam2_fast.modeling.mask_decoder import MaskDecoder, build_mask_decoder, stability_scores
from sam2_fast.modeling.prompt_encoder import PromptEncoder, build_prompt_encoder
from sam2_fast.modeling.transformer import TwoWayTransformer
from support import EXACT_TOL, assert_close_rel, sensitize_

from sam2_fast.modeling import mask_decoder as md_mod
from sam2_fast.modeling import position_encoding as pe_mod

# Per output: 10x the relative error a faithful fp32 run measures over this file's parity
# cases (CPU, 1 and 2 threads, commit 499c2fc); EXACT_TOL (6e-7) where it measures 0.
TOL = {
    "sparse": EXACT_TOL,  # measured 0
    "dense": 3e-6,  # measured 2.6e-7 (mask downscaling convs + LayerNorm2d)
    "dense_pe": EXACT_TOL,  # measured 0
    "queries": EXACT_TOL,  # two-way transformer, measured 0
    "keys": EXACT_TOL,  # measured 0
    "masks": 2e-6,  # measured 2.0e-7 (builders' case 1.0e-7)
    "iou_pred": EXACT_TOL,  # measured 0
    "sam_tokens_out": EXACT_TOL,  # measured 0
    "object_score_logits": EXACT_TOL,  # measured 0
}
GRID = (9, 11)  # odd, non-square embedding grid
IMG = (GRID[0] * 16, GRID[1] * 16)
DIM = 256


def _twin(ref: torch.nn.Module, ours: torch.nn.Module, seed: int):
    sensitize_(ref, seed)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


# ----------------------------------------------------------------------------- prompt encoder
def _prompt_encoders(seed=0):
    torch.manual_seed(seed)
    ref = RefPromptEncoder(embed_dim=DIM, image_embedding_size=GRID, input_image_size=IMG, mask_in_chans=16)
    ours = PromptEncoder(embed_dim=DIM, image_embedding_size=GRID, input_image_size=IMG, mask_in_chans=16)
    return _twin(ref, ours, seed)


def _points(gen, b, n, with_pad=True):
    coords = torch.rand(b, n, 2, generator=gen) * torch.tensor([IMG[1], IMG[0]], dtype=torch.float32)
    labels = torch.randint(0, 4 if with_pad else 2, (b, n), generator=gen, dtype=torch.int32)
    if with_pad:
        labels[:, -1] = -1  # an explicit padding point among the inputs
    return coords, labels


def _boxes(gen, b):
    xy0 = torch.rand(b, 2, generator=gen) * 60
    return torch.cat([xy0, xy0 + 20 + torch.rand(b, 2, generator=gen) * 60], dim=1)


def check_prompt_encoder(kind):
    ref, ours = _prompt_encoders(seed=1)
    gen = torch.Generator().manual_seed(7)
    b = 3
    points = _points(gen, b, 5) if "points" in kind or kind == "all" else None
    boxes = _boxes(gen, b) if "box" in kind or kind == "all" else None
    masks = torch.randn(b, 1, 4 * GRID[0], 4 * GRID[1], generator=gen) if "mask" in kind or kind == "all" else None
    with torch.no_grad():
        rs, rd = ref(points, boxes, masks)
        os_, od = ours(points, boxes, masks)
    assert os_.shape == rs.shape and od.shape == rd.shape, f"sparse {tuple(os_.shape)} vs {tuple(rs.shape)}"
    if rs.numel():
        assert_close_rel(os_, rs, TOL["sparse"], "sparse")
    assert_close_rel(od, rd, TOL["dense"], "dense")
    assert_close_rel(ours.get_dense_pe(), ref.get_dense_pe(), TOL["dense_pe"], "dense_pe")
    assert ours.mask_input_size == ref.mask_input_size


@pytest.mark.parametrize("kind", ["points", "box", "mask", "points+box", "points+mask", "all", "none"])
def test_prompt_encoder_parity(kind):
    check_prompt_encoder(kind)


def test_prompt_encoder_attributes_and_errors():
    _, ours = _prompt_encoders()
    assert ours.embed_dim == DIM and ours.image_embedding_size == GRID and ours.input_image_size == IMG
    with pytest.raises(ValueError, match="mask prompts"):
        ours(None, None, torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="points must be"):
        ours((torch.randn(1, 3), torch.ones(1, 3)), None, None)


def test_mutation_prompt_encoder_drops_the_pad_point(monkeypatch):
    """Product mutation: no padding point appended to clicks given without a box."""
    real = PromptEncoder._embed_points
    monkeypatch.setattr(PromptEncoder, "_embed_points", lambda self, p, l, pad: real(self, p, l, False))
    with pytest.raises(AssertionError, match="sparse") as info:
        check_prompt_encoder("points")
    print(info.value)


def test_mutation_prompt_encoder_forgets_the_pixel_centre(monkeypatch):
    """Product mutation: point/box coordinates encoded without the +0.5 pixel-centre shift."""
    real = pe_mod.PositionEmbeddingRandom.forward_with_coords
    monkeypatch.setattr(pe_mod.PositionEmbeddingRandom, "forward_with_coords",
                        lambda self, coords, size: real(self, coords - 0.5, size))
    with pytest.raises(AssertionError, match="sparse") as info:
        check_prompt_encoder("points+box")
    print(info.value)


# ----------------------------------------------------------------------------- two-way transformer
def test_two_way_transformer_parity():
    torch.manual_seed(0)
    ref = RefTwoWayTransformer(depth=2, embedding_dim=DIM, num_heads=8, mlp_dim=2048)
    ours = TwoWayTransformer(depth=2, embedding_dim=DIM, num_heads=8, mlp_dim=2048)
    ref, ours = _twin(ref, ours, 4)
    gen = torch.Generator().manual_seed(5)
    img = torch.randn(2, DIM, *GRID, generator=gen)
    pe = torch.randn(2, DIM, *GRID, generator=gen)
    tok = torch.randn(2, 7, DIM, generator=gen)
    with torch.no_grad():
        rq, rk = ref(img, pe, tok)
        oq, ok = ours(img, pe, tok)
    assert_close_rel(oq, rq, TOL["queries"], "queries")
    assert_close_rel(ok, rk, TOL["keys"], "keys")


# ----------------------------------------------------------------------------- mask decoder
def _decoder_kwargs(**over):
    kw = dict(num_multimask_outputs=3, transformer_dim=DIM, iou_head_depth=3, iou_head_hidden_dim=256,
              use_high_res_features=True, iou_prediction_use_sigmoid=True, pred_obj_scores=True,
              pred_obj_scores_mlp=True, use_multimask_token_for_obj_ptr=True)
    kw.update(over)
    return kw


def _decoders(seed=0, **over):
    torch.manual_seed(seed)
    kw = _decoder_kwargs(**over)
    ref = RefMaskDecoder(transformer=RefTwoWayTransformer(depth=2, embedding_dim=DIM, mlp_dim=2048, num_heads=8), **kw)
    ours = MaskDecoder(transformer=TwoWayTransformer(depth=2, embedding_dim=DIM, mlp_dim=2048, num_heads=8), **kw)
    return _twin(ref, ours, seed)


def _decoder_inputs(gen, n_img, n_prompts, n_tokens=4):
    h, w = GRID
    return dict(
        image_embeddings=torch.randn(n_img, DIM, h, w, generator=gen),
        image_pe=torch.randn(1, DIM, h, w, generator=gen),
        sparse_prompt_embeddings=torch.randn(n_prompts, n_tokens, DIM, generator=gen),
        dense_prompt_embeddings=torch.randn(n_prompts, DIM, h, w, generator=gen),
        # per image, as the predictors pass them (they broadcast over repeated prompt sets)
        high_res_features=[torch.randn(n_img, DIM // 8, 4 * h, 4 * w, generator=gen),
                           torch.randn(n_img, DIM // 4, 2 * h, 2 * w, generator=gen)],
    )


def _compare_decoder(ref, ours, inputs, multimask, repeat_image):
    with torch.no_grad():
        r = ref(multimask_output=multimask, repeat_image=repeat_image, **inputs)
        o = ours(multimask_output=multimask, repeat_image=repeat_image, **inputs)
    names = ("masks", "iou_pred", "sam_tokens_out", "object_score_logits")
    return [assert_close_rel(a, b, TOL[n], n) for a, b, n in zip(o, r, names)]


def check_mask_decoder(multimask, variant):
    over = {} if variant == "sam2.1" else dict(use_high_res_features=False, iou_prediction_use_sigmoid=False,
                                                pred_obj_scores=False, pred_obj_scores_mlp=False,
                                                use_multimask_token_for_obj_ptr=False)
    ref, ours = _decoders(seed=3, **over)
    gen = torch.Generator().manual_seed(11)
    inputs = _decoder_inputs(gen, 3, 3, n_tokens=5)
    if variant == "plain":
        inputs["high_res_features"] = None
    _compare_decoder(ref, ours, inputs, multimask, repeat_image=False)


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("variant", ["sam2.1", "plain"])
def test_mask_decoder_parity(multimask, variant):
    check_mask_decoder(multimask, variant)


def test_mask_decoder_linear_obj_head_and_repeat_image():
    ref, ours = _decoders(seed=5, pred_obj_scores_mlp=False)
    gen = torch.Generator().manual_seed(12)
    inputs = _decoder_inputs(gen, 1, 3, n_tokens=3)
    _compare_decoder(ref, ours, inputs, multimask=True, repeat_image=True)


def check_dynamic_stability(delta):
    """Single-mask output with the stability fallback; threshold set so both branches occur."""
    ref, ours = _decoders(seed=6, dynamic_multimask_via_stability=True, dynamic_multimask_stability_delta=delta)
    gen = torch.Generator().manual_seed(13)
    inputs = _decoder_inputs(gen, 6, 6, n_tokens=3)
    with torch.no_grad():
        all_masks = ref.predict_masks(inputs["image_embeddings"], inputs["image_pe"],
                                      inputs["sparse_prompt_embeddings"], inputs["dense_prompt_embeddings"],
                                      False, inputs["high_res_features"])[0]
    scores = ref._get_stability_scores(all_masks[:, :1]).flatten()
    assert_close_rel(stability_scores(all_masks[:, :1], delta).flatten(), scores, 0.0, "stability")
    thresh = float(scores.sort().values[len(scores) // 2])  # about half the prompts fall back
    for m in (ref, ours):
        m.dynamic_multimask_stability_thresh = thresh
    stable = scores >= thresh
    assert stable.any() and (~stable).any()
    _compare_decoder(ref, ours, inputs, multimask=False, repeat_image=False)


@pytest.mark.parametrize("delta", [0.05, 0.5])
def test_mask_decoder_dynamic_stability(delta):
    check_dynamic_stability(delta)


def test_mutation_stability_fallback_off_by_one(monkeypatch):
    """Product mutation: the fallback takes the best multimask candidate's index without
    the +1 that skips the single-mask output (the mask one slot to the left)."""
    real = MaskDecoder._dynamic_multimask_via_stability

    def off_by_one(self, all_mask_logits, all_iou_scores):
        # slot j now holds output j-1: the real index best+1 reads what index best held
        shifted = torch.cat([all_mask_logits[:, :1], all_mask_logits[:, :-1]], dim=1)
        return real(self, shifted, all_iou_scores)

    monkeypatch.setattr(MaskDecoder, "_dynamic_multimask_via_stability", off_by_one)
    with pytest.raises(AssertionError, match="masks") as info:
        check_dynamic_stability(0.05)
    print(info.value)


def test_mutation_stability_delta_ignored(monkeypatch):
    """Product mutation: stability scored without the +-delta band (every mask "stable",
    the fallback never taken)."""
    real = md_mod.stability_scores
    monkeypatch.setattr(md_mod, "stability_scores", lambda logits, delta: real(logits, 0.0))
    with pytest.raises(AssertionError, match="masks") as info:
        check_dynamic_stability(0.5)
    print(info.value)


def test_mask_decoder_bf16_autocast_matches_reference():
    ref, ours = _decoders(seed=9)
    inputs = _decoder_inputs(torch.Generator().manual_seed(16), 2, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        r = ref(multimask_output=True, repeat_image=False, **inputs)
        o = ours(multimask_output=True, repeat_image=False, **inputs)
    for a, b in zip(o, r):
        assert a.dtype == b.dtype
        assert_close_rel(a, b, 1e-2, "bf16 decoder")


def test_mutation_mask_decoder_drops_the_stride8_map(monkeypatch):
    """Product mutation: the first upscaling stage leaves out the stride-8 high-res map."""
    real = MaskDecoder._upscale
    monkeypatch.setattr(MaskDecoder, "_upscale", lambda self, image, hr: real(
        self, image, None if hr is None else [hr[0], torch.zeros_like(hr[1])]))
    with pytest.raises(AssertionError, match="masks") as info:
        check_mask_decoder(True, "sam2.1")
    print(info.value)


def test_attention_core_is_the_dispatch_point(monkeypatch):
    """Replacing transformer.attention_core reroutes every attention of the decoder."""
    ref, ours = _decoders(seed=8)
    calls = []
    real = tf_mod.attention_core

    def spy(q, k, v, dropout_p=0.0):
        calls.append(q.shape)
        return real(q, k, v, dropout_p)

    monkeypatch.setattr(tf_mod, "attention_core", spy)
    gen = torch.Generator().manual_seed(15)
    inputs = _decoder_inputs(gen, 2, 2)
    _compare_decoder(ref, ours, inputs, multimask=True, repeat_image=False)
    assert len(calls) == 2 * 3 + 1


# ----------------------------------------------------------------------------- builders
@pytest.mark.parametrize("name", ["sam2.1_hiera_tiny", "sam2_hiera_large"])
def test_builders_match_reference_hyper_parameters(name):
    cfg = replace(PRESETS[name], image_size=160,
                  sam_mask_decoder_extra_args=MaskDecoderExtraArgs(True, 0.1, 0.9))
    grid = cfg.image_size // cfg.backbone_stride
    torch.manual_seed(0)
    ref_pe = RefPromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                              input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=16)
    ref_md = RefMaskDecoder(transformer=RefTwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                            **_decoder_kwargs(dynamic_multimask_via_stability=True,
                                              dynamic_multimask_stability_delta=0.1,
                                              dynamic_multimask_stability_thresh=0.9))
    ours_pe, ours_md = build_prompt_encoder(cfg), build_mask_decoder(cfg)
    _twin(ref_pe, ours_pe, 1)
    _twin(ref_md, ours_md, 2)
    assert ours_pe.image_embedding_size == (grid, grid) and ours_pe.input_image_size == (cfg.image_size,) * 2
    assert (ours_md.dynamic_multimask_stability_delta, ours_md.dynamic_multimask_stability_thresh) == (0.1, 0.9)
    gen = torch.Generator().manual_seed(3)
    pts = (torch.rand(2, 3, 2, generator=gen) * cfg.image_size, torch.randint(0, 2, (2, 3), generator=gen))
    with torch.no_grad():
        rs, rd = ref_pe(pts, None, None)
        os_, od = ours_pe(pts, None, None)
        feats = torch.randn(2, 256, grid, grid, generator=gen)
        hr = [torch.randn(2, 32, 4 * grid, 4 * grid, generator=gen), torch.randn(2, 64, 2 * grid, 2 * grid, generator=gen)]
        r = ref_md(feats, ref_pe.get_dense_pe(), rs, rd, False, False, hr)
        o = ours_md(feats, ours_pe.get_dense_pe(), os_, od, False, False, hr)
    for a, b, n in zip(o, r, ("masks", "iou_pred", "sam_tokens_out", "object_score_logits")):
        assert_close_rel(a, b, TOL[n], n)
