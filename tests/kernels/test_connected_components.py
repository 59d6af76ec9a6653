"""The connected-components kernel against the torch path and scipy.ndimage.label (8-conn).

Interpreter tests (``TRITON_INTERPRET=1``): labels and areas EXACTLY those of the torch path
(``connected_components_torch``: label = 1 + the component's first flat index), areas equal
to scipy's and labels the same partition, on random masks, long single components and the
edge cases; hole filling through the dispatcher; planted bugs in the kernel module fail the
same check. CUDA tests (``-m cuda``, a lent GPU): the same masks on the device, no host
sync, CUDA-graph capture.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest
import torch
from ktest_util import needs_interp
from scipy import ndimage

from sam2_fast.kernels import connected_components as cc
from sam2_fast.utils import masks as masks_mod

EIGHT = np.ones((3, 3), dtype=int)
# Union-loop iterations per image at 256^2 measured under the interpreter (stats[:, 0]):
# 13-15 on smooth SAM-like masks (the outside of a disk, noise smoothed by sigma 4-16). The
# bar is ~3x that: a regression of the chain handling (200 without it) fails it.
MAX_UNION_ITERS_256 = 45


def _ring(h, w, r0, r1):
    yy, xx = np.mgrid[:h, :w]
    d = (yy - h / 2) ** 2 + (xx - w / 2) ** 2
    return (d >= r0**2) & (d < r1**2)


def _serpentine(h, w):
    m = np.zeros((h, w), bool)
    m[::2] = True
    m[1::4, -1] = True
    m[3::4, 0] = True
    return m


def _spiral(n):
    """A one-pixel-wide square spiral (a single component as long as half the image)."""
    m = np.zeros((n, n), bool)
    y, x, dy, dx, step = n // 2, n // 2, 0, 1, 1
    while True:
        for _ in range(2):
            for _ in range(step):
                if not (0 <= y < n and 0 <= x < n):
                    return m
                m[y, x] = True
                y, x = y + dy, x + dx
            dy, dx = dx, -dy
        step += 2  # leave a one-pixel gap between the turns


def _smooth(rng, shape, sigma, level=0.5):
    f = ndimage.gaussian_filter(rng.random(shape), sigma)
    return (f - f.mean()) / f.std() <= level  # the outside of SAM-like objects, with holes


@functools.lru_cache(maxsize=None)
def _shapes_batch() -> np.ndarray:
    """(B, 41, 41): long components, a ring and its complement, diagonals, edge cases."""
    h = w = 41
    single = np.zeros((h, w), bool)
    single[17, 23] = True
    diag = np.eye(h, dtype=bool) | np.eye(h, dtype=bool)[::-1]  # an X: 8-connected only
    ring = _ring(h, w, 8, 14)
    return np.stack([ring, ~ring, _serpentine(h, w), ~_serpentine(h, w), _spiral(h), diag,
                     np.ones((h, w), bool), np.zeros((h, w), bool), single])


def _scipy(m: np.ndarray):
    lab, _ = ndimage.label(m, structure=EIGHT)
    sizes = np.bincount(lab.ravel())
    return lab, np.where(lab > 0, sizes[lab], 0)


def check_parity(mask: torch.Tensor) -> tuple:
    """The kernel's (labels, areas) equal the torch path's exactly and scipy's (areas equal,
    labels the same partition) on every image of ``mask`` (..., H, W)."""
    labels, areas = cc.connected_components_triton(mask)
    ref_l, ref_a = masks_mod.connected_components_torch(mask)
    assert labels.shape == areas.shape == mask.shape and labels.dtype == areas.dtype == torch.int32
    bad = int((labels != ref_l).sum()) + int((areas != ref_a).sum())
    assert bad == 0, f"{bad} label/area values differ from the torch path (shape {tuple(mask.shape)})"
    flat_m = (mask != 0).reshape(-1, *mask.shape[-2:]).cpu().numpy()
    flat_l = labels.reshape(flat_m.shape).cpu().numpy()
    flat_a = areas.reshape(flat_m.shape).cpu().numpy()
    for i, one in enumerate(flat_m):
        lab, area = _scipy(one)
        assert np.array_equal(flat_a[i], area), f"image {i}: areas differ from scipy"
        fg = lab > 0
        pairs = set(zip(flat_l[i][fg].tolist(), lab[fg].tolist()))
        assert len(pairs) == len(set(lab[fg].tolist())) == len(set(flat_l[i][fg].tolist())), \
            f"image {i}: not the partition scipy finds"
    return labels, areas


# ----------------------------------------------------------------------------- interpreter
@pytest.mark.interp
@needs_interp
@pytest.mark.parametrize("shape", [(37, 53), (1, 9), (13, 1), (64, 63)])
def test_random_masks_n1hw(shape):
    """(N, 1, H, W) bool, densities 0.1-0.9 and a smooth mask; sizes not multiples of 16."""
    rng = np.random.default_rng(sum(shape))
    batch = [rng.random(shape) < d for d in (0.1, 0.3, 0.5, 0.7, 0.9)] + [_smooth(rng, shape, 1.5)]
    check_parity(torch.from_numpy(np.stack(batch))[:, None])  # (N, 1, H, W) bool


@pytest.mark.interp
@needs_interp
def test_long_components_and_edge_cases_bhw():
    """(B, H, W): ring and complement, serpentine, spiral, X, all-fg, all-bg, one pixel."""
    labels, areas = check_parity(torch.from_numpy(_shapes_batch()))
    assert int(areas[4].max()) == int(_shapes_batch()[4].sum())  # the spiral is one component
    assert labels[7].eq(0).all() and areas[6].eq(41 * 41).all()


@pytest.mark.interp
@needs_interp
def test_other_dtypes_and_leading_dims():
    """Float masks (nonzero, NaN included, as ``mask != 0``), uint8, extra leading dims."""
    rng = np.random.default_rng(5)
    m = rng.random((2, 3, 19, 23)) < 0.45
    f = torch.from_numpy(np.where(m, rng.normal(size=m.shape), 0.0)).float()
    f[0, 0, 3, 4] = float("nan")
    check_parity(f)
    check_parity(torch.from_numpy(m.astype(np.uint8) * 7))
    check_parity(torch.from_numpy(m)[:, :, ::2, 1:])  # a non-contiguous view


@pytest.mark.interp
@needs_interp
def test_256_sam_like_and_union_loop_iterations():
    """The hot shape: (N, 1, 256, 256) outside-of-object masks. Prints the loop counters the
    roofline in the kernel's docstring quotes, and bounds the union loop."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:256, :256]
    disk = ((yy - 128) ** 2 + (xx - 120) ** 2) < 70**2
    batch = np.stack([~disk | (disk & (rng.random((256, 256)) < 0.002)), _smooth(rng, (256, 256), 8)])
    mask = torch.from_numpy(batch)[:, None]
    stats = torch.zeros(len(batch), cc.STATS_LEN, dtype=torch.int32)
    t = time.perf_counter()
    labels, areas = cc.connected_components_triton(mask, stats=stats)
    print(f"interpreter {time.perf_counter() - t:.1f} s; per image [union iterations, chunks, work items, "
          f"flatten steps (sum over the tiles), worst tile]: {stats[:, :5].tolist()}")
    ref_l, ref_a = masks_mod.connected_components_torch(mask)
    assert torch.equal(labels, ref_l) and torch.equal(areas, ref_a)
    assert int(stats[:, 0].max()) <= MAX_UNION_ITERS_256, stats[:, 0].tolist()
    assert int(stats[:, 1].max()) == 1  # one chunk of work items per image


