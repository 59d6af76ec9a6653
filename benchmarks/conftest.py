"""Shared set-up for the pytest-benchmark suites: device, sizes, and both implementations.

Sizes are small on CPU (image_size 256, a 240p clip) so the suites run anywhere, and the
real ones on CUDA (image_size 1024, full memory bank, 480p/1080p outputs, bf16 autocast).
SAM2_FAST_BENCH_MODEL picks the model (default tiny); both implementations hold identical
sensitized random weights.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict

import pytest
import torch

from sam2_fast.bench import impls

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
MODEL = os.environ.get("SAM2_FAST_BENCH_MODEL", "tiny")
IMAGE_SIZE = 1024 if GPU else 256
_CACHE: Dict[str, torch.nn.Module] = {}


def _impl(name: str) -> impls.Impl:
    return impls.ours_impl() if name == "ours" else impls.reference_impl()


def model_for(name: str) -> torch.nn.Module:
    """The video predictor of one implementation, weights shared with the other (cached)."""
    if name in _CACHE:
        return _CACHE[name]
    impl = _impl(name)
    if not impl.available:
        pytest.skip(f"{name}: {impl.missing}")
    if "_weights" not in _CACHE:
        from sam2_fast.utils.random_weights import sensitize_

        src = impls.reference_impl() if impls.reference_impl().available else impl
        m = impls.build(src, MODEL, IMAGE_SIZE, torch.device("cpu"))
        sensitize_(m, seed=0, obj_score_bias=2.0)
        _CACHE["_weights"] = m.state_dict()
    with impls.quiet_reference():
        model = impls.build(impl, MODEL, IMAGE_SIZE, DEVICE)
    model.load_state_dict(_CACHE["_weights"])
    _CACHE[name] = model
    return model


def autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if GPU else contextlib.nullcontext()


def run_timed(benchmark, fn: Callable[[], object], rounds: int = 5, warmup: int = 1):
    """Time ``fn`` (inference mode, bf16 autocast on CUDA), synchronising the GPU each call."""

    def call():
        with torch.inference_mode(), autocast():
            out = fn()
        if GPU:
            torch.cuda.synchronize()
        return out

    return benchmark.pedantic(call, rounds=rounds if GPU else max(2, rounds // 2), warmup_rounds=warmup,
                              iterations=1)


@pytest.fixture(params=["ours", "reference"])
def predictor(request):
    return model_for(request.param)
