"""Memory cross-attention in the 64-d value space (``sam2_fast/modeling/value_space.py``).

Checked in fp32 with the sensitive weight recipe, against the plain layer (projected
values, ``value_space = False``) and against sam2 1.1.0: one cross-attention layer, the
static bank, and end-to-end video tracking. The fused output matrix is derived from the
live parameters, so weight loads, in-place edits, dtype changes and gradients are checked
too.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sam2.modeling.sam.transformer import RoPEAttention as RefRoPEAttention

import video_utils as V
from support import rel_err, sensitize_
from test_memory_modules import _memory_attention_pair, _memory_inputs

from sam2_fast.modeling import value_space as vs
from sam2_fast.modeling.rope import RoPEAttention
from sam2_fast.runtime import disable_fast_runtime, enable_fast_runtime
from sam2_fast.runtime import static_bank as sb

C, MEM = 256, 64
# Value space vs the plain layer / sam2 in fp32 (same sums, another rounding order),
# measured worst: one cross-attention layer 4.0e-7 (2 heads: 3.5e-7), the 4-layer stack
# 3.3e-7, the static bank 3.8e-7; tolerances are 10x that.
LAYER_TOL = 4e-6
STACK_TOL = 4e-6
# End-to-end tracking (fp32 memory banks, 2 objects, 9 frames at 128 px), worst frame:
# measured 1.0e-6 against the plain path, 1.4e-6 against sam2 (eager and static bank).
TRACK_TOL = 1.5e-5


# ----------------------------------------------------------------------------- one layer
def _cross_pair(seed, heads=1, dim=C, kv_in=MEM):
    ref = RefRoPEAttention(rope_theta=10000.0, feat_sizes=[64, 64], embedding_dim=dim, num_heads=heads,
                           downsample_rate=1, dropout=0.1, rope_k_repeat=True, kv_in_dim=kv_in)
    sensitize_(ref, seed)
    ours = RoPEAttention(dim, heads, dropout=0.1, rope_k_repeat=True, kv_in_dim=kv_in)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


def _cross_inputs(seed, side, frames, ptrs, batch=2, dim=C, kv_in=MEM):
    g = torch.Generator().manual_seed(seed)
    nk = frames * side * side + ptrs
    return (torch.randn(batch, side * side, dim, generator=g), torch.randn(batch, nk, kv_in, generator=g),
            torch.randn(batch, nk, kv_in, generator=g))


def _plain(module, *args, **kwargs):
    module.value_space = False
    try:
        return module(*args, **kwargs)
    finally:
        module.value_space = True


@pytest.mark.parametrize("side,frames,ptrs", [(8, 1, 0), (8, 7, 64), (9, 3, 16), (12, 2, 4)])
def test_cross_attention_layer_matches_plain_and_reference(side, frames, ptrs):
    ref, ours = _cross_pair(seed=side + frames)
    assert ours.value_space
    q, k, m = _cross_inputs(side * frames + ptrs, side, frames, ptrs)
    with torch.no_grad():
        r = ref(q, k + m, m, num_k_exclude_rope=ptrs)
        plain = _plain(ours, q, k + m, m, num_k_exclude_rope=ptrs)
        fast = ours(q, k + m, m, num_k_exclude_rope=ptrs)
    assert torch.equal(plain, r), "the plain path is the reference's arithmetic"
    err = rel_err(fast, r)
    assert err <= LAYER_TOL, f"value space vs sam2: {err:.2e}"


@pytest.fixture(scope="module")
def stack_pair():
    return _memory_attention_pair(seed=30)


def test_memory_attention_stack_matches_reference(stack_pair):
    ref, ours = stack_pair
    x = _memory_inputs(torch.Generator().manual_seed(22), 8, 7, 64)
    with torch.no_grad():
        err = rel_err(ours(**x), ref(**x))
    assert err <= STACK_TOL, f"4-layer memory attention vs sam2: {err:.2e}"


def test_several_heads_and_no_pointer_keys():
    """The algebra per head: 2 heads of 32 over 16-d values, and keys that are all pointers."""
    _, ours = _cross_pair(seed=3, heads=2, dim=64, kv_in=16)
    q, k, m = _cross_inputs(4, 6, 2, 5, dim=64, kv_in=16)
    with torch.no_grad():
        assert rel_err(ours(q, k, m, num_k_exclude_rope=5), _plain(ours, q, k, m, num_k_exclude_rope=5)) <= LAYER_TOL
        k_ptr, m_ptr = k[:, -5:], m[:, -5:]
        got = ours(q, k_ptr, m_ptr, num_k_exclude_rope=5)
        assert rel_err(got, _plain(ours, q, k_ptr, m_ptr, num_k_exclude_rope=5)) <= LAYER_TOL


def test_fused_output_follows_weight_changes():
    """W_o W_v is derived on every call: a load, an in-place edit through .data (no version
    bump) and a dtype change are all seen."""
    _, ours = _cross_pair(seed=5)
    other, _ = _cross_pair(seed=6)
    q, k, m = _cross_inputs(7, 8, 2, 8)
    with torch.no_grad():
        before = ours(q, k, m, num_k_exclude_rope=8)
        ours.load_state_dict(other.state_dict())
        after = ours(q, k, m, num_k_exclude_rope=8)
        assert rel_err(after, before) > 0.1
        assert rel_err(after, _plain(ours, q, k, m, num_k_exclude_rope=8)) <= LAYER_TOL
        ours.v_proj.weight.data.mul_(1.5)
        ours.out_proj.bias.data.add_(0.25)
        edited = ours(q, k, m, num_k_exclude_rope=8)
        assert rel_err(edited, _plain(ours, q, k, m, num_k_exclude_rope=8)) <= LAYER_TOL
        ours.double()
        q64, k64, m64 = q.double(), k.double(), m.double()
        out64 = ours(q64, k64, m64, num_k_exclude_rope=8)
        assert out64.dtype == torch.float64
        assert rel_err(out64, _plain(ours, q64, k64, m64, num_k_exclude_rope=8)) <= 1e-12


def test_gradients_match_the_plain_path():
    _, ours = _cross_pair(seed=8)
    q, k, m = _cross_inputs(9, 6, 2, 4)
    grads = []
    for value_space in (True, False):
        ours.value_space = value_space
        ours.zero_grad()
        ours(q, k, m, num_k_exclude_rope=4).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    ours.value_space = True
    for name in grads[1]:
        assert rel_err(grads[0][name], grads[1][name]) <= 10 * LAYER_TOL, name


def test_training_dropout_keeps_the_plain_path():
    _, ours = _cross_pair(seed=10)
    q, _, _ = _cross_inputs(11, 6, 1, 0)
    assert ours.uses_value_space(q, None)
    ours.train()
    assert not ours.uses_value_space(q, None)  # dropped-out rows no longer sum to one
    ours.eval()
    plain_width = RoPEAttention(C, 1)  # self-attention: values as wide as a head
    assert not plain_width.value_space


def test_key_mask_is_checked_by_name():
    _, ours = _cross_pair(seed=12)
    q, k, m = _cross_inputs(13, 4, 1, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="key_mask"):
        ours(q, k, m, num_k_exclude_rope=4, key_mask=torch.ones(k.shape[1]))  # not bool
    with torch.no_grad(), pytest.raises(ValueError, match="key_mask"):
        ours(q, k, m, num_k_exclude_rope=4, key_mask=torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("mask_kind", [None, "shared", "per_batch"])
def test_attend_value_space_cpu_chunks_match_sdpa(monkeypatch, mask_kind):
    g = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(2, 50, 32, generator=g), torch.randn(2, 70, 32, generator=g),
               torch.randn(2, 70, 8, generator=g))
    mask = None
    if mask_kind is not None:
        mask = torch.rand(70 if mask_kind == "shared" else (2, 70), generator=g) > 0.3
    monkeypatch.setattr(vs, "_CPU_CHUNK_ELEMS", 2 * 70 * 16)  # 16 query rows per chunk: 4 chunks
    with torch.no_grad():
        got = vs.attend_value_space(q, k, v, mask)
    scores = (q.double() @ k.double().transpose(1, 2)) / math.sqrt(32)
    if mask is not None:
        scores = scores.masked_fill(~mask.view(-1, 1, 70), float("-inf"))
    want = scores.softmax(-1) @ v.double()
    assert rel_err(got, want) <= 1e-6
    with torch.no_grad():
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.view(-1, 1, 70))
    assert rel_err(got, sdpa) <= 1e-6


# ----------------------------------------------------------------------------- mutations
def test_mutation_fused_output_without_value_bias_fails(monkeypatch):
    ref, ours = _cross_pair(seed=15)
    q, k, m = _cross_inputs(16, 8, 2, 8)
    real = vs.fused_value_output

    def without_value_bias(v_proj, out_proj, heads):
        w, _ = real(v_proj, out_proj, heads)
        return w, out_proj.bias  # forgets W_o b_v
    monkeypatch.setattr(vs, "fused_value_output", without_value_bias)
    with torch.no_grad():
        err = rel_err(ours(q, k, m, num_k_exclude_rope=8), ref(q, k, m, num_k_exclude_rope=8))
    assert err > 100 * LAYER_TOL, f"dropping W_o b_v moved the output by only {err:.2e}"


def test_mutation_chunked_attention_ignoring_the_mask_fails(monkeypatch):
    """The static bank's padded keys must stay out of the CPU chunked attention too."""
    module = _memory_attention_pair(seed=17, num_layers=1)[1]
    bank = sb.StaticMemoryBank(module, num_maskmem=7, max_obj_ptrs=16, tokens_per_ptr=4)
    x = _memory_inputs(torch.Generator().manual_seed(18), 8, 3, 8)
    args = (x["curr"], x["memory"], x["curr_pos"], x["memory_pos"], x["num_obj_ptr_tokens"])
    real = vs._chunked_attention_cpu
    with torch.inference_mode():
        want = bank.plain(*args[:2], curr_pos=args[2], memory_pos=args[3], num_obj_ptr_tokens=args[4])
        assert rel_err(bank(*args), want) <= STACK_TOL
        monkeypatch.setattr(vs, "_chunked_attention_cpu", lambda q, k, v, mask: real(q, k, v, None))
        err = rel_err(bank(*args), want)
    assert err > 100 * STACK_TOL, f"attending to padded keys moved the output by only {err:.2e}"


