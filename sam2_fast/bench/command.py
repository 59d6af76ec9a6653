"""``sam2-fast bench``: our predictor side by side with the reference, on the same clip."""

from __future__ import annotations

import argparse
import os
import dataclasses
import datetime as _dt
import sys
import time
from typing import Dict, List, Optional

import torch

from sam2_fast.bench import impls, report
from sam2_fast.bench.env import card_slug, environment
from sam2_fast.bench.flops import measure_matmul_tflops
from sam2_fast.bench.ladder import select_rows
from sam2_fast.bench.runner import Case, run_rows
from sam2_fast.bench.video import load_clip, parse_resolution, synthetic_clip


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available here")
    return dev


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Options shared by ``bench`` and ``profile``; CPU/GPU defaults are filled in later."""
    p.add_argument("--model", default="tiny", help=f"one of {sorted(impls.MODEL_CONFIGS)} or an official config path")
    p.add_argument("--image-size", type=int, default=None,
                   help="model input size (multiple of 32); default 256 on CPU, the model's own (1024) on CUDA; 0 = model's")
    p.add_argument("--frames", type=int, default=None, help="frames to track (default 8 on CPU, 64 on CUDA)")
    p.add_argument("--resolution", default=None, help="synthetic video size: 240p/360p/480p/720p/1080p or HxW "
                   "(default 240p on CPU, 480p on CUDA)")
    p.add_argument("--video", default=None, help="track this video file or JPEG folder instead of a synthetic one")
    p.add_argument("--points", default=None, help="clicks for --video, 'x,y;x,y' (one per object)")
    p.add_argument("--checkpoint", default=None, help="official .pt checkpoint (default: identical random weights)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def fill_defaults(args: argparse.Namespace, device: torch.device) -> None:
    cuda = device.type == "cuda"
    if args.image_size is None:
        args.image_size = 0 if cuda else 256
    if args.frames is None:
        args.frames = 64 if cuda else 8
    if args.resolution is None:
        args.resolution = "480p" if cuda else "240p"
    if args.threads:
        torch.set_num_threads(args.threads)


def make_clip(args: argparse.Namespace, objects: int):
    if args.video:
        clicks = []
        if args.points:
            clicks = [tuple(float(v) for v in pt.split(",")) for pt in args.points.split(";") if pt.strip()]
        return load_clip(args.video, args.frames, objects, clicks)
    h, w = parse_resolution(args.resolution)
    return synthetic_clip(args.frames, h, w, objects, seed=args.seed)


def build_parser(p: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="sam2-fast bench", description=__doc__)
    p.add_argument("--task", default="track", choices=("track", "amg"),
                   help="track: the video predictor (default); amg: the automatic mask generator on one image")
    add_common_args(p)
    p.add_argument("--objects", default="1", help="objects to track; a comma list runs one case per count, e.g. 1,8")
    p.add_argument("--dtype", default="all", choices=("all", "fp32", "bf16"),
                   help="only rows of this precision (the fp32 reference always runs: it is the accuracy baseline)")
    p.add_argument("--ladder", default="auto", help="our rows: auto, all, none, or keys (eager-fp32,bf16,compile,"
                   "k-window_attention,k-memory_attention,k-mask_upsample,static-batched,cuda-graphs)")
    p.add_argument("--reference", default="auto", help="reference rows: auto, all, none, or keys "
                   "(ref-eager-fp32,ref-bf16,ref-vos)")
    p.add_argument("--ours", default="sam2_fast", choices=("sam2_fast", "reference"),
                   help="'reference' runs the reference in our place: a self-check of the harness")
    p.add_argument("--repeats", type=int, default=None, help="timed passes over the clip (default 1 CPU, 2 CUDA)")
    p.add_argument("--fill-holes", action="store_true",
                   help="keep fill_hole_area post-processing (the pip reference skips it without its CUDA extension)")
    p.add_argument("--no-floor", action="store_true", help="skip the matmul-rate measurement")
    p.add_argument("--out", default="bench_out", help="folder for the JSON and CSV files")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for our compiled rows (default: the runtime's own, "
                        "max-autotune-no-cudagraphs on CUDA); 'default' compiles much faster")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run: rows that would start too late are reported n/a (GPU check)")
    from sam2_fast.bench import amg

    amg.add_args(p)
    return p


def run(args: argparse.Namespace, log=print) -> List[Dict[str, object]]:
    device = pick_device(args.device)
    fill_defaults(args, device)
    if getattr(args, "task", "track") == "amg":
        from sam2_fast.bench import amg

        return amg.run(args, device, log=log)
    if args.repeats is None:
        args.repeats = 2 if device.type == "cuda" else 1
    try:  # bad options fail here, with the problem named, before any model is built
        counts = [int(c) for c in str(args.objects).split(",") if c.strip()]
        if not counts or min(counts) < 1:
            raise ValueError(f"--objects must be positive counts, got {args.objects!r}")
        impls.config_for(args.model)
        if not args.video:
            parse_resolution(args.resolution)
        elif not os.path.exists(args.video):
            raise ValueError(f"--video {args.video!r} does not exist")
        rows = select_rows(device, args.ladder, args.reference)
    except ValueError as exc:
        raise SystemExit(f"sam2-fast bench: error: {exc}") from None
    ours = impls.ours_impl(stand_in=args.ours == "reference")
    ref = impls.reference_impl()
    meta = environment(device)
    matmul = {} if args.no_floor else measure_matmul_tflops(device)
    log(f"sam2-fast bench on {meta['card']} | torch {meta['torch']} | triton {meta['triton']} | "
        f"commit {meta['commit']} | {meta['date']}")
    if matmul:
        log(f"measured {matmul['dtype']} matmul ({matmul['n']}³): {matmul['tflops']:.3g} TFLOP/s")
    if args.compile_mode:
        for row, _ in rows:
            if row.runtime is not None and row.runtime.get("compile"):
                row.runtime["compile_mode"] = args.compile_mode
    if args.dtype != "all":
        rows = [(r, why) for r, why in rows if r.golden or r.dtype == args.dtype]
    all_results = []
    start = time.monotonic()
    for i, objects in enumerate(counts):
        # Each object count gets its share of the budget (unused time carries over).
        deadline = start + args.time_budget * (i + 1) / len(counts) if args.time_budget else None
        clip = make_clip(args, objects)
        case = Case(model=args.model, image_size=args.image_size or None, frames=len(clip.frames), objects=objects,
                    resolution=f"{clip.height}x{clip.width}", video=args.video, checkpoint=args.checkpoint,
                    device=str(device), repeats=args.repeats, seed=args.seed, fill_holes=args.fill_holes)
        log(f"\ncase: model {case.model}, image_size {case.image_size or 'model default'}, {case.frames} frames of "
            f"{clip.source}, ours = {ours.label}")
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        stem = f"{args.model}_{case.resolution}_{objects}obj_{stamp}"
        case_dict = dataclasses.asdict(case)
        case_dict["source"] = clip.source
        case_dict["ours_label"] = ours.label
        out_dir = f"{args.out}/{card_slug(device)}"

        def save(results):  # after every row, so a killed run still leaves its rows behind
            report.write(out_dir, stem, meta, case_dict, report.floor_summary(results, matmul), results)

        results = run_rows(rows, case, clip, ours, ref, device, log=log, deadline=deadline, on_row=save)
        floor = report.floor_summary(results, matmul)
        log("\n" + report.main_table(results))
        if floor["stage_flops"]:
            log("\nper stage (mean of tracked frames):\n" + report.stage_table(results, floor))
        paths = report.write(out_dir, stem, meta, case_dict, floor, results)
        log(f"wrote {paths['json']} and {paths['csv']}")
        all_results.append({"case": case_dict, "rows": results, "floor": floor, "paths": paths})
    if len(counts) > 1:
        log("\nper-object cost (p50 per tracked frame):\n" + report.per_object_table(all_results))
    return all_results


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
