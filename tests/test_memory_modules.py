"""Parity of axial RoPE, memory attention and the memory encoder with sam2 1.1.0.

Memory attention runs on reduced square grids (15x15, 16x16: the RoPE tables are rebuilt for
that size, as the reference does) with 1..7 memory frames and 0..16 object-pointer tokens
(a 256-d pointer is split into 4 tokens of 64 dims, so pointer counts are multiples of 4).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from sam2.build_sam import build_sam2
from sam2.modeling.memory_attention import MemoryAttention as RefMemoryAttention
from sam2.modeling.memory_attention import MemoryAttentionLayer as RefMemoryAttentionLayer
from sam2.modeling.memory_encoder import CXBlock as RefCXBlock
from sam2.modeling.memory_encoder import Fuser as RefFuser
from sam2.modeling.memory_encoder import MaskDownSampler as RefMaskDownSampler
from sam2.modeling.memory_encoder import MemoryEncoder as RefMemoryEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine as RefSine
from sam2.modeling.position_encoding import apply_rotary_enc, compute_axial_cis
from sam2.modeling.sam.transformer import RoPEAttention as RefRoPEAttention

from sam2_fast.config import PRESETS
from sam2_fast.modeling import rope as rope_mod
from sam2_fast.modeling.mask_decoder import build_mask_decoder
from sam2_fast.modeling.memory_attention import build_memory_attention
from sam2_fast.modeling.memory_encoder import build_memory_encoder
from sam2_fast.modeling.prompt_encoder import build_prompt_encoder
from sam2_fast.modeling.rope import RoPEAttention, apply_axial_rope, axial_rope_angles, axial_rope_table
from support import assert_close_rel, rel_err, sensitize_

TOL = 1e-4
CFG = PRESETS["sam2.1_hiera_tiny"]
C, MEM = CFG.d_model, CFG.mem_dim


# ----------------------------------------------------------------------------- RoPE primitives
@pytest.mark.parametrize("dim,side", [(256, 16), (64, 15), (32, 7)])
def test_rope_table_matches_reference(dim, side):
    cos, sin = axial_rope_table(dim, side, side)
    ref = compute_axial_cis(dim=dim, end_x=side, end_y=side)
    assert_close_rel(cos, ref.real, 1e-6, "cos")
    assert_close_rel(sin, ref.imag, 1e-6, "sin")


@pytest.mark.parametrize("frames,excluded", [(1, 0), (3, 0), (2, 8)])
def test_apply_rope_matches_reference(frames, excluded):
    gen = torch.Generator().manual_seed(frames)
    side, dim = 9, 32
    q = torch.randn(2, 1, side * side, dim, generator=gen)
    k = torch.randn(2, 1, frames * side * side + excluded, dim, generator=gen)
    cos, sin = axial_rope_table(dim, side, side)
    oq, ok = apply_axial_rope(q, k, cos, sin, repeat_k=True, num_k_exclude=excluded)
    n_rot = k.shape[-2] - excluded
    rq, rk_rot = apply_rotary_enc(q, k[:, :, :n_rot].clone(), compute_axial_cis(dim, side, side),
                                  repeat_freqs_k=True)
    assert_close_rel(oq, rq, 1e-6, "q")
    assert_close_rel(ok[:, :, :n_rot], rk_rot, 1e-6, "k rotated")
    assert torch.equal(ok[:, :, n_rot:], k[:, :, n_rot:])  # pointer tokens untouched


def test_rope_errors():
    attn = RoPEAttention(64, 1, kv_in_dim=16, rope_k_repeat=True)
    with pytest.raises(ValueError, match="square"):
        attn(torch.randn(1, 10, 64), torch.randn(1, 10, 16), torch.randn(1, 10, 16))
    with pytest.raises(ValueError, match="whole number"):
        attn(torch.randn(1, 9, 64), torch.randn(1, 13, 16), torch.randn(1, 13, 16))
    with pytest.raises(ValueError, match="divisible by 4"):
        axial_rope_angles(6, 3, 3)


# ----------------------------------------------------------------------------- memory attention
def _ref_memory_attention(num_layers: int) -> RefMemoryAttention:
    def attn(**extra):
        return RefRoPEAttention(rope_theta=10000.0, feat_sizes=[64, 64], embedding_dim=C, num_heads=1,
                                downsample_rate=1, dropout=0.1, **extra)

    layer = RefMemoryAttentionLayer(
        activation="relu", cross_attention=attn(rope_k_repeat=True, kv_in_dim=MEM), d_model=C,
        dim_feedforward=2048, dropout=0.1, pos_enc_at_attn=False, pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False, self_attention=attn())
    return RefMemoryAttention(d_model=C, pos_enc_at_input=True, layer=layer, num_layers=num_layers)


def _memory_attention_pair(seed=0, num_layers=4):
    ref = _ref_memory_attention(num_layers)
    ours = build_memory_attention(replace(CFG, mem_attn_layers=num_layers))
    sensitize_(ref, seed)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


def _memory_inputs(gen, side, frames, ptr_tokens, batch=2):
    hw = side * side
    m = frames * hw + ptr_tokens
    return dict(curr=torch.randn(hw, batch, C, generator=gen), memory=torch.randn(m, batch, MEM, generator=gen),
                curr_pos=torch.randn(hw, batch, C, generator=gen), memory_pos=torch.randn(m, batch, MEM, generator=gen),
                num_obj_ptr_tokens=ptr_tokens)


@pytest.mark.parametrize("side,frames,ptrs", [(16, 1, 0), (16, 1, 16), (15, 3, 4), (16, 7, 16), (15, 7, 0), (16, 2, 8)])
def test_memory_attention_parity(side, frames, ptrs):
    ref, ours = _memory_attention_pair(seed=side + frames + ptrs)
    gen = torch.Generator().manual_seed(100 * frames + ptrs)
    inputs = _memory_inputs(gen, side, frames, ptrs)
    with torch.no_grad():
        r = ref(**inputs)
        o = ours(**inputs)
    assert o.shape == (side * side, 2, C)
    assert_close_rel(o, r, TOL, "memory_attention")


def test_memory_attention_list_inputs_and_errors():
    ref, ours = _memory_attention_pair(seed=3, num_layers=1)
    gen = torch.Generator().manual_seed(4)
    x = _memory_inputs(gen, 9, 2, 4)
    with torch.no_grad():
        r = ref(**x)
        o = ours(**dict(x, curr=[x["curr"]], curr_pos=[x["curr_pos"]]))
    assert_close_rel(o, r, TOL)
    # a bf16 memory bank is upcast exactly (the reference needs it upcast by hand)
    bank = dict(x, memory=x["memory"].bfloat16(), memory_pos=x["memory_pos"].bfloat16())
    with torch.no_grad():
        r16 = ref(**dict(bank, memory=bank["memory"].float(), memory_pos=bank["memory_pos"].float()))
        assert_close_rel(ours(**bank), r16, TOL, "bf16 bank")
    with pytest.raises(ValueError, match="batch"):
        ours(x["curr"], x["memory"][:, :1], x["curr_pos"], x["memory_pos"][:, :1])
    with pytest.raises(ValueError, match="whole number"):  # pointer count not declared
        ours(x["curr"], x["memory"], x["curr_pos"], x["memory_pos"], num_obj_ptr_tokens=0)


def test_memory_attention_dropout_only_in_training():
    _, ours = _memory_attention_pair(seed=11, num_layers=1)
    x = _memory_inputs(torch.Generator().manual_seed(12), 7, 1, 4)
    with torch.no_grad():
        assert torch.equal(ours(**x), ours(**x))  # eval: deterministic
        ours.train()
        torch.manual_seed(0)
        noisy = ours(**x)
        ours.eval()
        assert rel_err(noisy, ours(**x)) > 10 * TOL  # training: dropout 0.1 active


def test_memory_attention_bf16_autocast_matches_reference():
    ref, ours = _memory_attention_pair(seed=13, num_layers=2)
    x = _memory_inputs(torch.Generator().manual_seed(14), 9, 2, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert_close_rel(ours(**x), ref(**x), 1e-2, "bf16 memory attention")


def _mutated_rope_on_pointers(q, k, cos, sin, repeat_k=False, num_k_exclude=0):
    """Wrong rule: pointer tokens rotated as if they sat at the first grid positions."""
    q_out, k_out = _REAL_APPLY(q, k, cos, sin, repeat_k=repeat_k, num_k_exclude=num_k_exclude)
    if num_k_exclude:
        tail = rope_mod.rotate_pairs(k_out[..., -num_k_exclude:, :], cos[:num_k_exclude], sin[:num_k_exclude])
        k_out = torch.cat([k_out[..., :-num_k_exclude, :], tail], dim=-2)
    return q_out, k_out


_REAL_APPLY = apply_axial_rope


def test_mutation_rope_on_pointer_tokens(monkeypatch):
    ref, ours = _memory_attention_pair(seed=5)
    gen = torch.Generator().manual_seed(6)
    inputs = _memory_inputs(gen, 16, 1, 16)
    with torch.no_grad():
        r = ref(**inputs)
        monkeypatch.setattr(rope_mod, "apply_axial_rope", _mutated_rope_on_pointers)
        o = ours(**inputs)
    err = rel_err(o, r)
    assert err > 10 * TOL, f"rotating pointer tokens changed the output by only {err:.2e}"


def test_mutation_swapped_rope_axes():
    ref, ours = _memory_attention_pair(seed=7)
    side = 15
    gen = torch.Generator().manual_seed(8)
    inputs = _memory_inputs(gen, side, 2, 4)
    for mod in ours.modules():
        if isinstance(mod, RoPEAttention):
            ang = axial_rope_angles(mod.head_dim, side, side, mod.rope_theta)
            quarter = mod.head_dim // 4
            swapped = torch.cat([ang[:, quarter:], ang[:, :quarter]], dim=1)  # rows drive the x half
            mod._tables[(side, side, "cpu")] = (swapped.cos(), swapped.sin())
    with torch.no_grad():
        err = rel_err(ours(**inputs), ref(**inputs))
    assert err > 10 * TOL, f"swapping RoPE axes changed the output by only {err:.2e}"


def test_mutation_pos_enc_on_cross_attn_queries():
    ref, ours = _memory_attention_pair(seed=9, num_layers=2)
    for layer in ours.layers:
        layer.pos_enc_at_cross_attn_queries = True
    gen = torch.Generator().manual_seed(10)
    inputs = _memory_inputs(gen, 9, 1, 4)
    with torch.no_grad():
        assert rel_err(ours(**inputs), ref(**inputs)) > 10 * TOL


# ----------------------------------------------------------------------------- memory encoder
def _memory_encoder_pair(seed=0):
    ref = RefMemoryEncoder(
        out_dim=MEM, mask_downsampler=RefMaskDownSampler(kernel_size=3, stride=2, padding=1),
        fuser=RefFuser(RefCXBlock(dim=C, kernel_size=7, padding=3, layer_scale_init_value=1e-6, use_dwconv=True),
                       num_layers=2),
        position_encoding=RefSine(num_pos_feats=MEM, normalize=True, scale=None, temperature=10000))
    ours = build_memory_encoder(CFG)
    sensitize_(ref, seed)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


@pytest.mark.parametrize("skip_sigmoid", [False, True])
@pytest.mark.parametrize("grid", [(9, 11), (8, 8)])
def test_memory_encoder_parity(skip_sigmoid, grid):
    ref, ours = _memory_encoder_pair(seed=grid[0])
    gen = torch.Generator().manual_seed(grid[1])
    h, w = grid
    pix = torch.randn(2, C, h, w, generator=gen)
    masks = torch.randn(2, 1, 16 * h, 16 * w, generator=gen) * 8
    if skip_sigmoid:
        masks = masks.sigmoid()
    with torch.no_grad():
        r = ref(pix, masks, skip_mask_sigmoid=skip_sigmoid)
        o = ours(pix, masks, skip_mask_sigmoid=skip_sigmoid)
    assert set(o) == {"vision_features", "vision_pos_enc"} and len(o["vision_pos_enc"]) == 1
    assert_close_rel(o["vision_features"], r["vision_features"], TOL, "vision_features")
    assert_close_rel(o["vision_pos_enc"][0], r["vision_pos_enc"][0], TOL, "vision_pos_enc")


def test_memory_encoder_projects_expanded_features_once():
    """Batched tracking hands one frame's features expanded over the objects (stride 0): the
    projection runs once and each row equals the reference's batch-1 call for that object
    (bitwise on this CPU), with one convolution instead of one per object."""
    ref, ours = _memory_encoder_pair(seed=4)
    gen = torch.Generator().manual_seed(5)
    pix = torch.randn(1, C, 8, 8, generator=gen)
    masks = torch.randn(3, 1, 128, 128, generator=gen) * 8
    calls = []
    hook = ours.pix_feat_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        with torch.no_grad():
            got = ours(pix.expand(3, -1, -1, -1), masks)["vision_features"]
            rows = [ref(pix, masks[i:i + 1])["vision_features"] for i in range(3)]
    finally:
        hook.remove()
    assert calls == [1]
    for i in range(3):
        assert_close_rel(got[i:i + 1], rows[i], TOL, f"row {i}")


def test_memory_encoder_mutations_and_errors():
    ref, ours = _memory_encoder_pair(seed=1)
    gen = torch.Generator().manual_seed(2)
    pix = torch.randn(1, C, 7, 9, generator=gen)
    masks = torch.randn(1, 1, 112, 144, generator=gen) * 8
    with torch.no_grad():
        r = ref(pix, masks)["vision_features"]
        no_sigmoid = ours(pix, masks, skip_mask_sigmoid=True)["vision_features"]
        for blk in ours.fuser.layers:
            blk.gamma = None  # forget the layer scale
        no_gamma = ours(pix, masks)["vision_features"]
    assert rel_err(no_sigmoid, r) > 10 * TOL
    assert rel_err(no_gamma, r) > 10 * TOL
    with pytest.raises(ValueError, match="does not match"):
        ours(pix, masks[..., :64, :64])


# ----------------------------------------------------------------------------- checkpoint contract
def test_builders_give_official_state_dict_keys_and_shapes():
    """Our four builders hold exactly the official model's parameters (names and shapes)."""
    full = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu", mode="eval")
    sd = full.state_dict()
    builders = {"sam_prompt_encoder.": build_prompt_encoder, "sam_mask_decoder.": build_mask_decoder,
                "memory_attention.": build_memory_attention, "memory_encoder.": build_memory_encoder}
    for prefix, build in builders.items():
        ours = {k: tuple(v.shape) for k, v in build(CFG).state_dict().items()}
        ref = {k[len(prefix):]: tuple(v.shape) for k, v in sd.items() if k.startswith(prefix)}
        assert ours == ref, f"{prefix}: differing keys {sorted(set(ours) ^ set(ref))}"