# ----------------------------------------------------------------------------- static bank
@pytest.mark.parametrize("frames,ptrs", [(1, 4), (7, 64), (9, 16)])
def test_static_bank_matches_reference(stack_pair, frames, ptrs):
    ref, ours = stack_pair
    bank = sb.StaticMemoryBank(ours, num_maskmem=7, max_obj_ptrs=16, tokens_per_ptr=4)
    x = _memory_inputs(torch.Generator().manual_seed(31 + frames), 8, frames, ptrs)
    crosses = [layer.cross_attn_image for layer in ours.layers]
    with torch.inference_mode():
        want = ref(**x)
        got = bank(x["curr"], x["memory"], x["curr_pos"], x["memory_pos"], x["num_obj_ptr_tokens"])
        try:
            for attn in crosses:
                attn.value_space = False  # the bank's former arithmetic: projected values, masked SDPA
            old = bank(x["curr"], x["memory"], x["curr_pos"], x["memory_pos"], x["num_obj_ptr_tokens"])
        finally:
            for attn in crosses:
                attn.value_space = True
    assert bank.counters["bank_fallbacks"] == 0
    assert rel_err(got, want) <= STACK_TOL, f"bank (value space) vs sam2: {rel_err(got, want):.2e}"
    assert rel_err(old, want) <= STACK_TOL, f"bank (projected values) vs sam2: {rel_err(old, want):.2e}"


