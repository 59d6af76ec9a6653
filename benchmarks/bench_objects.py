"""Per-object cost of tracking, batched vs one object at a time (issue 10), on CPU.

For 1 and N objects on the same synthetic clip: aten operator calls per tracked frame
(torch.profiler, frames after the memory bank and pointer list are full) and ms per
tracked frame, with the batched step (the default) and with per-object tracking through
``track_step`` (``propagate.TRACK_PER_OBJECT``, what the reference predictor does).

    PYTHONPATH=. python benchmarks/bench_objects.py --objects 1,8 --image-size 256
"""

from __future__ import annotations

import argparse
import time

import torch

import sam2_fast.video.propagate as T
from sam2_fast.bench.video import synthetic_clip
from sam2_fast.build_sam import build_sam2_video_predictor
from sam2_fast.utils.random_weights import sensitize_


def measure(pred, clip, objects: int, per_object: bool, warm: int, timed: int):
    """(aten calls per frame over frames warm + timed .. warm + 2 timed - 1, ms per frame
    over frames warm .. warm + timed - 1)."""
    T.TRACK_PER_OBJECT = per_object
    try:
        with torch.inference_mode():
            state = pred.init_state(clip.frames)
            for i, (x, y) in enumerate(clip.clicks[:objects]):
                pred.add_new_points_or_box(state, 0, i + 1, points=[[x, y]], labels=[1])
            loop = T.propagate(pred, state, progress=False)
            for f, _, _ in loop:
                if f == warm - 1:
                    break
            t0 = time.perf_counter()
            for f, _, _ in loop:  # timed without the profiler (it slows op-heavy runs more)
                if f == warm + timed - 1:
                    break
            ms = (time.perf_counter() - t0) * 1e3 / timed
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for f, _, _ in loop:
                    if f == warm + 2 * timed - 1:
                        break
            loop.close()
    finally:
        T.TRACK_PER_OBJECT = False
    ops = sum(1 for e in prof.events() if e.name.startswith("aten::")) / timed
    return ops, ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="sam2.1_hiera_tiny")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--objects", default="1,8")
    p.add_argument("--warm", type=int, default=17, help="frames tracked before measuring (bank full at 17)")
    p.add_argument("--timed", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.objects.split(",")]
    pred = build_sam2_video_predictor(args.config, device="cpu",
                                      hydra_overrides_extra=[f"++model.image_size={args.image_size}"])
    sensitize_(pred, 0, obj_score_bias=2.0)
    pred.eval()
    clip = synthetic_clip(args.warm + 2 * args.timed, 240, 426, max(counts), seed=0)
    print(f"{args.config} at {args.image_size} px, CPU x{args.threads}, frames {args.warm}..{args.warm + 2 * args.timed - 1}")
    print(f"{'mode':<11}{'objects':>8}{'aten/frame':>12}{'x vs 1':>8}{'ms/frame':>10}{'ms/object':>11}")
    for per_object in (True, False):
        base = None
        for n in counts:
            ops, ms = measure(pred, clip, n, per_object, args.warm, args.timed)
            base = ops if base is None else base
            mode = "per-object" if per_object else "batched"
            print(f"{mode:<11}{n:>8}{ops:>12.0f}{ops / base:>8.2f}{ms:>10.1f}{ms / n:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
