"""Micro-benchmarks: each Triton kernel against the PyTorch path it replaces.

    .venv/bin/python -m pytest benchmarks/bench_kernels.py --benchmark-only -s

On a GPU: SAM 2 shapes in bf16, Triton and PyTorch rows, printing TFLOP/s (attention) or
GB/s (mask upsampling) and the Triton/PyTorch speed ratio per case; small upsampling cases
are timed as CUDA-graph replays so launch cost does not hide the kernel.
Without a GPU: the Triton rows are skipped and the PyTorch rows run at reduced sizes in
fp32, so the file stays runnable (those numbers say nothing about the kernels).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sam2_fast.kernels import mask_upsample as mu
from sam2_fast.kernels import vspace_attention as va
from sam2_fast.kernels import window_attention as wa

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
IMPLS = ["torch", "triton"]
_MEANS: dict = {}

# Hiera blocks at 1024x1024 (GPU) / at a reduced map (CPU):
# (name, B, H, W, heads, head_dim, window, q_pool)
WINDOW_CASES = [
    ("tiny-s1-win8", 1, 256, 256, 1, 96, 8, False),
    ("tiny-s2-pool", 1, 256, 256, 2, 96, 8, True),
    ("tiny-s3-win14", 1, 64, 64, 4, 96, 14, False),
    ("tiny-s3-global", 1, 64, 64, 4, 96, 0, False),
    ("large-s3-win14", 1, 64, 64, 8, 72, 14, False),
    ("bplus-s3-global", 1, 64, 64, 8, 56, 0, False),
]
# (name, B, side, memories, pointer tokens): full bank = 7 memories x 4096 + 16 pointers x 4.
# Memory cross-attention in the 64-d value space (q, k rotated and 256-d, v the raw memory).
MEMORY_CASES = [("full-bank", 1, 64, 7, 64), ("3-objects", 3, 64, 7, 64), ("one-memory", 1, 64, 1, 4)]
# (name, objects, h, w, H, W)
UPSAMPLE_CASES = [("8obj-480p", 8, 256, 256, 480, 854), ("8obj-1080p", 8, 256, 256, 1080, 1920)]


def _shrink(side: int) -> int:
    return side if GPU else max(8, side // 8)


def _timed(benchmark, fn, impl: str, key: str, work: float, unit: str, graph: bool = False):
    if impl == "triton" and not GPU:
        pytest.skip("Triton rows need a CUDA GPU")
    fn()  # compile / warm up
    if GPU and graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    else:
        run = fn

    def step():
        run()
        if GPU:
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=20 if GPU else 3, iterations=1, warmup_rounds=2)
    mean = benchmark.stats.stats.mean
    rate = work / mean / (1e12 if unit == "TFLOP/s" else 1e9)
    benchmark.extra_info[unit] = rate
    _MEANS.setdefault(key, {})[impl] = mean
    msg = f"{key} [{impl}] {mean * 1e3:.3f} ms  {rate:.2f} {unit}"
    if len(_MEANS[key]) == 2:
        msg += f"  speed-up x{_MEANS[key]['torch'] / _MEANS[key]['triton']:.2f}"
    print(msg)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", WINDOW_CASES, ids=[c[0] for c in WINDOW_CASES])
def test_window_attention(benchmark, case, impl):
    name, b, h, w, heads, hd, window, pool = case
    h, w = _shrink(h), _shrink(w)
    window = min(window, h) if window else 0
    qkv = torch.randn(b, h, w, 3 * heads * hd, device=DEV, dtype=DTYPE)
    bias = torch.randn(3 * heads * hd, device=DEV, dtype=DTYPE)
    impl_fn = wa.window_attention_triton if impl == "triton" else wa.window_attention_reference
    g = wa.window_geometry(h, w, window, pool)
    n_win = g["n_win_y"] * g["n_win_x"]
    nq, nk = g["wqw"][0] * g["wqw"][1], g["wk"][0] * g["wk"][1]
    flops = 4.0 * b * heads * n_win * nq * nk * hd
    _timed(benchmark, lambda: impl_fn(qkv, bias, heads, window, pool), impl, f"window/{name}", flops, "TFLOP/s")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", MEMORY_CASES, ids=[c[0] for c in MEMORY_CASES])
def test_memory_cross_attention_vspace(benchmark, case, impl):
    name, b, side, memories, n_ptr = case
    side = _shrink(side)
    dk, dv, nq = 256, 64, side * side
    nk = memories * nq + n_ptr
    q = torch.randn(b, nq, dk, device=DEV, dtype=DTYPE) * 0.1
    k = torch.randn(b, nk, dk, device=DEV, dtype=DTYPE) * 0.1
    v = torch.randn(b, nk, dv, device=DEV, dtype=DTYPE)
    impl_fn = va.vspace_attention_triton if impl == "triton" else va.vspace_attention_reference
    flops = 2.0 * b * nq * nk * (dk + dv)
    _timed(benchmark, lambda: impl_fn(q, k, v), impl, f"memory-cross-vspace/{name}", flops, "TFLOP/s")


@pytest.mark.parametrize("impl", IMPLS)
def test_memory_self_attention(benchmark, impl):
    """The memory self-attention (d_v = d_qk = 256, q and k rotated outside)."""
    side, d = _shrink(64), 256
    n = side * side
    q, k, v = (torch.randn(1, n, d, device=DEV, dtype=DTYPE) * 0.1 for _ in range(3))
    impl_fn = va.vspace_attention_triton if impl == "triton" else va.vspace_attention_reference
    _timed(benchmark, lambda: impl_fn(q, k, v), impl, "memory-self/4096", 4.0 * n * n * d, "TFLOP/s")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", UPSAMPLE_CASES, ids=[c[0] for c in UPSAMPLE_CASES])
def test_upsample_masks(benchmark, case, impl):
    name, n, h, w, H, W = case
    if not GPU:
        h, w, H, W = h // 4, w // 4, H // 4, W // 4
    logits = torch.randn(n, 1, h, w, device=DEV, dtype=DTYPE)
    if impl == "triton":
        fn = lambda: mu.upsample_masks_triton(logits, (H, W))  # noqa: E731
    else:
        fn = lambda: F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False) > 0  # noqa: E731
    moved = n * (h * w * logits.element_size() + H * W)  # read logits, write one byte a pixel
    _timed(benchmark, fn, impl, f"upsample/{name}", moved, "GB/s", graph=True)