# ----------------------------------------------------------------------------- tracking
TRACK_FRAMES = 9  # num_maskmem + 2: the bank is full (1 conditioning + 6 recent) on the last frames
SCRIPT = [("points", dict(frame_idx=0, obj_id=1, points=[[30, 35]], labels=[1])),
          ("points", dict(frame_idx=0, obj_id=2, box=[55, 8, 80, 30])),
          ("propagate", {})]


def test_tracking_matches_plain_path_and_reference(tmp_path):
    with V.single_thread():
        undo_cc = V.install_scipy_components()
        try:
            ref = V.build_reference("sam2.1_hiera_tiny", 128, 0, -0.04)
            ours = V.build_ours_from(ref, "sam2.1_hiera_tiny", 128)
            clip = V.write_jpeg_folder(V.make_clip(TRACK_FRAMES, 75, 101, seed=1), str(tmp_path))
            undo = V.float32_memory_bank(ref, ours)
            try:
                want = V.run_script(ref, clip, SCRIPT)
                fast = V.run_script(ours, clip, SCRIPT)
                crosses = [layer.cross_attn_image for layer in ours.memory_attention.layers]
                for attn in crosses:
                    attn.value_space = False
                plain = V.run_script(ours, clip, SCRIPT)
                for attn in crosses:
                    attn.value_space = True
                enable_fast_runtime(ours)  # CPU: the static bank (no compile, no graphs)
                banked = V.run_script(ours, clip, SCRIPT)
                calls = ours.runtime_info["counters"]["bank_calls"]
                disable_fast_runtime(ours)
            finally:
                undo()
        finally:
            undo_cc()
    assert V.presence(want)[0] > 0 and calls >= TRACK_FRAMES - 1
    worst = {"plain": V.compare_records(fast, plain, TRACK_TOL), "reference": V.compare_records(fast, want, TRACK_TOL),
             "bank vs reference": V.compare_records(banked, want, TRACK_TOL)}
    print("value-space tracking, worst frame rel err: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
