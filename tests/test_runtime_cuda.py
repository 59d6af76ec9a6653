"""The fast runtime on CUDA (``@pytest.mark.cuda``, run by the GPU check): bf16 runtime
against fp32 eager, CUDA graphs against eager, the full compiled + graphed runtime, graph
re-capture on a new signature. CPU checks: test_runtime.py; shared pieces: ``runtime_harness``.
"""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch

from runtime_harness import BF16_TRACK_TOL, CONFIG, SIZE, TRACK_TOL, runtime_clip, track
from support import rel_err, sensitize_

from sam2_fast.build_sam import build_sam2_video_predictor
from sam2_fast.runtime import disable_fast_runtime, enable_fast_runtime
from sam2_fast.runtime.graphs import GraphedStep

needs_cuda = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def cuda_test(fn):
    for mark in needs_cuda:
        fn = mark(fn)
    return fn


@pytest.fixture(scope="module")
def clip():
    return runtime_clip()


def build_cuda_predictor():
    torch.manual_seed(0)
    pred = build_sam2_video_predictor(CONFIG, device="cuda", hydra_overrides_extra=[f"++model.image_size={SIZE}"])
    return sensitize_(pred, 0, obj_score_bias=2.0)


def cuda_track(pred, clip) -> torch.Tensor:
    return track(pred, clip).float().cpu()


def fast_cuda_track(clip, **runtime) -> Tuple[torch.Tensor, dict]:
    """Track with the fast runtime, then undo it (TF32 and inductor settings are global)."""
    pred = enable_fast_runtime(build_cuda_predictor(), **runtime)
    info = pred.runtime_info
    try:
        return cuda_track(pred, clip), info
    finally:
        disable_fast_runtime(pred)


@pytest.fixture(scope="module")
def cuda_eager(clip):
    return cuda_track(build_cuda_predictor(), clip)


@cuda_test
def test_cuda_graphs_match_eager_fp32(clip, cuda_eager):
    graphed, info = fast_cuda_track(clip, dtype=torch.float32, compile=False, cuda_graphs=True)
    counters = info["counters"]
    assert info["cuda_graphs"] == ["image_encoder", "mask_decoder", "memory_encoder", "memory_attention"]
    assert not any(k.startswith("graph_capture_failed") for k in counters), dict(counters)
    assert counters["graph_captures[memory_attention]"] == 2, dict(counters)  # one per bucket
    assert counters["graph_replays[image_encoder]"] >= 1, dict(counters)
    err = rel_err(graphed, cuda_eager)
    print(f"CUDA graphs vs eager (fp32): rel err {err:.2e}")
    assert err <= TRACK_TOL


@cuda_test
def test_bf16_runtime_matches_fp32_eager(clip, cuda_eager):
    fast, info = fast_cuda_track(clip, compile=False, cuda_graphs=False)
    assert info["autocast"] == "bfloat16" and info["tf32"]
    err = rel_err(fast, cuda_eager)
    agree = ((fast > 0) == (cuda_eager > 0)).float().mean().item()
    print(f"bf16 vs fp32: rel err {err:.3e} (tol {BF16_TRACK_TOL:.3f}), mask agreement {agree:.4f}")
    assert err <= BF16_TRACK_TOL and agree >= 0.97


@cuda_test
def test_full_runtime_compiled_graphed_bf16(clip, cuda_eager):
    # the vos_optimized defaults, except the compile mode: max-autotune's GEMM/conv autotuning
    # would take minutes per graph inside the GPU check's time budget, and changes only which
    # kernels are picked, not what is traced, compiled and captured
    fast, info = fast_cuda_track(clip, compile_mode="default")
    assert set(info["compiled"]) == {"image_encoder", "memory_encoder", "mask_decoder", "memory_attention"}
    assert info["cuda_graphs"] and not info["skipped"].get("cuda_graphs")
    counters = info["counters"]
    assert not any(k.startswith("graph_capture_failed") for k in counters), dict(counters)
    err = rel_err(fast, cuda_eager)
    print(f"bf16 + compile + graphs vs fp32 eager: rel err {err:.3e}; {dict(counters)}")
    assert err <= BF16_TRACK_TOL


@cuda_test
def test_graphed_step_recaptures_per_signature():
    lin = torch.nn.Linear(16, 8).cuda()
    step = GraphedStep(lambda x, scale: lin(x) * scale, "toy")
    with torch.inference_mode():
        outs: List[Tuple[torch.Tensor, torch.Tensor]] = []
        for rows, scale in ((3, 2.0), (3, 2.0), (5, 2.0), (3, 0.5)):
            x = torch.randn(rows, 16, device="cuda")
            outs.append((step(x, scale), lin(x) * scale))
    for got, want in outs:
        assert rel_err(got, want) <= 1e-5  # same kernels; only a cuBLAS algorithm pick could differ
    assert step.counters["graph_captures[toy]"] == 3  # (3, 2.0), (5, 2.0), (3, 0.5)
    assert step.counters["graph_replays[toy]"] == 4
