"""The static memory bank of the fast runtime against the plain memory attention.

Every memory layout tracking produces (1..3 conditioning frames, 0..6 recent frames, 0..16
object pointers, odd grids) must match the unpadded attention; mutations (unmasked padding,
RoPE on pointer slots) must fail. Also the bank compiled with ``torch.compile`` vs eager.
"""

from __future__ import annotations

import pytest
import torch

from support import rel_err, sensitize_

from sam2_fast.config import resolve_config
from sam2_fast.modeling import rope as rope_mod
from sam2_fast.modeling.memory_attention import build_memory_attention
from sam2_fast.runtime import static_bank as sb

BANK_TOL = 1e-5  # fp32: padding only changes the summation order of the softmax
CONFIG = "sam2.1_hiera_tiny"

@pytest.fixture(scope="module")
def mem_attn():
    cfg = resolve_config(CONFIG)
    module = build_memory_attention(cfg).eval()
    sensitize_(module, 3)
    return module


def make_bank(module, **kw) -> sb.StaticMemoryBank:
    args = dict(num_maskmem=7, max_obj_ptrs=16, tokens_per_ptr=4, extra_cond_frames=2)
    args.update(kw)
    return sb.StaticMemoryBank(module, **args)


def memory_inputs(side: int, frames: int, ptrs: int, batch: int = 2, seed: int = 0):
    """Current tokens (HW, B, 256) and a memory of ``frames`` frames + ``ptrs`` pointers x 4 tokens."""
    g = torch.Generator().manual_seed(seed)
    hw, m = side * side, frames * side * side + 4 * ptrs
    curr = torch.randn(hw, batch, 256, generator=g)
    curr_pos = torch.randn(hw, batch, 256, generator=g)
    memory = torch.randn(m, batch, 64, generator=g)
    memory_pos = torch.randn(m, batch, 64, generator=g)
    return curr, memory, curr_pos, memory_pos, 4 * ptrs


# (conditioning frames, recent frames, object pointers): the layouts tracking produces
LAYOUTS = [(1, 0, 0), (1, 1, 1), (1, 3, 4), (1, 6, 16), (2, 0, 2), (2, 4, 9), (2, 6, 16), (3, 2, 0),
           (3, 6, 16)]


def run_both(module, bank, side, cond, recent, ptrs, seed=0):
    curr, memory, curr_pos, memory_pos, n_ptr = memory_inputs(side, cond + recent, ptrs, seed=seed)
    with torch.inference_mode():
        ref = bank.plain(curr, memory, curr_pos=curr_pos, memory_pos=memory_pos, num_obj_ptr_tokens=n_ptr)
        out = bank(curr, memory, curr_pos, memory_pos, n_ptr)
    return out, ref


# ----------------------------------------------------------------------------- static bank
@pytest.mark.parametrize("side", [8, 12])
def test_static_bank_matches_plain_attention(mem_attn, side):
    bank = make_bank(mem_attn)
    worst = 0.0
    for i, (cond, recent, ptrs) in enumerate(LAYOUTS):
        out, ref = run_both(mem_attn, bank, side, cond, recent, ptrs, seed=i)
        err = rel_err(out, ref)
        assert err <= BANK_TOL, f"side {side}, {cond} cond + {recent} recent frames, {ptrs} ptrs: {err:.2e}"
        worst = max(worst, err)
    assert bank.counters["bank_fallbacks"] == 0
    assert bank.counters["bank_bucket_7"] > 0 and bank.counters["bank_bucket_9"] > 0
    print(f"side {side}: worst rel err {worst:.2e} over {len(LAYOUTS)} layouts")


def test_static_bank_layout_and_padding(mem_attn):
    bank = make_bank(mem_attn)
    assert bank.frame_buckets == (7, 9)
    assert bank.layout(7, 64) == (448, 512)  # 448 + 64 pointer tokens, already 16-aligned
    spatial, total = bank.layout(9, 144)  # 1296 + 64 = 1360, 16-aligned
    assert (spatial, total) == (1296, 1360)
    spatial, total = bank.layout(7, 25)  # 175 + 64 = 239 -> 240: one alignment slot
    assert total == 240 and (total - spatial) == 65


