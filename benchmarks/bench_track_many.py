"""``sam2-fast track-many`` throughput: videos/hour of the local pool and of Ray (workers 1
and 2), and what Ray adds per video.

    python benchmarks/bench_track_many.py --out track_many.json               # CPU defaults
    python benchmarks/bench_track_many.py --videos 6 --frames 4 --image-size 128 --workers 1

Synthetic clips (``tests/video_utils.make_clip``), a generated tiny checkpoint (sensitive
random weights, official format), one click and one box per video. Parts:

1. ``runs``: the command itself, as a user runs it (a fresh process; with ``--ray`` it
   starts its own local Ray cluster), per backend and worker count: process wall time,
   the scheduler's wall time (worker start-up included), frames/s and videos/hour;
2. ``dispatch``: the cost of one video's round trip through each backend without the
   tracking (tasks whose video is missing fail in the worker at once): start-up until the
   first record, then ms per video, in one process with one worker.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def make_data(folder: str, videos: int, frames: int, h: int, w: int) -> str:
    from cli_harness import write_mp4
    from video_utils import make_clip

    lines = []
    for i in range(videos):
        n = frames + (i % 3) - 1  # a spread of lengths, so longest-first has something to order
        write_mp4(os.path.join(folder, f"v{i}.mp4"), make_clip(n, h, w, seed=i))
        lines.append({"video": f"v{i}.mp4", "prompts": [
            {"frame": 0, "obj": 1, "points": [[w * 0.3, h * 0.45]], "labels": [1]},
            {"frame": 0, "obj": 2, "box": [w * 0.5, h * 0.1, w * 0.9, h * 0.5]}]})
    path = os.path.join(folder, "videos.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(l) + "\n" for l in lines)
    return path


def run_command(manifest: str, out: str, ckpt: str, size: int, backend: str, workers: int,
                threads: Optional[int] = None) -> Dict[str, Any]:
    cmd = [sys.executable, "-m", "sam2_fast.cli", "track-many", manifest, "--model", "tiny", "--checkpoint", ckpt,
           "--image-size", str(size), "--device", "cpu", "--workers", str(workers), "--out", out]
    if threads:
        cmd += ["--threads", str(threads)]
    if backend == "ray":
        cmd.append("--ray")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    busy = sum(w["seconds"] for w in s["workers"].values())
    return {"backend": backend, "workers": workers, "videos": s["tracked"], "frames": s["frames"],
            "process_s": round(wall, 2), "scheduler_s": s["seconds"], "busy_s": round(busy, 2),
            "frames_per_s": s["frames_per_s"], "videos_per_hour": s["videos_per_hour"], "startup_s": s["startup_s"],
            "videos_per_hour_process": round(3600 * s["tracked"] / wall, 1), "per_worker": s["workers"]}


def dispatch(backend: str, ckpt: str, size: int, n: int, folder: str) -> Dict[str, Any]:
    from sam2_fast.batch.manifest import Task
    from sam2_fast.batch.scheduler import run_tasks
    from sam2_fast.batch.worker import ModelSpec
    from sam2_fast.commands.prompts import FramePrompt

    spec = ModelSpec("sam2.1_hiera_tiny", ckpt, size)
    prompts = {(0, 1): FramePrompt(points=[(1.0, 1.0)], labels=[1])}
    tasks = [Task(i + 1, f"t{i}", os.path.join(folder, "missing.mp4"), prompts, os.path.join(folder, "d", f"t{i}"))
             for i in range(n)]
    stamps: List[float] = []
    started = False
    if backend == "ray":
        import ray

        from sam2_fast.batch.ray_pool import RayPool

        t_ray = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        started, ray_start = True, time.perf_counter() - t_ray
        pool = RayPool(spec, use_gpu=False, cpus_per_actor=2)
    else:
        from sam2_fast.batch.local_pool import LocalPool

        ray_start = 0.0
        pool = LocalPool(spec, ["cpu"], 2)
    t0 = time.perf_counter()
    try:
        res = run_tasks(tasks, pool, 1, 1, log=lambda _m: stamps.append(time.perf_counter()), poll=0.05)
    finally:
        if started:
            ray.shutdown()
    later = [res.records[t.line]["seconds"] for t in tasks[1:]]  # as the interval below: after the first
    inner = sum(later) / len(later)
    per = (stamps[-1] - stamps[0]) / (n - 1)
    return {"backend": backend, "tasks": n, "cluster_start_s": round(ray_start, 2),
            "first_record_s": round(stamps[0] - t0, 2), "ms_per_video": round(1000 * per, 2),
            "ms_in_worker": round(1000 * inner, 2), "ms_overhead": round(1000 * (per - inner), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8, help="frames per video (+-1)")
    ap.add_argument("--resolution", default="180x320", help="HxW of the clips")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--backends", default="local,ray")
    ap.add_argument("--threads", type=int, default=None, help="--threads of every run (default: the command's)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every run (interleaved, so load changes "
                    "on a shared machine hit every configuration alike)")
    ap.add_argument("--dispatch-tasks", type=int, default=100, help="0: skip the dispatch part")
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args()
    h, w = (int(v) for v in args.resolution.split("x"))
    from cli_harness import write_checkpoint

    results: Dict[str, Any] = {"config": vars(args), "load_before": os.getloadavg(), "runs": [], "dispatch": []}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(os.path.join(tmp, "tiny.pt"))
        manifest = make_data(tmp, args.videos, args.frames, h, w)
        for rnd in range(args.repeat):
            for backend in args.backends.split(","):
                for k in (int(v) for v in args.workers.split(",")):
                    out = os.path.join(tmp, f"out-{backend}-{k}-{rnd}")
                    r = {"round": rnd, **run_command(manifest, out, ckpt, args.image_size, backend, k, args.threads),
                         "load": os.getloadavg()[0]}
                    results["runs"].append(r)
                    print(json.dumps({k2: v for k2, v in r.items() if k2 != "per_worker"}), flush=True)
        if args.dispatch_tasks:
            for backend in args.backends.split(","):
                d = dispatch(backend, ckpt, args.image_size, args.dispatch_tasks, tmp)
                results["dispatch"].append(d)
                print(json.dumps(d), flush=True)
    results["load_after"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
