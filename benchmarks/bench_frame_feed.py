"""What the tracking loop's main thread pays per frame for its frame feed.

    PYTHONPATH=. python benchmarks/bench_frame_feed.py                      # CPU, 480p synthetic
    PYTHONPATH=. python benchmarks/bench_frame_feed.py --device cuda        # + upload/normalise

Times the exact call the tracker makes per frame (``outputs.frame_features``:
``session.images[t].to(device).float().unsqueeze(0)``) over a sequential walk of a video
file, for the lazy source (the predictor's default: PIL resize threads prefetching ahead)
and for the reference-style preloaded tensor (every frame normalised on the device before
the loop, as the benchmark's ``init_state`` gives the reference). Between two frames the
main thread simulates the model: ``--host-ms`` of pure-Python work (GIL held, like an
eager launch loop) and, on CUDA, ``--gpu-ms`` of queued device time (the stream is busy when
the next frame is asked for, as in a GPU-bound frame).

Printed per variant (ms per frame): ``get`` p50/p90 (main thread inside the call), ``wait``
(of which blocked on the prefetcher, mean), ``loop`` (wall per frame incl. the simulated
model); on CUDA also ``sync`` p50 (a synchronised fetch: stream drained, fetch, drained
again: upload + normalise end to end); ``ahead_hits`` (frames prepared ahead),
``feed_wait_ms`` (total time blocked on one of them), ``ring_stalls`` (CUDA: pinned buffer
still being read). Variants: ``lazy`` (``fast_feed``: the next frame prepared ahead; CUDA:
pinned ring, async upload), ``lazy-plain`` (``fast_feed=False``: normalise, and upload
synchronously from pageable memory, on the caller's thread, as before), ``preloaded``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sam2_fast.video.frames import open_frames  # noqa: E402


def make_video(path: str, n: int, w: int = 854, h: int = 480) -> str:
    """A 480p H.264 file: a moving pattern plus noise (so frames decode to distinct data)."""
    import av

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for t in range(n):
            a = np.stack([(xx * 3 + t * 7) % 256, (yy * 5 + t * 3) % 256, ((xx + yy + t) * 2) % 256], -1)
            a = np.clip(a + rng.integers(0, 16, a.shape), 0, 255).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def busy_python(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    x = 0
    while time.perf_counter() < end:
        x += 1


class GpuWork:
    """Queues ~``ms`` of device time in one kernel (``torch.cuda._sleep``, a spin of N clock
    cycles, calibrated here) without waiting for it; at most one frame of it stays queued
    (``bound``: the caller waits for the previous frame's work, a pipeline one frame deep,
    so a GPU-bound loop does not grow an unbounded queue)."""

    def __init__(self, device: torch.device, ms: float) -> None:
        self.device = device
        self.cycles = 0
        self._events: List[Any] = []
        if ms <= 0:
            return
        probe = 10_000_000
        torch.cuda._sleep(probe)  # warm up
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        torch.cuda._sleep(probe)
        torch.cuda.synchronize(device)
        self.cycles = max(1, int(probe * ms / ((time.perf_counter() - t) * 1e3)))

    def __call__(self) -> None:
        if self.cycles:
            torch.cuda._sleep(self.cycles)
        ev = torch.cuda.Event()
        ev.record()
        self._events.append(ev)
        if len(self._events) > 1:
            self._events.pop(0).synchronize()


def pct(xs: List[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def run_variant(name: str, get: Callable[[int], torch.Tensor], frames: int, device: torch.device,
                host_ms: float, gpu: GpuWork | None, waited: Callable[[], float]) -> Dict[str, Any]:
    cuda = device.type == "cuda"
    gets, loops, waits, syncs = [], [], [], []
    get(0)  # frame 0 comes from init_state, outside the loop
    if cuda:
        torch.cuda.synchronize(device)
    prev = time.perf_counter()
    for t in range(1, frames):
        w0 = waited()
        t0 = time.perf_counter()
        image = get(t).to(device).float().unsqueeze(0)  # what frame_features does
        gets.append((time.perf_counter() - t0) * 1e3)
        waits.append((waited() - w0) * 1e3)
        del image
        busy_python(host_ms)
        if gpu is not None:
            gpu()
        now = time.perf_counter()
        loops.append((now - prev) * 1e3)
        prev = now
    if cuda:  # synchronised fetches: upload + normalise end to end, the stream idle before
        torch.cuda.synchronize(device)
        for t in range(max(1, frames - 16), frames):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            get(t)
            torch.cuda.synchronize(device)
            syncs.append((time.perf_counter() - t0) * 1e3)
    row = dict(variant=name, get_p50=pct(gets, 50), get_p90=pct(gets, 90),
               wait_mean=float(np.mean(waits)), wait_p90=pct(waits, 90), loop_p50=pct(loops, 50))
    if syncs:
        row["sync_p50"] = pct(syncs, 50)
    return row


def waited_counter(src: Any) -> Callable[[], float]:
    """Seconds the main thread spent blocked on the prefetcher: the source's own counter, or
    (older code without one) a timer around the main thread's condition waits."""
    if hasattr(src, "wait_s"):
        return lambda: src.wait_s
    total = [0.0]
    inner = src._cv.wait

    def timed_wait(*a: Any, **k: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return inner(*a, **k)
        t0 = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            total[0] += time.perf_counter() - t0

    src._cv.wait = timed_wait
    return lambda: total[0]


def bench(video: str, size: int, workers: int, args: argparse.Namespace) -> List[Dict[str, Any]]:
    device = torch.device(args.device)
    gpu = GpuWork(device, args.gpu_ms) if device.type == "cuda" and args.gpu_ms > 0 else None
    rows = []
    new_api = "fast_feed" in inspect.signature(open_frames).parameters  # absent before the feed
    for v in [v for v in args.variants.split(",") if v.startswith("lazy")]:
        if v == "lazy-plain" and not new_api:
            continue
        extra = {"fast_feed": v == "lazy"} if new_api else {}
        src = open_frames(video, size, device, prefetch=args.prefetch, workers=workers, **extra)
        try:
            src.hint(0)
            time.sleep(args.warm_s)  # the prefetcher fills its window as during add_new_points
            row = run_variant(v, lambda t: src[t], args.frames, device, args.host_ms, gpu,
                              waited_counter(src))
            feed = getattr(src, "_feed", None)
            if feed is not None:
                row.update(ahead_hits=feed.hits, feed_wait_ms=feed.wait_s * 1e3,
                           ring_stalls=getattr(feed, "stalls", "-"))
        finally:
            src.close()
        rows.append(row)
    if "preloaded" in args.variants:  # reference style: all frames normalised on the device
        with open_frames(video, size, "cpu", prefetch=0) as src:
            images = torch.stack([src[t] for t in range(args.frames)]).to(device)
        rows.append(run_variant("preloaded", lambda t: images[t], args.frames, device,
                                args.host_ms, gpu, lambda: 0.0))
    for r in rows:
        r.update(size=size, workers=workers)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", help="video file (default: a synthetic 854x480 H.264 clip)")
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--sizes", default="1024,512")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--prefetch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--host-ms", type=float, default=None,
                    help="simulated model host time per frame (default 30 CPU, 20 CUDA)")
    ap.add_argument("--gpu-ms", type=float, default=25.0, help="CUDA: device time queued per frame")
    ap.add_argument("--variants", default="lazy,lazy-plain,preloaded",
                    help="lazy (fast feed), lazy-plain (fast_feed=False), preloaded (reference style)")
    ap.add_argument("--warm-s", type=float, default=0.5)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available on this machine")
    if args.host_ms is None:
        args.host_ms = 20.0 if args.device.startswith("cuda") else 30.0
    with tempfile.TemporaryDirectory() as tmp:
        video = args.video or make_video(os.path.join(tmp, "480p.mp4"), args.frames)
        gpu = f", gpu {args.gpu_ms} ms" if args.device.startswith("cuda") else ""
        print(f"video {video}, {args.frames} frames, device {args.device}, host {args.host_ms} ms"
              f"{gpu} per frame; ms per frame:")
        cols = ["size", "workers", "variant", "get_p50", "get_p90", "wait_mean", "wait_p90", "loop_p50",
                "sync_p50", "ahead_hits", "feed_wait_ms", "ring_stalls"]
        print(" | ".join(cols))
        for size in (int(s) for s in args.sizes.split(",")):
            for workers in (int(w) for w in args.workers.split(",")):
                for r in bench(video, size, workers, args):
                    print(" | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                                     for c in cols), flush=True)


if __name__ == "__main__":
    main()
