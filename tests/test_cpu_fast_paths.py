"""CPU fast paths that must not change a bit: complex RoPE, pooling, the cached position table.

* ``rope.rotate_pairs`` / ``apply_axial_rope``: a complex multiply on a ``view_as_complex``
  view, the table broadcast over memory frames (not tiled) and keys rotated straight into
  the key buffer, bitwise equal to the real formula with a tiled table it replaced;
* ``hiera.max_pool_hw``: ``F.max_pool2d`` on a permuted view, bitwise equal to the
  reshape + ``amax`` it replaced (NaN and -inf included);
* ``Hiera.position_embedding``: cached between frames in eager inference, rebuilt when the
  tables change, never cached when gradients are needed;
* a windowed block on a ragged map projects only the real tokens and pads the projection
  with the qkv bias (what a zero-padded token projects to), checked against sam2's block.
"""

from __future__ import annotations

import pytest
import torch
from support import rel_err, sensitize_

from sam2_fast.config import resolve_config
from sam2_fast.modeling import hiera as hiera_mod
from sam2_fast.modeling.rope import apply_axial_rope, axial_rope_table, rotate_pairs


def _rotate_real(x, cos, sin):
    """The real-arithmetic rotation rotate_pairs used before (the oracle)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2).to(x.dtype)


def test_rotate_pairs_bitwise_equals_real_formula():
    for dtype in (torch.float32, torch.bfloat16):
        _check_rotation(dtype)


def _check_rotation(dtype):
    g = torch.Generator().manual_seed(0)
    cos, sin = axial_rope_table(64, 12, 12)
    x = torch.randn(2, 1, 144, 64, generator=g).to(dtype)
    assert torch.equal(rotate_pairs(x, cos, sin), _rotate_real(x, cos, sin))
    # a strided view (keys sliced out of a longer projection, heads split) is rotated as is
    big = torch.randn(2, 400, 2, 64, generator=g).to(dtype).transpose(1, 2)[:, :, :144]
    assert torch.equal(rotate_pairs(big, cos, sin), _rotate_real(big, cos, sin))
    # memory frames: the table broadcast over frames equals the tiled table, bit for bit
    q = torch.randn(2, 1, 144, 64, generator=g).to(dtype)
    k = torch.randn(2, 1, 3 * 144 + 8, 64, generator=g).to(dtype)
    _, k_rot = apply_axial_rope(q, k, cos, sin, repeat_k=True, num_k_exclude=8)
    assert torch.equal(k_rot[..., :432, :], _rotate_real(k[..., :432, :], cos.repeat(3, 1), sin.repeat(3, 1)))
    assert torch.equal(k_rot[..., 432:, :], k[..., 432:, :])


def _pool_amax(x, stride):
    """The reshape + amax pooling max_pool_hw used before (the oracle)."""
    sh, sw = stride
    n, h, w = x.shape[:3]
    ho, wo = h // sh, w // sw
    x = x[:, :ho * sh, :wo * sw].reshape(n, ho, sh, wo, sw, *x.shape[3:])
    return x.amax(dim=(2, 4))


def test_max_pool_hw_bitwise_equals_strided_amax():
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(6, 8, 8, 3, 2, 48, generator=g)  # a window block's projection view
    ragged = torch.randn(2, 33, 31, 96, generator=g)  # odd map: floor mode drops a row/column
    ragged[0, 3, 4, 5] = float("nan")
    ragged[1, 0, 0, :] = float("-inf")
    cases = [qkv[:, :, :, 0], ragged, torch.randn(2, 16, 16, 96, generator=g).bfloat16()]
    for x in cases:
        got, want = hiera_mod.max_pool_hw(x, (2, 2)), _pool_amax(x, (2, 2))
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got.nan_to_num(0.5), want.nan_to_num(0.5))
        assert torch.equal(got.isnan(), want.isnan())
    assert hiera_mod.max_pool_hw(torch.randn(1, 1, 4, 8), (2, 2)).shape == (1, 0, 2, 8)


def _tiny_hiera():
    trunk = hiera_mod.Hiera(resolve_config("sam2.1_hiera_tiny").trunk).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        trunk.pos_embed.copy_(torch.randn(trunk.pos_embed.shape, generator=g))
        trunk.pos_embed_window.copy_(torch.randn(trunk.pos_embed_window.shape, generator=g))
    return trunk


def test_position_embedding_cache_is_exact_and_follows_the_tables():
    trunk = _tiny_hiera()
    with torch.no_grad():
        fresh = trunk._position_embedding(16, 16)
        first = trunk.position_embedding(16, 16)
        assert torch.equal(first, fresh) and first.is_contiguous()
        assert trunk.position_embedding(16, 16) is first  # the second frame reuses it
        assert trunk.position_embedding(32, 32).shape == (1, 32, 32, trunk.pos_embed.shape[1])
        trunk.pos_embed.add_(1.0)  # an in-place update (load_state_dict copies in place too)
        assert torch.equal(trunk.position_embedding(32, 32), trunk._position_embedding(32, 32))
        trunk.load_state_dict({k: v * 2 for k, v in trunk.state_dict().items()})
        assert torch.equal(trunk.position_embedding(32, 32), trunk._position_embedding(32, 32))
        trunk.double()
        out64 = trunk.position_embedding(32, 32)
        assert out64.dtype == torch.float64 and torch.equal(out64, trunk._position_embedding(32, 32))
    # training needs gradients through the tables: computed inline, never cached
    trunk.float()
    emb = trunk.position_embedding(16, 16)
    assert emb.requires_grad
    emb.sum().backward()
    assert trunk.pos_embed.grad is not None and trunk.pos_embed_window.grad is not None


def test_position_embedding_of_a_trunk_built_in_inference_mode():
    """Inference tensors keep no version counter: such a trunk computes the table inline."""
    with torch.inference_mode():
        trunk = hiera_mod.Hiera(resolve_config("sam2.1_hiera_tiny").trunk).eval()
        assert trunk.pos_embed.is_inference()
        assert torch.equal(trunk.position_embedding(16, 16), trunk._position_embedding(16, 16))
        assert "_pos_cache" not in trunk.__dict__


# A ragged map's block projects only the real tokens and pads the projection with the qkv
# bias. Measured against sam2's block (same weights, fp32): 0 (bitwise) for these cases.
RAGGED_TOL = 1e-6


@pytest.mark.parametrize("dim,dim_out,heads,window,q_stride,side", [
    (32, 32, 2, 7, None, 10),  # plain windowed block, 10x10 map in 7-windows (14x14 padded)
    (32, 64, 2, 7, (2, 2), 12),  # stage transition: widened, q pooled, ragged windows
])
def test_ragged_window_block_matches_reference(monkeypatch, dim, dim_out, heads, window, q_stride, side):
    from sam2.modeling.backbones.hieradet import MultiScaleBlock as RefBlock

    ref = RefBlock(dim, dim_out, heads, q_stride=q_stride, window_size=window).eval()
    sensitize_(ref, 3)
    ours = hiera_mod.MultiScaleBlock(dim, dim_out, heads, window, q_stride=q_stride).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, side, side, dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(x)
        assert rel_err(ours(x), want) <= RAGGED_TOL
        real_split = hiera_mod.split_windows
        # mutation: pad the projection with zeros instead of the bias
        monkeypatch.setattr(hiera_mod, "split_windows", lambda m, win, fill=None: real_split(m, win))
        err = rel_err(ours(x), want)
    assert err > 100 * RAGGED_TOL, f"zero-padded projections went unnoticed: {err:.2e}"


@pytest.mark.parametrize("q_stride", [None, (2, 2)])
def test_ragged_block_cuda_choice_pads_like_the_reference(monkeypatch, q_stride):
    """CUDA zero-pads the map and projects every token (2 launches, as the reference) instead
    of filling the projection with the bias (4 launches): same numbers, bitwise, on CPU."""
    from sam2.modeling.backbones.hieradet import MultiScaleBlock as RefBlock

    dim_out = 32 if q_stride is None else 64
    ref = RefBlock(32, dim_out, 2, q_stride=q_stride, window_size=7).eval()
    sensitize_(ref, 5)
    ours = hiera_mod.MultiScaleBlock(32, dim_out, 2, 7, q_stride=q_stride).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 12, 12, 32, generator=torch.Generator().manual_seed(6))
    assert hiera_mod._project_real_tokens_only("cpu") and not hiera_mod._project_real_tokens_only("cuda")
    calls = []
    real_split = hiera_mod.split_windows
    monkeypatch.setattr(hiera_mod, "split_windows", lambda m, win, fill=None: calls.append(fill) or real_split(m, win, fill))
    with torch.no_grad():
        filled = ours(x)
        monkeypatch.setattr(hiera_mod, "_project_real_tokens_only", lambda device_type: False)
        padded = ours(x)
        want = ref(x)
    assert calls[0] is not None and calls[-1] is None  # each path really ran
    assert torch.equal(padded, filled)
    assert rel_err(padded, want) <= RAGGED_TOL
