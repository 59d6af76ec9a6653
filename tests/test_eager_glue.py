"""Eager launch savings (``benchmarks/op_census.py``): cached bf16 weights under autocast,
the cached complex RoPE table, the cached pointer-offset sines and the cached low-precision
fused value/output matrix. Each must be bitwise what the uncached path computes, follow
weight updates (``load_state_dict``, in-place edits, ``.to()``) and actually save the ops.
"""

from __future__ import annotations

import collections
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import sensitize_  # noqa: E402
from runtime_harness import build_predictor, track  # noqa: E402
from video_utils import make_clip  # noqa: E402

from sam2_fast.modeling import rope as rope_mod  # noqa: E402
from sam2_fast.modeling import value_space as vs  # noqa: E402
from sam2_fast.modeling.memory_select import sine_pe_1d  # noqa: E402
from sam2_fast.modeling.rope import RoPEAttention  # noqa: E402
from sam2_fast.runtime import enable_fast_runtime, weight_cache  # noqa: E402

BF16 = torch.bfloat16


class OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (func._schema.name in ("aten::to", "aten::_to_copy") and args and out is args[0]):
            self.ops[func._schema.name.split("::")[1]] += 1
        return out


def _casts(ops: collections.Counter) -> int:
    return ops["to"] + ops["_to_copy"]


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.lin = nn.Linear(4, 6)

    def forward(self, x):
        return self.lin(self.up(self.conv(x)).permute(0, 2, 3, 1))


def _run(model, x):
    with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
        return model(x)


def check_weight_cache_follows_updates(model: Small, plain: Small, x) -> None:
    """``model`` has the cache installed, ``plain`` is an uncached twin: equal after each edit."""
    assert torch.equal(_run(model, x), _run(plain, x))
    other = sensitize_(Small(), 7)
    for m in (model, plain):
        m.load_state_dict(other.state_dict())
    assert torch.equal(_run(model, x), _run(plain, x)), "load_state_dict not seen"
    with torch.no_grad():
        for m in (model, plain):
            m.lin.weight.mul_(1.5)
            m.conv.bias.add_(0.25)
    assert torch.equal(_run(model, x), _run(plain, x)), "in-place edit not seen"
    for m in (model, plain):
        m.double().float()  # new storage
        m.up.weight.data = m.up.weight.data * 2  # new storage through .data
    assert torch.equal(_run(model, x), _run(plain, x)), "new storage not seen"


def test_weight_cache_is_bitwise_saves_casts_and_follows_updates():
    model, plain = sensitize_(Small(), 3), Small()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    count, remove = weight_cache.install(model)
    assert count == 3
    _run(model, x)  # fills the cache
    with OpCount() as cached:
        _run(model, x)
    with OpCount() as uncached:
        _run(plain, x)
    # uncached: weight + bias of each module and the fp32 image; cached: the image only
    # (later modules get bf16 inputs)
    assert (_casts(uncached.ops), _casts(cached.ops)) == (7, 1)
    check_weight_cache_follows_updates(model, plain, x)
    with torch.no_grad():  # outside autocast and in fp32 the module's own forward runs
        assert torch.equal(model(x), plain(x))
    remove()
    assert "forward" not in model.lin.__dict__


def test_mutation_weight_cache_ignoring_versions_fails(monkeypatch):
    real_get = weight_cache._Lowp.get

    def first_only(self, dtype):
        if self.weight is None:
            return real_get(self, dtype)
        return self.weight, self.bias  # never refreshed
    monkeypatch.setattr(weight_cache._Lowp, "get", first_only)
    model, plain = sensitize_(Small(), 3), Small()
    plain.load_state_dict(model.state_dict())
    weight_cache.install(model)
    with pytest.raises(AssertionError, match="load_state_dict not seen"):
        check_weight_cache_follows_updates(model, plain, torch.randn(1, 3, 8, 8))


