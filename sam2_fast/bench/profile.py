"""``sam2-fast profile``: where each millisecond of a tracked frame goes.

Runs one predictor over a clip and writes, under ``profiles/<card>/<model>/``:

* ``report.md``: per-stage time table with FLOPs, achieved TFLOP/s and % of the floor,
  top ops/kernels by time, launches per frame, memory timeline summary;
* ``latency.png``, ``memory.png``, ``stages.png``; ``summary.json`` (all numbers).

The ``torch.profiler`` trace goes to the ignored ``profiles/_traces/<card>/<model>/``.
Stages are also NVTX ranges on CUDA (``sam2_fast.profiling``), so an Nsight Systems run
of this command shows them on the timeline.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional

import torch

from sam2_fast.bench import impls
from sam2_fast.bench.command import add_common_args, fill_defaults, make_clip, pick_device
from sam2_fast.bench.env import card_slug, environment, host_rss_mib
from sam2_fast.bench.flops import flop_counter, measure_matmul_tflops
from sam2_fast.bench.profile_report import write_report
from sam2_fast.bench.stages import StageTimer
from sam2_fast.profiling import instrument, listening, profiler_labels


def build_parser(p: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="sam2-fast profile", description=__doc__)
    add_common_args(p)
    p.add_argument("--objects", type=int, default=1)
    p.add_argument("--impl", default="ours", choices=("ours", "reference"), help="which implementation to profile")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16"), help="default bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="build with vos_optimized=True")
    p.add_argument("--profile-frames", type=int, default=None,
                   help="frames recorded by torch.profiler (default 3 on CPU, 8 on CUDA)")
    p.add_argument("--out", default="profiles", help="report root (reports go to OUT/<card>/<model>/)")
    p.add_argument("--traces", default=None, help="trace folder (default OUT/_traces, git-ignored)")
    p.add_argument("--top", type=int, default=15, help="rows in the top-ops table")
    return p


def _frame_memory(device: torch.device) -> Dict[str, float]:
    row = {"host_mib": host_rss_mib()}
    if device.type == "cuda":
        row["allocated_mib"] = torch.cuda.memory_allocated(device) / 2**20
        row["reserved_mib"] = torch.cuda.memory_reserved(device) / 2**20
        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def _timed_pass(predictor, state, device, timer: StageTimer) -> Dict[str, List]:
    """One pass with the stage timer; per-frame latency and memory."""
    cuda = device.type == "cuda"
    lat, mem = [], []
    if cuda:
        torch.cuda.synchronize(device)
    prev = time.perf_counter()
    timer.begin_frame()
    for _ in predictor.propagate_in_video(state):
        timer.end_frame()
        if cuda:
            torch.cuda.synchronize(device)  # profile mode: exact per-frame wall time matters more than overlap
        now = time.perf_counter()
        lat.append((now - prev) * 1e3)
        mem.append(_frame_memory(device))
        prev = time.perf_counter()
        timer.begin_frame()
    timer.discard_frame()
    return {"latency_ms": lat, "memory": mem}


def _profiler_tables(prof, device: torch.device, frames: int, top: int) -> Dict[str, Any]:
    cuda = device.type == "cuda"
    averages = prof.key_averages()

    def dev_time(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)

    ops = []
    for e in averages:
        if e.key.startswith("stage::") or e.key.startswith("ProfilerStep"):
            continue
        ops.append({"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                    "self_device_ms": dev_time(e) / 1e3})
    key = "self_device_ms" if cuda else "self_cpu_ms"
    ops.sort(key=lambda o: o[key], reverse=True)
    total = sum(o[key] for o in ops) or 1.0
    for o in ops:
        o["pct"] = 100.0 * o[key] / total
    kernels = 0
    cpu_ops = 0
    for e in prof.events():
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
        elif e.device_type == torch.autograd.DeviceType.CPU and e.key.startswith("aten::"):
            cpu_ops += 1
    return {"top": ops[:top], "sorted_by": key, "frames": frames,
            "device_launches_per_frame": kernels / frames if cuda and frames else None,
            "aten_calls_per_frame": cpu_ops / frames if frames else None}


def run(args: argparse.Namespace, log=print) -> Dict[str, Any]:
    device = pick_device(args.device)
    fill_defaults(args, device)
    cuda = device.type == "cuda"
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    impl = impls.ours_impl() if args.impl == "ours" else impls.reference_impl()
    if not impl.available:
        raise SystemExit(f"cannot profile {args.impl}: {impl.missing}"
                         + ("; try --impl reference" if args.impl == "ours" else ""))
    try:
        impls.config_for(args.model)
        clip = make_clip(args, args.objects)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"sam2-fast profile: error: {exc}") from None
    card = card_slug(device)
    # Ours under <model>/, the reference beside it so both can be compared.
    folder = args.model if args.impl == "ours" else f"reference-{args.model}"
    folder += "-compiled" if args.compile else ""
    out_dir = os.path.join(args.out, card, folder)
    trace_dir = os.path.join(args.traces or os.path.join(args.out, "_traces"), card, folder)
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(trace_dir, exist_ok=True)
    log(f"profiling {impl.label} {args.model} ({dtype}{', compiled' if args.compile else ''}) on {device}: "
        f"{len(clip.frames)} frames of {clip.source}")

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else _null()
    torch.backends.cuda.matmul.allow_tf32 = dtype == "bf16"
    torch.backends.cudnn.allow_tf32 = dtype == "bf16"
    summary: Dict[str, Any] = {"env": environment(device), "impl": impl.label, "model": args.model, "dtype": dtype,
                               "compiled": args.compile, "image_size": args.image_size or None,
                               "frames": len(clip.frames), "objects": args.objects, "video": clip.source}
    with impls.quiet_reference():
        # Ours: weights first, then the fast runtime (it may derive buffers from the weights).
        late_runtime = args.compile and impl.name == "ours"
        predictor = impls.build(impl, args.model, args.image_size or None, device, args.compile and not late_runtime,
                                args.checkpoint)
        if not args.checkpoint:
            from sam2_fast.utils.random_weights import sensitize_

            sensitize_(predictor, seed=args.seed, obj_score_bias=2.0)
        if late_runtime:
            from sam2_fast.runtime import enable_fast_runtime

            enable_fast_runtime(predictor)
        impls.disable_hole_filling(predictor)
        with autocast, impls.quiet_reference(), torch.inference_mode():  # quiet again: the build imported more
            state = impls.init_state(impl, predictor, clip.frames, device)
            impls.add_clicks(predictor, state, clip.clicks)
            t0 = time.perf_counter()
            for _ in predictor.propagate_in_video(state):
                pass
            if cuda:
                torch.cuda.synchronize(device)
            summary["warmup_s"] = time.perf_counter() - t0
            log(f"  warm-up pass {summary['warmup_s']:.1f}s; timed pass with stage timer ...")
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            timer = StageTimer(device)
            with instrument(predictor) as found, listening(timer):
                timed = _timed_pass(predictor, state, device, timer)
            summary.update(stages_found=found, stage_ms=timer.mean_ms(), stage_ms_frames=timer.frames_ms, **timed)
            log("  FLOP-counting pass ...")
            counter = flop_counter()
            ftimer = StageTimer(device, counter)
            with counter, instrument(predictor), listening(ftimer):
                _timed_pass(predictor, state, device, ftimer)
            summary["stage_flops"] = ftimer.mean_flops()
            summary["matmul"] = measure_matmul_tflops(device)
            nprof = args.profile_frames or (8 if cuda else 3)
            log(f"  torch.profiler over {nprof} frames ...")
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            with torch.profiler.profile(activities=activities) as prof, profiler_labels(), instrument(predictor):
                seen = 0
                for _ in predictor.propagate_in_video(state, max_frame_num_to_track=nprof - 1):
                    seen += 1
                if cuda:
                    torch.cuda.synchronize(device)
            summary["profiler"] = _profiler_tables(prof, device, seen, args.top)
            summary["runtime_info"] = getattr(predictor, "runtime_info", None)  # ours with --compile
    trace = os.path.join(trace_dir, "trace.json")
    prof.export_chrome_trace(trace)
    with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(trace)
    summary["trace"] = trace + ".gz"
    paths = write_report(out_dir, summary)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "stage_ms_frames"}, f, indent=1, default=str)
    log(f"wrote {paths['report']} (+ {len(paths) - 1} plots); trace {summary['trace']}")
    return {"summary": summary, "paths": paths, "out_dir": out_dir}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv: Optional[List[str]] = None) -> int:
    run(build_parser().parse_args(argv))
    return 0