def test_static_bank_pads_keys_that_must_be_masked(mem_attn):
    """Mutations: attending to padded keys, or rotating pointer slots, must fail by >= 10x."""
    bank = make_bank(mem_attn)
    case = (10, 1, 2, 3)  # side 10: a 7-frame bucket padded by 6 frames and 52 pointer slots
    out, ref = run_both(mem_attn, bank, *case)
    assert rel_err(out, ref) <= BANK_TOL

    unmasked = sb._attention_mask
    try:
        sb._attention_mask = lambda key_ok: None  # padded (stale or zero) keys take weight
        bad, _ = run_both(mem_attn, bank, *case)
    finally:
        sb._attention_mask = unmasked
    assert rel_err(bad, ref) >= 10 * BANK_TOL, f"unmasked padding went unnoticed: {rel_err(bad, ref):.2e}"

    real_apply = rope_mod.apply_axial_rope

    def rotate_pointers_too(q, k, cos, sin, repeat_k=False, num_k_exclude=0):
        # the pointer region rotated as if it were another (partial) frame
        q_out, k_out = real_apply(q, k, cos, sin, repeat_k=repeat_k, num_k_exclude=num_k_exclude)
        if num_k_exclude:
            tail = rope_mod.rotate_pairs(k_out[..., -num_k_exclude:, :], cos[:num_k_exclude], sin[:num_k_exclude])
            k_out = torch.cat([k_out[..., :-num_k_exclude, :], tail], dim=-2)
        return q_out, k_out

    try:
        rope_mod.apply_axial_rope = rotate_pointers_too
        bad_rope, _ = run_both(mem_attn, bank, 10, 1, 6, 16)
    finally:
        rope_mod.apply_axial_rope = real_apply
    _, ref_full = run_both(mem_attn, bank, 10, 1, 6, 16)
    err = rel_err(bad_rope, ref_full)
    assert err >= 10 * BANK_TOL, f"RoPE on pointer slots went unnoticed: {err:.2e}"
    print(f"mutations: unmasked {rel_err(bad, ref):.2e}, rope on pointers {err:.2e}")


def test_static_bank_falls_back_and_counts(mem_attn):
    bank = make_bank(mem_attn, extra_cond_frames=1)  # buckets 7 and 8 frames
    out, ref = run_both(mem_attn, bank, 8, 3, 6, 16)  # 9 frames: beyond the largest bucket
    assert torch.equal(out, ref)
    assert bank.counters["bank_fallbacks"] == 1
    assert bank.counters["bank_fallback: more memory frames than the largest bucket"] == 1

    curr, memory, curr_pos, memory_pos, _ = memory_inputs(8, 2, 0)
    with torch.inference_mode(), pytest.raises(ValueError, match="whole number"):
        bank(curr, memory[:-3], curr_pos, memory_pos[:-3], 0)  # the plain module's own error
    assert bank.counters["bank_fallback: spatial memory is not a whole number of frames"] == 1
    mem_attn.train()
    try:
        with torch.no_grad():
            bank(curr, memory, curr_pos, memory_pos, 0)
    finally:
        mem_attn.eval()
    assert bank.counters["bank_fallback: training mode (dropout)"] == 1


def test_static_bank_widens_bf16_memories(mem_attn):
    """Stored bf16 memories are upcast exactly, as the plain module widens them."""
    bank = make_bank(mem_attn)
    curr, memory, curr_pos, memory_pos, n_ptr = memory_inputs(8, 4, 5)
    memory, memory_pos = memory.bfloat16(), memory_pos.bfloat16()
    with torch.inference_mode():
        ref = bank.plain(curr, memory, curr_pos=curr_pos, memory_pos=memory_pos, num_obj_ptr_tokens=n_ptr)
        out = bank(curr, memory, curr_pos, memory_pos, n_ptr)
    assert out.dtype == ref.dtype == torch.float32
    assert rel_err(out, ref) <= BANK_TOL


# ----------------------------------------------------------------------------- predictor