@pytest.mark.interp
@needs_interp
def test_fill_holes_through_dispatcher_matches_torch_path():
    from sam2_fast.kernels import dispatch as K
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 1, 33, 47, generator=g)
    want = masks_mod.fill_holes_in_mask_scores(scores, 8)
    K.reset_launch_counts()
    with K.force_kernels():
        got = masks_mod.fill_holes_in_mask_scores(scores, 8)
        labels, areas = masks_mod.connected_components(scores > 0)
    assert K.launch_counts() == {"connected_components": 2}, K.launch_counts()
    assert torch.equal(got, want) and not torch.equal(got, scores)  # some holes were filled
    ref_l, ref_a = masks_mod.connected_components_torch(scores > 0)
    assert torch.equal(labels, ref_l) and torch.equal(areas, ref_a)


@pytest.mark.interp
@needs_interp
@pytest.mark.parametrize("planted", ["four_connectivity", "no_flatten"])
def test_mutation_is_caught(monkeypatch, planted):
    """Product mutations: the diagonal partners of the work items become the up pixel
    (4-connectivity across rows), or phase 4 skips the walk to the roots."""
    if planted == "four_connectivity":
        monkeypatch.setattr(cc, "UP_DX", (0, 0, 0))
    else:
        monkeypatch.setattr(cc, "FLATTEN", False)
    with pytest.raises(AssertionError, match="differ from the torch path") as info:
        check_parity(torch.from_numpy(_shapes_batch()))
    print(info.value)


