"""Value-space memory attention kernel: against its PyTorch reference and the fp64 result.

Interpreter tests (fp16: the interpreter's bf16 tl.dot is wrong, see kernels/_common.py);
the CUDA test repeats them in bf16 at the real shape.
"""

from __future__ import annotations

import pytest
import torch
from ktest_util import INTERPRETING, assert_attention_error, needs_interp, rel

from sam2_fast.kernels import vspace_attention as va


def _inputs(b, nq, nk, dk, dv, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, nq, dk, generator=g) * 0.6).to(device, dtype)
    k = (torch.randn(b, nk, dk, generator=g) * 0.6).to(device, dtype)
    v = torch.randn(b, nk, dv, generator=g).to(device, dtype)
    return q, k, v


def _exact(q, k, v, ranges=None):
    mask = None if ranges is None else va.ranges_mask(ranges.cpu(), k.shape[1])
    return torch.nn.functional.scaled_dot_product_attention(
        q.double().cpu(), k.double().cpu(), v.double().cpu(), attn_mask=mask)


# (B, Nq, Nk, ranges or None, splits): ragged query tail, ragged key tails in both ranges,
# split boundaries inside and across the ranges, a batch element with keys only in range 2.
CASES = [
    (1, 80, 200, None, 1),
    (2, 70, 160, [[0, 130, 140, 150], [0, 64, 128, 160]], 1),
    (2, 70, 160, [[0, 130, 140, 150], [0, 64, 128, 160]], 3),
    (3, 33, 96, [[0, 96, 0, 0], [10, 50, 60, 61], [0, 0, 64, 96]], 2),
]


@pytest.mark.interp
@needs_interp
@pytest.mark.parametrize("b,nq,nk,ranges,splits", CASES)
def test_kernel_matches_reference(b, nq, nk, ranges, splits):
    dk, dv, dt = 256, 64, torch.float16
    q, k, v = _inputs(b, nq, nk, dk, dv, dt, seed=b * 7 + splits)
    rng = None if ranges is None else torch.tensor(ranges, dtype=torch.int32)
    out = torch.full((b, nq, dv), float("nan"), dtype=dt)
    cfg = va.LaunchConfig(32, 32, 4, 1)  # small tiles: several q blocks and key blocks per case
    va.vspace_attention_triton(q, k, v, rng, out=out, num_splits=splits, config=cfg)
    exact = _exact(q, k, v, rng)
    sdpa16 = va.vspace_attention_reference(q.float(), k.float(), v.float(), rng).to(dt)
    assert_attention_error(out, sdpa16, exact, f"vspace {b}x{nq}x{nk} splits={splits}")


@pytest.mark.interp
@needs_interp
def test_empty_batch_element_gives_zeros_not_nan():
    q, k, v = _inputs(2, 16, 64, 256, 64, torch.float16)
    rng = torch.tensor([[0, 64, 0, 0], [0, 0, 0, 0]], dtype=torch.int32)
    out = va.vspace_attention_triton(q, k, v, rng, num_splits=2, config=va.LaunchConfig(16, 32, 4, 1))
    assert torch.isfinite(out).all() and out[1].abs().max() == 0


@pytest.mark.interp
@needs_interp
def test_mutation_wrong_softmax_scale_is_caught(monkeypatch):
    """Plant a bug in the product (natural-log scale fed to the kernel's exp2): parity fails."""
    q, k, v = _inputs(1, 32, 96, 256, 64, torch.float16, seed=5)
    rng = torch.tensor([[0, 40, 64, 96]], dtype=torch.int32)
    cfg = va.LaunchConfig(32, 32, 4, 1)
    exact = _exact(q, k, v, rng)
    assert rel(va.vspace_attention_triton(q, k, v, rng, config=cfg), exact) < 1e-2
    monkeypatch.setattr(va, "LOG2E", 1.0)
    assert rel(va.vspace_attention_triton(q, k, v, rng, config=cfg), exact) > 3e-2


def test_bad_inputs_are_named():
    q, k, v = _inputs(1, 8, 16, 256, 64, torch.float32)
    with pytest.raises(ValueError, match="16-bit dtype"):
        va.vspace_attention_triton(q, k, v)
    q16, k16, v16 = (t.half() for t in (q, k, v))
    with pytest.raises(ValueError, match="not in"):
        va.vspace_attention_triton(q16, k16, v16[..., :48])
    with pytest.raises(ValueError, match="ranges must be"):
        va.vspace_attention_triton(q16, k16, v16, torch.zeros(1, 3, dtype=torch.int32))


def test_reference_ranges_mask_equals_gather():
    """The reference's masked SDPA equals SDPA over the gathered valid keys (fp64)."""
    q, k, v = (t.double() for t in _inputs(2, 12, 40, 256, 64, torch.float32, seed=2))
    rng = torch.tensor([[0, 10, 30, 33], [5, 25, 0, 0]], dtype=torch.int32)
    got = va.vspace_attention_reference(q, k, v, rng)
    for i, (a, b_, c, d) in enumerate(rng.tolist()):
        idx = torch.cat([torch.arange(a, b_), torch.arange(c, d)])
        want = torch.nn.functional.scaled_dot_product_attention(q[i], k[i, idx], v[i, idx])
        assert rel(got[i], want) < 1e-12