def test_compiled_bank_and_memory_encoder_match_eager(mem_attn):
    """torch.compile (aot_eager: dynamo + AOT autograd, no codegen) with fullgraph=True:
    proves the static-shape steps trace without graph breaks and keep their numerics."""
    torch._dynamo.reset()
    bank = make_bank(mem_attn)
    curr, memory, curr_pos, memory_pos, n_ptr = memory_inputs(8, 3, 6, batch=1)
    with torch.inference_mode():
        ref = bank(curr, memory, curr_pos, memory_pos, n_ptr)
        bank.core = torch.compile(bank.padded_forward, backend="aot_eager", fullgraph=True, dynamic=False)
        out = bank(curr, memory, curr_pos, memory_pos, n_ptr)
        # a different fill of the same bucket reuses the compiled graph (no recompile)
        curr2, memory2, pos2, mpos2, n2 = memory_inputs(8, 5, 2, batch=1, seed=5)
        out2 = bank(curr2, memory2, pos2, mpos2, n2)
        ref2 = bank.plain(curr2, memory2, curr_pos=pos2, memory_pos=mpos2, num_obj_ptr_tokens=n2)
    assert rel_err(out, ref) <= BANK_TOL and rel_err(out2, ref2) <= BANK_TOL

    from sam2_fast.modeling.memory_encoder import build_memory_encoder

    enc = sensitize_(build_memory_encoder(resolve_config(CONFIG)).eval(), 4)
    g = torch.Generator().manual_seed(9)
    pix, mask = torch.randn(1, 256, 8, 8, generator=g), torch.randn(1, 1, 128, 128, generator=g)
    with torch.inference_mode():
        want = enc(pix, mask)["vision_features"]
        compiled = torch.compile(enc.forward, backend="aot_eager", fullgraph=True, dynamic=False)
        got = compiled(pix, mask)["vision_features"]
    assert rel_err(got, want) <= BANK_TOL


# ----------------------------------------------------------------------------- per-row layouts
def test_padded_attention_with_a_layout_per_row(mem_attn):
    """Objects batched with different memories: each row its own frames and pointers in one
    padded (B, Nk) bank with (B, Nk) key flags equals each row's unpadded attention."""
    side, rows = 8, [(1, 6, 16), (2, 0, 2), (1, 1, 0), (3, 6, 16)]  # (cond, recent, ptrs) per row
    hw = side * side
    bank = make_bank(mem_attn)
    frames = bank.frame_buckets[-1]
    spatial, total = bank.layout(frames, hw)
    mem = torch.zeros(len(rows), total, 64)
    mem_pos = torch.zeros(len(rows), total, 64)
    key_ok = torch.zeros(len(rows), total, dtype=torch.bool)
    curr_rows, pos_rows, expect = [], [], []
    for r, (cond, recent, ptrs) in enumerate(rows):
        curr, memory, curr_pos, memory_pos, n_ptr = memory_inputs(side, cond + recent, ptrs, batch=1, seed=r)
        n_sp = memory.shape[0] - n_ptr
        mem[r, :n_sp], mem_pos[r, :n_sp] = memory[:n_sp, 0], memory_pos[:n_sp, 0]
        mem[r, spatial:spatial + n_ptr], mem_pos[r, spatial:spatial + n_ptr] = memory[n_sp:, 0], memory_pos[n_sp:, 0]
        key_ok[r, :n_sp] = True
        key_ok[r, spatial:spatial + n_ptr] = True
        curr_rows.append(curr)
        pos_rows.append(curr_pos)
        with torch.inference_mode():
            expect.append(bank.plain(curr, memory, curr_pos=curr_pos, memory_pos=memory_pos, num_obj_ptr_tokens=n_ptr))
    ranges = sb.key_ranges(key_ok, spatial, len(rows))
    assert ranges.tolist() == [[0, (c + f) * hw, spatial, spatial + 4 * p] for c, f, p in rows]
    with torch.inference_mode():
        out = sb.padded_attention(mem_attn, torch.cat(curr_rows, 1), torch.cat(pos_rows, 1), mem, mem_pos,
                                  key_ok, spatial)
    errs = [rel_err(out[:, r:r + 1], expect[r]) for r in range(len(rows))]
    print(f"per-row layouts: rel errs {['%.1e' % e for e in errs]}")
    assert max(errs) <= BANK_TOL
