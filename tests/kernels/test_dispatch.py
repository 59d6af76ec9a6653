"""Dispatchers: switches, launch counter, fallbacks, custom ops under torch.compile."""

from __future__ import annotations

import pytest
import torch
from ktest_util import INTERPRETING, needs_interp, rel

from sam2_fast.kernels import dispatch as K
dispatch = K


# The value-space kernel takes 16-bit inputs only (fp32 goes to SDPA) and (d_qk, d_v) of
# (256, 64) / (256, 256): fp16 here (the interpreter's bf16 tl.dot is wrong).
MEM_DTYPE = torch.float16
# Kernel vs PyTorch per output: fp32 paths agree to rounding (measured ~1e-7); the fp16
# memory attention differs by fp16 rounding of P and the output (measured 2.3-2.8e-4 here,
# seeds 0 and 1: the bar is ~20x that, loose enough for rounding, tight enough for a bug).
TOL = (1e-5, 5e-3, 1e-5)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(2, 10, 14, 3 * 16, generator=g)
    bias = torch.randn(3 * 16, generator=g)
    q = (torch.randn(2, 16, 256, generator=g) * 0.1).to(MEM_DTYPE)
    k = (torch.randn(2, 40, 256, generator=g) * 0.1).to(MEM_DTYPE)
    v = torch.randn(2, 40, 64, generator=g).to(MEM_DTYPE)
    logits = torch.randn(3, 1, 6, 7, generator=g) * 3
    return qkv, bias, q, k, v, logits


def _run_all(qkv, bias, q, k, v, logits):
    a = K.window_attention(qkv, bias, 2, 4, True)
    b = K.memory_attention_vspace(q, k, v)
    m, lg = K.upsample_masks(logits, (13, 17), 0.0, True)
    return a, b, m, lg


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ["SAM2_FAST_DISABLE_KERNELS", "SAM2_FAST_FORCE_KERNELS", "SAM2_FAST_FLASH_ATTN",
                 *dispatch._ENV_ONE.values()]:
        monkeypatch.delenv(name, raising=False)
    K.reset_launch_counts()
    yield
    K.reset_launch_counts()


def test_cpu_default_is_reference_path():
    outs = _run_all(*_inputs())
    assert K.launch_counts() == {}
    assert outs[0].shape == (2, 5, 7, 16) and outs[1].shape == (2, 16, 64) and outs[2].dtype == torch.bool


def test_disable_all_beats_force(monkeypatch):
    monkeypatch.setenv("SAM2_FAST_FORCE_KERNELS", "1")
    monkeypatch.setenv("SAM2_FAST_DISABLE_KERNELS", "1")
    _run_all(*_inputs())
    assert K.launch_counts() == {}


def test_force_without_interpreter_is_a_clear_error(monkeypatch):
    """Runs in both passes: the dispatcher reads TRITON_INTERPRET when a call is made, so
    clearing it here is a process without the interpreter as far as the check goes (the
    error comes before any kernel is launched)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with K.force_kernels(), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _run_all(*_inputs())
    assert K.launch_counts() == {}


@pytest.mark.interp
@needs_interp
def test_forced_kernels_run_and_match_reference():
    inputs = _inputs()
    want = _run_all(*inputs)
    with K.force_kernels():
        got = _run_all(*inputs)
    assert K.launch_counts() == {"window_attention": 1, "vspace_attention": 1, "mask_upsample": 1}
    _assert_match(got, want)


def _assert_match(got, want):
    masks = [(g, w) for g, w in zip(got, want) if g.dtype == torch.bool]
    assert all(torch.equal(g, w) for g, w in masks)
    values = [(g, w) for g, w in zip(got, want) if g.dtype != torch.bool]
    for (g, w), tol in zip(values, TOL):
        assert rel(g, w) < tol, (rel(g, w), tol)


@pytest.mark.interp
@needs_interp
@pytest.mark.parametrize("env,off", [("SAM2_FAST_DISABLE_WINDOW_ATTN", {"window_attention"}),
                                     ("SAM2_FAST_DISABLE_MEMORY_ATTN", {"vspace_attention"}),
                                     ("SAM2_FAST_DISABLE_MASK_UPSAMPLE", {"mask_upsample"})])
def test_per_kernel_switch(monkeypatch, env, off):
    monkeypatch.setenv(env, "1")
    monkeypatch.setenv("SAM2_FAST_FORCE_KERNELS", "1")
    _run_all(*_inputs())
    ran = set(K.launch_counts())
    assert ran == {"window_attention", "vspace_attention", "mask_upsample"} - off


@pytest.mark.interp
@needs_interp
def test_unsupported_case_falls_back_with_a_named_reason():
    qkv = torch.randn(1, 8, 8, 3 * 16)
    with K.force_kernels():  # 3 heads do not divide 16 channels
        reason = K.window_attention_reason(qkv, None, 3, 4, False)
    assert reason and any(reason in r for r in K.fallback_counts())


def _compiled_matches(force: bool):
    torch._dynamo.reset()
    inputs = _inputs(1)
    want = _run_all(*inputs)
    fn = torch.compile(_run_all, fullgraph=True, backend="aot_eager")
    ctx = K.force_kernels() if force else torch.no_grad()
    with ctx:
        got = fn(*inputs)
    _assert_match(got, want)
    torch._dynamo.reset()


def test_compile_fullgraph_reference_path():
    _compiled_matches(force=False)
    assert K.launch_counts() == {}


@pytest.mark.interp
@needs_interp
def test_compile_fullgraph_through_custom_ops():
    _compiled_matches(force=True)
    assert set(K.launch_counts()) == {"window_attention", "vspace_attention", "mask_upsample"}


def test_custom_op_fake_shapes():
    qkv, bias, q, k, v, logits = _inputs()
    torch.library.opcheck(torch.ops.sam2_fast.window_attention, (qkv, bias, 2, 4, True),
                          test_utils=("test_schema", "test_faketensor")) if INTERPRETING else None
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq = mode.from_tensor(qkv)
        out = torch.ops.sam2_fast.window_attention(fq, mode.from_tensor(bias), 2, 4, True)
        assert out.shape == (2, 5, 7, 16)
        o = torch.ops.sam2_fast.vspace_attention(mode.from_tensor(q), mode.from_tensor(k), mode.from_tensor(v), None)
        assert o.shape == (2, 16, 64) and o.dtype == MEM_DTYPE
        m, lg = torch.ops.sam2_fast.upsample_masks(mode.from_tensor(logits), 13, 17, 0.0, False, True)
        assert m.shape == (3, 1, 13, 17) and m.dtype == torch.bool and lg.numel() == 0


def test_flash_attn_is_optional():
    assert isinstance(K.flash_attn_available(), bool)
