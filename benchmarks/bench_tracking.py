"""End-to-end tracking benchmark, ours vs the reference: one propagation over a clip.

    .venv/bin/python -m pytest benchmarks/bench_tracking.py --benchmark-only

A synthetic clip (CPU: 8 frames at 240p; CUDA: 32 frames at 480p), clicks on frame 0,
``init_state`` untimed as in the reference's benchmark.py; each round is one full
``propagate_in_video`` pass. For the ladder, accuracy column and JSON reports, use
``sam2-fast bench``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, GPU, autocast, model_for, run_timed
from sam2_fast.bench import impls
from sam2_fast.bench.video import synthetic_clip

FRAMES, H, W = (32, 480, 854) if GPU else (8, 240, 426)


@pytest.mark.parametrize("objects", [1, 3])
@pytest.mark.parametrize("impl_name", ["ours", "reference"])
def bench_track(benchmark, impl_name, objects):
    predictor = model_for(impl_name)
    impl = impls.ours_impl() if impl_name == "ours" else impls.reference_impl()
    clip = synthetic_clip(FRAMES, H, W, objects, seed=1)
    impls.disable_hole_filling(predictor)
    with impls.quiet_reference(), torch.inference_mode(), autocast():
        state = impls.init_state(impl, predictor, clip.frames, DEVICE)
        impls.add_clicks(predictor, state, clip.clicks)

    def one_pass():
        with impls.quiet_reference():
            return sum(1 for _ in predictor.propagate_in_video(state))

    run_timed(benchmark, one_pass, rounds=3)
    benchmark.extra_info.update(frames=FRAMES, resolution=f"{H}x{W}", objects=objects)
    mean = benchmark.stats.stats.mean if benchmark.stats else None
    if mean:
        benchmark.extra_info["fps"] = FRAMES / mean
