"""The selection layer: fastest candidate that passes the numerics bar, cache, overrides."""

from __future__ import annotations

import json

import pytest
import torch
from ktest_util import needs_interp, rel

from sam2_fast.kernels import select as sel
from sam2_fast.kernels import slots


def _slot(times, noise):
    """A toy slot: y = 2x; candidates with scripted times (us) and output noise."""
    def make(name):
        def run(x):
            return 2 * x + noise[name] * torch.randn_like(x)
        return sel.Candidate(name, run, (lambda x: "too big" if name == "picky" and x.numel() > 8 else None))
    return sel.Slot(name="toy", candidates=tuple(make(n) for n in times),
                    reference=lambda x: 2 * x.double(), bucket=lambda x: (x.numel(),),
                    default=lambda x: "plain", cpu=lambda x: "plain", baseline="plain"), times


@pytest.fixture
def fake_cuda(monkeypatch, tmp_path):
    """Let ``choose`` take its CUDA branch on CPU tensors: fake card, timer from a script."""
    monkeypatch.setenv(sel.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setattr(sel, "_card", lambda device: "fake-card")
    monkeypatch.setattr(sel, "_capturing", lambda device: False)
    sel.reset()
    yield tmp_path
    sel.reset()


def _scripted(times, log=None):
    """A timer returning the scripted time of the candidate ``measure`` hands it."""
    def timer(fn):
        name = fn.__defaults__[0].name  # measure() passes ``lambda c=c: c.run(*args)``
        if log is not None:
            log.append(name)
        return times[name]
    return timer


def test_fastest_passing_candidate_is_kept_and_cached(fake_cuda, monkeypatch):
    slot, times = _slot({"plain": 30.0, "fast-wrong": 5.0, "fast-right": 10.0, "picky": 1.0},
                        {"plain": 1e-4, "fast-wrong": 1e-1, "fast-right": 1.5e-4, "picky": 0.0})
    timed = []
    monkeypatch.setattr(sel, "_timer", _scripted(times, timed))
    x = torch.randn(64, dtype=torch.float64)
    got = sel.choose(slot, torch.device("cuda"), x)
    assert got.name == "fast-right"  # fast-wrong fails the bar, picky cannot take 64 elements
    assert sorted(timed) == ["fast-right", "fast-wrong", "plain"]
    data = json.loads((fake_cuda / "backend_choices.json").read_text())
    (entry,) = data.values()
    assert entry["choice"] == "fast-right" and entry["skipped"] == {"picky": "too big"}
    # A new process (in-memory state forgotten) reads the file instead of measuring.
    sel.reset()
    timed.clear()
    assert sel.choose(slot, torch.device("cuda"), x).name == "fast-right" and timed == []


def test_mutation_numerics_bar_off_keeps_the_wrong_backend(fake_cuda, monkeypatch):
    """Plant a bug in the product (no numerics bar): the fast, wrong candidate wins."""
    slot, times = _slot({"plain": 30.0, "fast-wrong": 5.0}, {"plain": 1e-4, "fast-wrong": 1e-1})
    monkeypatch.setattr(sel, "_timer", _scripted(times))
    monkeypatch.setattr(sel, "ERROR_FACTOR", 1e9)
    assert sel.choose(slot, torch.device("cuda"), torch.randn(64, dtype=torch.float64)).name == "fast-wrong"


def test_forced_backend_and_unknown_name(fake_cuda, monkeypatch):
    slot, _ = _slot({"plain": 1.0, "picky": 1.0}, {"plain": 0.0, "picky": 0.0})
    monkeypatch.setenv("SAM2_FAST_BACKEND_TOY", "picky")
    assert sel.choose(slot, torch.device("cuda"), torch.randn(4)).name == "picky"
    with pytest.warns(UserWarning, match="cannot take this call"):
        assert sel.choose(slot, torch.device("cuda"), torch.randn(64)).name == "plain"
    monkeypatch.setenv("SAM2_FAST_BACKEND_TOY", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'.*valid"):
        sel.choose(slot, torch.device("cuda"), torch.randn(4))


def test_no_measurement_while_capturing(fake_cuda, monkeypatch):
    slot, _ = _slot({"plain": 1.0, "fast-right": 0.5}, {"plain": 0.0, "fast-right": 0.0})
    monkeypatch.setattr(sel, "_capturing", lambda device: True)
    monkeypatch.setattr(sel, "_timer", lambda fn: pytest.fail("measured inside capture"))
    assert sel.choose(slot, torch.device("cuda"), torch.randn(4)).name == "plain"  # the default
    assert not (fake_cuda / "backend_choices.json").exists()


def test_unreadable_cache_is_ignored(fake_cuda, monkeypatch):
    (fake_cuda / "backend_choices.json").write_text("{not json")
    slot, _ = _slot({"plain": 1.0}, {"plain": 0.0})
    monkeypatch.setattr(sel, "_timer", lambda fn: 1.0)
    assert sel.choose(slot, torch.device("cuda"), torch.randn(4)).name == "plain"
    assert json.loads((fake_cuda / "backend_choices.json").read_text())  # rewritten, valid


def test_cpu_uses_the_pytorch_path_without_measuring(monkeypatch):
    monkeypatch.setattr(sel, "_timer", lambda fn: pytest.fail("measured on CPU"))
    q, k, v = torch.randn(1, 8, 256), torch.randn(1, 16, 256), torch.randn(1, 16, 64)
    assert sel.choose(slots.MEMORY_ATTENTION, q.device, q, k, v, None).name == "sdpa"  # fp32: never Triton
    q, k, v = q.half(), k.half(), v.half()
    want = "triton" if slots._triton_ok(q) is None else "sdpa"  # the interpreter runs the kernel
    assert sel.choose(slots.MEMORY_ATTENTION, q.device, q, k, v, None).name == want


def test_static_defaults_follow_the_h200_measurements():
    qkv = torch.randn(1, 16, 16, 3 * 96, dtype=torch.bfloat16)
    bias = torch.randn(3 * 96, dtype=torch.bfloat16)
    assert slots.WINDOW_ATTENTION.default(qkv, bias, 1, 0, False) == "torch"  # global blocks
    x = torch.randn(8, 1, 64, 64)
    assert slots.MASK_UPSAMPLE.default(x, 480, 854, 0.0, False, True) == "torch"


@pytest.mark.interp
@needs_interp
def test_dispatcher_runs_the_kernel_under_the_interpreter():
    from sam2_fast.kernels import dispatch
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 40, 256, generator=g).half()
    k = torch.randn(2, 70, 256, generator=g).half()
    v = torch.randn(2, 70, 64, generator=g).half()
    rng = torch.tensor([[0, 50, 64, 70], [0, 70, 0, 0]], dtype=torch.int32)
    dispatch.reset_launch_counts()
    with dispatch.force_kernels():
        out = dispatch.memory_attention_vspace(q, k, v, rng)
    assert dispatch.backend_counts() == {"memory_attention: triton": 1}
    want = dispatch._va.vspace_attention_reference(q.double(), k.double(), v.double(), rng)
    assert rel(out, want) < 2e-3
