"""Streaming tracker check and benchmark (CPU or GPU): exactness, flat memory, frames/s.

    python benchmarks/bench_stream.py --device cuda --out stream.json          # GPU check
    python benchmarks/bench_stream.py --device cpu --image-size 64 --resolution 96x128 \\
        --frames 60 --speed-frames 20 --runtime-frames 0                      # CPU smoke run

Random sensitive weights (no checkpoint needed), SAM 2.1 tiny, 2 objects (the second added
halfway), synthetic frames drawn on the fly at the given resolution. Parts:

1. ``exact``: stream vs video predictor on the same frames and prompts (max |diff|, fp32);
2. ``memory``: allocated bytes (CUDA allocator, or the stream's tensors on CPU) and RSS every
   ``--sample-every`` frames over ``--frames`` frames; least-squares slope per half;
3. ``speed``: frames/s of ``stream()`` (prep overlapped), ``track()`` (prep inline) and
   ``propagate_in_video`` on preloaded frames, plus the host prep time per frame;
4. ``runtime``: the same stream under ``enable_fast_runtime`` (bf16, static bank, CUDA
   graphs; compile off by default to fit a short check) — memory slope and frames/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, Iterator, List

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sam2_fast.build_sam import build_sam2_video_predictor  # noqa: E402
from sam2_fast.stream import StreamingTracker  # noqa: E402
from sam2_fast.utils.random_weights import sensitize_  # noqa: E402
from sam2_fast.video.frames_stream import prepare_frame  # noqa: E402


def frames(n: int, h: int, w: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Synthetic HWC uint8 frames: a drifting bright ellipse and a dark square on texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 110 + 25 * np.sin(0.03 * xx[..., None] + 0.05 * yy[..., None] + rng.uniform(0, 6, 3))
    base = np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    for t in range(n):
        img = base.copy()
        cx, cy = w * (0.3 + 0.2 * np.sin(t / 40.0)), h * (0.5 + 0.1 * np.sin(t / 9.0))
        ell = ((xx - cx) / (0.15 * w)) ** 2 + ((yy - cy) / (0.2 * h)) ** 2 <= 1.0
        img[ell] = (230, 200, 60)
        sx = int(w * (0.7 - 0.1 * abs(np.sin(t / 25.0))))
        img[int(0.15 * h):int(0.35 * h), sx:sx + int(0.15 * w)] = (20, 40, 80)
        yield img


def prompts(h: int, w: int) -> Dict[int, Dict[str, Any]]:
    return {1: dict(points=[[0.3 * w, 0.5 * h]], labels=[1]),
            2: dict(bbox=[0.55 * w, 0.15 * h, 0.85 * w, 0.35 * h])}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def allocated(device: torch.device, tracker: StreamingTracker) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else tracker.tensor_bytes()


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def slope(points: List[List[float]]) -> float:
    x = np.array([p[0] for p in points], np.float64)
    y = np.array([p[1] for p in points], np.float64)
    return float(np.polyfit(x, y, 1)[0]) if len(points) >= 2 else float("nan")


def run_stream(tracker, n, h, w, second, sample_every=0, device=None, keep=None):
    """Stream n frames; prompt object 1 on frame 0 and object 2 on ``second``."""
    p = prompts(h, w)
    samples, kept = [], {}
    for f, ids, m in tracker.stream(frames(n, h, w)):
        if f == 0:
            _, _, m = tracker.add_new_prompt(0, 1, **p[1])
        if f == second:
            _, _, m = tracker.add_new_prompt(f, 2, **p[2])
        if keep is not None and f < keep:
            kept[f] = m.float().cpu()
        if sample_every and f % sample_every == 0:
            sync(device)
            samples.append([f, allocated(device, tracker), rss()])
    sync(tracker.predictor.device)
    return samples, kept


def run_video(pred, n, h, w, second):
    p = prompts(h, w)
    arr = np.stack(list(frames(n, h, w)))
    state = pred.init_state(arr)
    out = {}
    pred.add_new_points_or_box(state, 0, 1, **{("box" if k == "bbox" else k): v for k, v in p[1].items()})
    for f, _, m in pred.propagate_in_video(state, 0, second):
        out[f] = m.float().cpu()
    _, _, m = pred.add_new_points_or_box(state, second, 2, box=p[2]["bbox"])
    out[second] = m.float().cpu()
    for f, _, m in pred.propagate_in_video(state, second + 1):
        out[f] = m.float().cpu()
    return out


def memory_report(samples, second, warmup):
    halves = ([s for s in samples if warmup <= s[0] < second], [s for s in samples if s[0] >= second + warmup])
    rep = {}
    for name, half in zip(("first_half", "second_half"), halves):
        rep[name] = {"bytes_slope_per_frame": slope([[s[0], s[1]] for s in half]),
                     "bytes_min": min((s[1] for s in half), default=None),
                     "bytes_max": max((s[1] for s in half), default=None),
                     "rss_slope_per_frame": slope([[s[0], s[2]] for s in half])}
    late = [s[2] for s in halves[1]] or [0]
    early = [s[2] for s in halves[0]] or [0]
    rep["rss_growth_after_warmup_mib"] = (max(late) - min(early)) / 2**20
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", default="sam2.1_hiera_tiny")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--resolution", default="480x854", help="HxW of the frames")
    ap.add_argument("--exact-frames", type=int, default=40)
    ap.add_argument("--frames", type=int, default=1500, help="memory run length")
    ap.add_argument("--sample-every", type=int, default=50)
    ap.add_argument("--speed-frames", type=int, default=200)
    ap.add_argument("--runtime-frames", type=int, default=600)
    ap.add_argument("--compile", action="store_true", help="compile in the runtime part")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds: later parts are skipped past it")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    h, w = (int(v) for v in args.resolution.split("x"))
    device = torch.device(args.device)
    report: Dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "config": args.config, "image_size": args.image_size,
                              "resolution": [h, w], "objects": 2}

    def dump() -> None:
        print(json.dumps(report, indent=1), flush=True)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(report, fh, indent=1)

    start = time.perf_counter()

    def over(part: str) -> bool:
        if time.perf_counter() - start > args.budget:
            report.setdefault("skipped_for_time", []).append(part)
            return True
        return False

    # 0. device-side resize vs PIL, and what each costs per frame
    from sam2_fast.video.frames_base import resize_u8_on_device

    rz = {}
    for rh, rw in ((h, w), (1080, 1920)):
        fr = list(frames(3, rh, rw))
        diff = max(int((prepare_frame(f, args.image_size).pixels.int()
                        - resize_u8_on_device(torch.from_numpy(f).to(device), args.image_size).cpu().int()).abs().max())
                   for f in fr)
        t0 = time.perf_counter()
        for f in fr:
            prepare_frame(f, args.image_size)
        host_ms = 1000 * (time.perf_counter() - t0) / len(fr)
        t0 = time.perf_counter()
        for f in fr:
            prepare_frame(f, args.image_size, on_device=True)
        host_dev_ms = 1000 * (time.perf_counter() - t0) / len(fr)
        x = torch.from_numpy(fr[0]).to(device)
        resize_u8_on_device(x, args.image_size)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            resize_u8_on_device(x, args.image_size)
        sync(device)
        rz[f"{rh}x{rw}"] = {"max_abs_diff_vs_pil": diff, "host_ms_pil_path": host_ms,
                            "host_ms_device_path": host_dev_ms,
                            "device_resize_ms": 100 * (time.perf_counter() - t0)}
    report["device_resize"] = rz
    dump()

    torch.manual_seed(0)
    pred = build_sam2_video_predictor(args.config, device=device,
                                      hydra_overrides_extra=[f"++model.image_size={args.image_size}"])
    sensitize_(pred, 0, obj_score_bias=-0.04).eval()

    # 1. exactness
    n = args.exact_frames
    t0 = time.perf_counter()
    _, got = run_stream(StreamingTracker(pred), n, h, w, n // 2, keep=n)
    want = run_video(pred, n, h, w, n // 2)
    diffs = [float((got[f] - want[f]).abs().max()) for f in range(1, n)]
    present = sum(int((want[f] > 0).flatten(1).any(1).sum()) for f in range(n))
    _, dev = run_stream(StreamingTracker(pred, preprocess="device"), n, h, w, n // 2, keep=n)
    dev_diff = max(float((got[f] - dev[f]).abs().max()) for f in range(n))
    report["exact"] = {"frames": n, "max_abs_diff": max(diffs), "frames_bitwise_equal": sum(d == 0 for d in diffs) + 1,
                       "device_preprocess_max_abs_diff_vs_host": dev_diff,
                       "present_object_frames": present, "seconds": time.perf_counter() - t0}
    dump()
    if over("memory"):
        return

    # 2. memory
    warmup = 100
    t0 = time.perf_counter()
    samples, _ = run_stream(StreamingTracker(pred), args.frames, h, w, args.frames // 2, args.sample_every, device)
    dt = time.perf_counter() - t0
    report["memory"] = {"frames": args.frames, "seconds": dt, "fps": args.frames / dt,
                        "what": "torch.cuda.memory_allocated" if device.type == "cuda" else "stream tensor bytes",
                        **memory_report(samples, args.frames // 2, warmup), "samples": samples}
    dump()

    # 3. speed
    n = args.speed_frames
    if n and not over("speed"):
        gen = frames(30, h, w)
        sample = [next(gen) for _ in range(30)]
        t0 = time.perf_counter()
        for fr in sample:
            prepare_frame(fr, args.image_size)
        prep_ms = 1000 * (time.perf_counter() - t0) / len(sample)
        t0 = time.perf_counter()
        run_stream(StreamingTracker(pred), n, h, w, 1)
        stream_s = time.perf_counter() - t0
        tr = StreamingTracker(pred)
        p = prompts(h, w)
        t0 = time.perf_counter()
        for f, fr in enumerate(frames(n, h, w)):
            if f == 0:
                tr.load_first_frame(fr)
                tr.add_new_prompt(0, 1, **p[1])
            else:
                tr.track(fr)
                if f == 1:
                    tr.add_new_prompt(1, 2, **p[2])
        sync(device)
        track_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_video(pred, n, h, w, 1)
        video_s = time.perf_counter() - t0  # includes drawing the frames up front
        report["speed"] = {"frames": n, "host_prep_ms_per_frame": prep_ms, "stream_fps": n / stream_s,
                           "track_fps": n / track_s, "video_predictor_fps_incl_frame_drawing": n / video_s}
        for mode in ("host", "device"):  # 1080p frames: where the host resize costs most
            t0 = time.perf_counter()
            run_stream(StreamingTracker(pred, preprocess=mode), n, 1080, 1920, 1)
            report["speed"][f"stream_fps_1080p_{mode}_preprocess"] = n / (time.perf_counter() - t0)
        dump()

    # 4. fast runtime
    n = args.runtime_frames
    if n and not over("runtime"):
        from sam2_fast.runtime import enable_fast_runtime

        t0 = time.perf_counter()
        enable_fast_runtime(pred, compile=args.compile)
        samples, _ = run_stream(StreamingTracker(pred), n, h, w, n // 2, args.sample_every, device)
        dt = time.perf_counter() - t0
        info = {k: v for k, v in pred.runtime_info.items() if k in ("autocast", "cuda_graphs", "compiled", "skipped")}
        info["counters"] = dict(pred.runtime_info["counters"])
        report["runtime"] = {"frames": n, "seconds_incl_warmup": dt, "info": info,
                             **memory_report(samples, n // 2, warmup), "samples": samples}
        t0 = time.perf_counter()
        run_stream(StreamingTracker(pred), min(n, 200), h, w, 1)
        report["runtime"]["stream_fps_warm"] = min(n, 200) / (time.perf_counter() - t0)
        dump()


if __name__ == "__main__":
    main()