@pytest.mark.interp
@needs_interp
def test_switch_and_compile_fullgraph(monkeypatch):
    """SAM2_FAST_DISABLE_CONNECTED_COMPONENTS=1 keeps the torch path; torch.compile(fullgraph)
    traces the custom op (fake impl) and runs the kernel."""
    from sam2_fast.kernels import dispatch as K
    mask = torch.from_numpy(_shapes_batch()[:3])
    want = masks_mod.connected_components_torch(mask)
    K.reset_launch_counts()
    monkeypatch.setenv("SAM2_FAST_DISABLE_CONNECTED_COMPONENTS", "1")
    with K.force_kernels():
        masks_mod.connected_components(mask)
    assert K.launch_counts() == {}
    monkeypatch.delenv("SAM2_FAST_DISABLE_CONNECTED_COMPONENTS")
    torch._dynamo.reset()
    fn = torch.compile(masks_mod.connected_components, fullgraph=True, backend="aot_eager")
    with K.force_kernels():
        got = fn(mask)
    torch._dynamo.reset()
    assert K.launch_counts() == {"connected_components": 1}
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.interp
@needs_interp
def test_selection_numerics_check_is_exact(monkeypatch):
    """The slot's check rejects a kernel that is wrong anywhere (planted: no flatten) and keeps
    the torch loop; the right kernel passes with error 0."""
    from sam2_fast.kernels import select as sel
    from sam2_fast.kernels import slots
    mask = torch.from_numpy(_shapes_batch()[:4])
    timer = {"triton": 1.0, "torch": 50.0}
    fake = lambda fn: timer[fn.__defaults__[0].name]  # noqa: E731
    good = sel.measure(slots.CONNECTED_COMPONENTS, mask, timer=fake)
    assert good["choice"] == "triton" and good["errors"] == {"triton": 0.0, "torch": 0.0}
    monkeypatch.setattr(cc, "FLATTEN", False)
    bad = sel.measure(slots.CONNECTED_COMPONENTS, mask, timer=fake)
    assert bad["choice"] == "torch" and bad["errors"]["triton"] == float("inf")


def test_unsupported_reasons_are_named():
    assert "CUDA" in cc.unsupported_reason(torch.zeros(2, 4, 4, dtype=torch.bool))
    assert cc.unsupported_reason(torch.zeros(2, 4, 4, dtype=torch.bool), forced=True) is None
    assert "(..., H, W)" in cc.unsupported_reason(torch.zeros(4, dtype=torch.bool), forced=True)
    big = torch.empty(1, 16384, 16384, dtype=torch.bool, device="meta")
    assert "too large" in cc.unsupported_reason(big, forced=True)


# ----------------------------------------------------------------------------- CUDA
def _cuda_masks() -> torch.Tensor:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256]
    disk = ((yy - 128) ** 2 + (xx - 120) ** 2) < 70**2
    batch = [~disk, _smooth(rng, (256, 256), 8), _smooth(rng, (256, 256), 3)]
    batch += [rng.random((256, 256)) < d for d in (0.2, 0.5, 0.8)]
    batch += [np.pad(_serpentine(41, 41), ((0, 215), (0, 215))), np.ones((256, 256), bool)]
    return torch.from_numpy(np.stack(batch))[:, None]  # (8, 1, 256, 256)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(256, 256), (37, 53), (1024, 1024)])
def test_cuda_matches_cpu_torch_path(shape):
    if shape == (256, 256):
        mask = _cuda_masks()
    else:
        rng = np.random.default_rng(1)
        mask = torch.from_numpy(np.stack([_smooth(rng, shape, 4), rng.random(shape) < 0.5]))[:, None]
    labels, areas = cc.connected_components_triton(mask.cuda())
    ref_l, ref_a = masks_mod.connected_components_torch(mask)
    assert torch.equal(labels.cpu(), ref_l) and torch.equal(areas.cpu(), ref_a)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_no_host_sync_and_graph_capture(monkeypatch):
    monkeypatch.setenv("SAM2_FAST_DISABLE_CONNECTED_COMPONENTS", "0")  # opt in (UNVERIFIED_ON_GPU)
    monkeypatch.setenv("SAM2_FAST_BACKEND_CONNECTED_COMPONENTS", "triton")
    mask = _cuda_masks().cuda()
    ref_l, ref_a = masks_mod.connected_components_torch(mask.cpu())
    masks_mod.connected_components(mask)  # warm-up: compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        labels, areas = masks_mod.connected_components(mask)  # the dispatcher, no host read
        filled = masks_mod.fill_holes_in_mask_scores(mask.float() - 0.5, 8)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(labels.cpu(), ref_l) and torch.equal(areas.cpu(), ref_a)
    assert filled.shape == mask.shape
    static = torch.zeros_like(mask)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        cc.connected_components_triton(static)  # warm-up on the capture stream
        with torch.cuda.graph(graph, stream=stream):
            out_l, out_a = cc.connected_components_triton(static)
    static.copy_(mask)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out_l.cpu(), ref_l) and torch.equal(out_a.cpu(), ref_a)


def test_unverified_kernel_is_opt_in_on_cuda(monkeypatch):
    """Until a GPU run has passed it, CUDA calls keep the torch loop unless the switch is set
    to 0; the other kernels' CUDA default is unchanged (policy only: no GPU needed)."""
    from sam2_fast.kernels import dispatch as K
    monkeypatch.delenv("SAM2_FAST_DISABLE_CONNECTED_COMPONENTS", raising=False)
    monkeypatch.delenv(K.ENV_ALL, raising=False)
    assert "connected_components" in K.UNVERIFIED_ON_GPU
    assert not K.kernel_enabled("connected_components", "cuda")
    assert K.kernel_enabled("mask_upsample", "cuda")
    monkeypatch.setenv("SAM2_FAST_DISABLE_CONNECTED_COMPONENTS", "0")
    assert K.kernel_enabled("connected_components", "cuda")
    monkeypatch.setenv("SAM2_FAST_DISABLE_CONNECTED_COMPONENTS", "1")
    assert not K.kernel_enabled("connected_components", "cuda")