# Split-KV per card: (name, SMs, capability); the tile of that capability sets the query
# blocks. Tiny's full bank at 1024 px: 4096 queries, 7 x 4096 + 64 keys.
CARDS = [("H200", 132, (9, 0)), ("H100", 132, (9, 0)), ("A100", 108, (8, 0)), ("L4", 58, (8, 9))]
FULL_BANK = 7 * 4096 + 64
# What choose_splits gives (arithmetic in its docstring); programs = objects x q blocks x splits.
EXPECTED_SPLITS = {("H200", 1): 8, ("H200", 8): 2, ("H100", 1): 8, ("H100", 8): 2,
                   ("A100", 1): 6, ("A100", 8): 5, ("L4", 1): 7, ("L4", 8): 1}
# The last wave of the chosen grid is at least this full (measured choices: 0.89-0.99).
MIN_WAVE_FILL = 0.85


def _split_case(sms, cap, objects, nk=FULL_BANK):
    cfg = va.pick_config(256, 64, cap)
    programs = objects * -(-4096 // cfg.block_m)
    n_kb = -(-nk // cfg.block_n)
    return programs, n_kb, va.choose_splits(programs, n_kb, sms)


def _wave_fill(programs, splits, sms):
    slots = sms * va.PROGRAMS_PER_SM
    total = programs * splits
    return total / (-(-total // slots) * slots)


@pytest.mark.parametrize("objects", [1, 8])
@pytest.mark.parametrize("name,sms,cap", CARDS)
def test_splits_fill_whole_waves(name, sms, cap, objects):
    programs, n_kb, splits = _split_case(sms, cap, objects)
    assert splits == EXPECTED_SPLITS[(name, objects)]
    assert _wave_fill(programs, splits, sms) >= MIN_WAVE_FILL, (programs, splits, sms)
    assert 1 <= splits <= va.MAX_SPLITS and -(-n_kb // splits) >= va.MIN_BLOCKS_PER_SPLIT
    # no split count is modelled faster by more than the margin that buys a split
    best = min(va.split_cost(programs, n_kb, sms, s) for s in range(1, va.MAX_SPLITS + 1))
    assert va.split_cost(programs, n_kb, sms, splits) <= best * (1 + va.SPLIT_MARGIN)


def test_splits_off_the_gpu_and_short_ranges():
    assert va.choose_splits(32, 449, 0) == 1  # off the GPU (sms 0): no split
    assert va.choose_splits(32, 7, 132) == 1  # fewer than MIN_BLOCKS_PER_SPLIT key blocks
    # the first frames (1 memory + 4 pointer tokens): 65 blocks, 4 splits = 0.97 wave
    assert _split_case(132, (9, 0), 1, nk=4096 + 4)[2] == 4


def test_mutation_splits_without_whole_waves_is_caught(monkeypatch):
    """Plant the old rule in the product (fill one wave, round down): H200's full bank gets 4
    splits (the measured slower choice) and A100's 8 objects 1 split (256 programs = 2.4
    waves, the third 37 % full): the whole-wave checks fail."""
    def one_wave(programs, n_key_blocks, sms, programs_per_sm=1):
        if sms <= 0 or programs >= sms:
            return 1
        return max(1, min(sms // programs, n_key_blocks // 8))
    monkeypatch.setattr(va, "choose_splits", one_wave)
    with pytest.raises(AssertionError):
        test_splits_fill_whole_waves("H200", 132, (9, 0), 1)
    programs, _, splits = _split_case(108, (8, 0), 8)
    assert _wave_fill(programs, splits, 108) < MIN_WAVE_FILL


def test_launcher_takes_the_cards_sms(monkeypatch):
    """The launcher's grid is (q blocks, B, splits) with the splits of the card it runs on."""
    from sam2_fast.kernels._common import Card
    grids = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: grids.append(tuple(grid))

    monkeypatch.setattr(va, "_vspace_attn_kernel", Recorder())
    monkeypatch.setattr(va, "_vspace_merge_kernel", Recorder())
    for (name, sms, cap), want in (((CARDS[0]), 8), ((CARDS[2]), 6)):
        grids.clear()
        monkeypatch.setattr(va, "card", lambda device, c=Card(cap, sms): c)
        q = torch.empty(1, 4096, 256, device="meta", dtype=torch.bfloat16)
        k = torch.empty(1, FULL_BANK, 256, device="meta", dtype=torch.bfloat16)
        v = torch.empty(1, FULL_BANK, 64, device="meta", dtype=torch.bfloat16)
        va.vspace_attention_triton(q, k, v)
        assert grids[0] == (32, 1, want) and len(grids) == 2, (name, grids)  # attention + merge


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETING, reason="needs a CUDA GPU")
@pytest.mark.parametrize("b", [1, 8])
def test_cuda_real_shape_bf16(b):
    """Tiny at 1024 px, full bank: 4096 queries, 7 x 4096 spatial + 64 pointer keys."""
    nq, hw, slots, ptr = 4096, 4096, 7, 64
    cap = slots * hw
    q, k, v = _inputs(b, nq, cap + ptr, 256, 64, torch.bfloat16, "cuda", seed=b)
    # Batch element i has (7 - i % 3) memories and 64 - 4 * i pointer tokens.
    rng = torch.tensor([[0, (slots - i % 3) * hw, cap, cap + ptr - 4 * i] for i in range(b)],
                       dtype=torch.int32, device="cuda")
    out = torch.full((b, nq, 64), float("nan"), dtype=torch.bfloat16, device="cuda")
    va.vspace_attention_triton(q, k, v, rng, out=out)
    torch.cuda.synchronize()
    exact = va.vspace_attention_reference(q.double(), k.double(), v.double(), rng)
    sdpa16 = va.vspace_attention_reference(q, k, v, rng)
    assert_attention_error(out, sdpa16, exact, f"vspace cuda b={b}")
