"""Hiera windowed attention: reference against the official block, kernel against reference."""

from __future__ import annotations

import pytest
import torch
from ktest_util import assert_attention_error, needs_interp, poisoned, rel

from sam2_fast.kernels import window_attention as wa

try:
    from sam2.modeling.backbones.hieradet import MultiScaleBlock
except Exception:  # pragma: no cover - the oracle is a dev dependency
    MultiScaleBlock = None


def _block_via(attn_fn, blk, x):
    """The official block's forward with its attention core replaced by ``attn_fn``."""
    xn = blk.norm1(x)
    shortcut = x
    if blk.dim != blk.dim_out:
        shortcut = blk.proj(xn)
        if blk.pool is not None:
            shortcut = blk.pool(shortcut.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    qkv = blk.attn.qkv(xn)  # (B, H, W, 3*C) on the unpadded map
    a = attn_fn(qkv, blk.attn.qkv.bias, blk.attn.num_heads, blk.window_size, blk.pool is not None)
    y = shortcut + blk.attn.proj(a)
    return y + blk.mlp(blk.norm2(y))


def _make_block(dim, dim_out, heads, window, pool, seed=0):
    torch.manual_seed(seed)
    blk = MultiScaleBlock(dim, dim_out, heads, q_stride=(2, 2) if pool else None, window_size=window)
    with torch.no_grad():
        for p in blk.parameters():  # large, non-default weights (biases matter for padding)
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1.0))
    return blk.eval()


# (dim, dim_out, heads, window, pool, H, W): ragged windows, q-pool, global.
# (The official block cannot pool queries of a global block; our kernel can, tested below.)
BLOCKS = [
    (24, 24, 1, 4, False, 9, 11),
    (24, 48, 2, 4, True, 10, 14),
    (16, 16, 2, 0, False, 5, 7),
    (16, 32, 2, 6, True, 8, 10),
]


@pytest.mark.skipif(MultiScaleBlock is None, reason="sam2 reference not installed")
@pytest.mark.parametrize("cfg", BLOCKS)
def test_reference_matches_official_block(cfg):
    dim, dim_out, heads, window, pool, h, w = cfg
    blk = _make_block(dim, dim_out, heads, window, pool)
    x = torch.randn(2, h, w, dim)
    with torch.no_grad():
        want = blk(x)
        got = _block_via(wa.window_attention_reference, blk, x)
    assert rel(got, want) <= 1e-5, rel(got, want)


@pytest.mark.skipif(MultiScaleBlock is None, reason="sam2 reference not installed")
def test_mutation_zero_padding_is_caught():
    """Padding with zeros instead of the projection bias must fail by a wide margin.

    The comparison is on the attention output (the residual stream would dilute it); the
    test above ties the correct rule to the official block.
    """
    blk = _make_block(24, 24, 1, 4, False)
    x = torch.randn(1, 9, 11, 24)
    with torch.no_grad():
        blk.attn.qkv.bias.mul_(3.0)  # padded keys then score like real ones
        qkv = blk.attn.qkv(blk.norm1(x))
        good = wa.window_attention_reference(qkv, blk.attn.qkv.bias, 1, 4, False)
        bad = wa.window_attention_reference(qkv, None, 1, 4, False)
    assert rel(bad, good) > 1e-2, rel(bad, good)


def test_unsupported_reasons_are_named():
    qkv = torch.randn(1, 9, 10, 3 * 8)
    assert "even map" in wa.unsupported_reason(qkv, None, 1, 4, True)
    assert "3 * num_heads" in wa.unsupported_reason(torch.randn(1, 4, 4, 10), None, 1, 4, False)
    assert "dtype" in wa.unsupported_reason(qkv.double(), None, 1, 4, False)
    assert wa.unsupported_reason(qkv, None, 1, 4, False) is None
    with pytest.raises(ValueError, match="even map"):
        wa.window_attention_reference(qkv, None, 1, 4, True)


# ---------------------------------------------------------------- kernel (interpreter)

# (B, H, W, heads, head_dim, window, pool): Hiera head dims 96/56/72, ragged and exact windows
KERNEL_CASES = [
    (1, 9, 11, 1, 96, 4, False),   # ragged windows on both sides
    (2, 8, 8, 2, 56, 4, True),     # q-pool at a stage transition, batch 2
    (1, 10, 14, 1, 72, 4, True),   # q-pool with ragged windows
    (1, 7, 9, 1, 72, 0, False),    # global attention, odd token count (63)
    (1, 6, 10, 1, 56, 0, True),    # global attention with q pooling
    (2, 15, 15, 1, 96, 14, False), # 14-windows (196 tokens, not a block multiple)
    (1, 14, 14, 2, 56, 14, True),  # 14 -> 7 pooled windows
]


@pytest.mark.interp
@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_matches_reference(case, dtype):
    b, h, w, heads, hd, window, pool = case
    torch.manual_seed(hash(case) % 1000)
    c = heads * hd
    qkv = torch.randn(b, h, w, 3 * c).to(dtype)
    bias = torch.randn(3 * c).to(dtype)
    exact = wa.window_attention_reference(qkv.double(), bias.double(), heads, window, pool)
    torch_same = wa.window_attention_reference(qkv, bias, heads, window, pool)
    out = poisoned(exact.shape, dtype)
    got = wa.window_attention_triton(qkv, bias, heads, window, pool, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_attention_error(got, torch_same, exact, f"window_attention{case} {dtype}")


@pytest.mark.interp
@needs_interp
def test_kernel_mutation_padding_from_zeros_fails():
    """The kernel without the bias (padding = zeros) is far from the reference."""
    qkv = torch.randn(1, 9, 11, 3 * 24)
    bias = torch.randn(3 * 24)
    want = wa.window_attention_reference(qkv, bias, 1, 4, False)
    assert rel(wa.window_attention_triton(qkv, bias, 1, 4, False), want) < 1e-5
    assert rel(wa.window_attention_triton(qkv, None, 1, 4, False), want) > 1e-2


@pytest.mark.interp
@needs_interp
@pytest.mark.parametrize("case", [c for c in KERNEL_CASES if c[4] in (72, 96)])
def test_kernel_sm80_tiles_match_reference(monkeypatch, case):
    """The tile the launcher picks on sm_8x cards (32-key blocks for head dims 72/96, chosen
    there to stay spill-free) computes the same attention: fp16 under the interpreter."""
    from sam2_fast.kernels._common import Card
    b, h, w, heads, hd, window, pool = case
    monkeypatch.setattr(wa, "card", lambda device: Card((8, 0), 108))
    assert wa.pick_config(16, hd, torch.float16, (8, 0)).block_n == 32
    assert wa.pick_config(16, hd, torch.float16, (9, 0)).block_n == 64
    torch.manual_seed(hash(case) % 1000 + 1)
    c = heads * hd
    qkv = torch.randn(b, h, w, 3 * c).half()
    bias = torch.randn(3 * c).half()
    exact = wa.window_attention_reference(qkv.double(), bias.double(), heads, window, pool)
    torch_same = wa.window_attention_reference(qkv, bias, heads, window, pool)
    got = wa.window_attention_triton(qkv, bias, heads, window, pool, out=poisoned(exact.shape, torch.float16))
    assert_attention_error(got, torch_same, exact, f"window_attention sm80 tile {case}")