def test_bf16_runtime_with_weight_cache_tracks_bitwise_like_without(monkeypatch):
    """The runtime's eager bf16 path installs the cache; tracking is bitwise unchanged."""
    clip = make_clip(5, 72, 88, seed=1)
    pred = enable_fast_runtime(build_predictor(False), dtype=BF16, static_bank=False)
    assert pred.runtime_info["weight_cache"] > 50, pred.runtime_info
    fast = track(pred, clip)
    monkeypatch.setattr(weight_cache, "install", lambda model: (0, lambda: None))
    pred = enable_fast_runtime(build_predictor(False), dtype=BF16, static_bank=False)
    assert pred.runtime_info["weight_cache"] == 0
    assert torch.equal(track(pred, clip), fast)


def test_cis_table_is_kept_for_the_same_tables_and_follows_edits():
    cos, sin = rope_mod.axial_rope_table(16, 4, 4)
    a = rope_mod.cis_table(cos, sin)
    assert torch.equal(a, torch.complex(cos, sin))
    assert rope_mod.cis_table(cos, sin) is a
    cos.mul_(0.5)  # an in-place edit bumps the version: rebuilt
    b = rope_mod.cis_table(cos, sin)
    assert b is not a and torch.equal(b, torch.complex(cos, sin))
    assert rope_mod.cis_table(cos.clone(), sin) is not b  # another object: never mistaken


def test_pointer_offset_sines_match_and_keep_nothing():
    """Values as the reference builds them; nothing is kept per offset tuple (a conditioning
    frame's offset grows every frame, so such a cache only grew and evicted)."""
    pred = build_predictor(False)
    with torch.inference_mode():
        a = pred._tpos_sines((1, 2, 3), 4, 256, torch.device("cpu"))
        b = pred._tpos_sines((1, 2, 3), 7, 256, torch.device("cpu"))
    assert torch.equal(a, sine_pe_1d(torch.tensor([1, 2, 3]) / 4, 256))
    assert torch.equal(b, sine_pe_1d(torch.tensor([1, 2, 3]) / 7, 256))
    assert "_tpos_cache" not in pred.__dict__ and not any(k.endswith("cache") for k in pred.__dict__)


@pytest.mark.cuda
def test_pointer_offset_sines_uploaded_from_the_host_match_the_device_build():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pred = build_predictor(False)
    dev = torch.device("cuda")
    offsets = (1, 5, -3, 120)
    got = pred._tpos_sines(offsets, 15, 256, dev)
    want = sine_pe_1d(torch.tensor(list(offsets), device=dev) / 15, 256)
    assert got.device.type == "cuda"
    # host and device sin/cos may differ in the last ulp (measured bound: 1 ulp of ~1)
    assert (got - want).abs().max().item() <= 1e-6


def test_autocast_fused_value_output_is_bitwise_and_follows_updates():
    attn = sensitize_(RoPEAttention(32, 1, rope_k_repeat=True, kv_in_dim=8), 2).eval()
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 16, 32, generator=g), torch.randn(1, 2 * 16 + 4, 8, generator=g)
    o = torch.randn(1, 16, 8, generator=g)  # attention output in the value space

    def direct():
        w, b = vs.fused_value_output(attn.v_proj, attn.out_proj, 1)
        return F.linear(o, w, b)  # autocast casts w, b (what the cache holds)

    with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
        out = attn(q, k, k, num_k_exclude_rope=4)
        with OpCount() as counted:
            again = attn(q, k, k, num_k_exclude_rope=4)
        w16, b16 = vs.autocast_fused_value_output(attn.v_proj, attn.out_proj, 1, attn)
        assert torch.equal(F.linear(o, w16, b16), direct())
        assert torch.equal(out, again)
        assert "mv" not in counted.ops and "matmul" not in counted.ops  # nothing re-derived
        attn.out_proj.bias.add_(1.0)  # in-place (version bump): re-derived
        w16, b16 = vs.autocast_fused_value_output(attn.v_proj, attn.out_proj, 1, attn)
        assert torch.equal(F.linear(o, w16, b16), direct())
    with torch.no_grad():  # fp32: derived on every call, as before
        w, _ = vs.autocast_fused_value_output(attn.v_proj, attn.out_proj, 1, attn)
        assert w.dtype == torch.float32
