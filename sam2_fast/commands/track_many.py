"""``sam2-fast track-many``: track many videos, each with its own prompts, listed in a JSON
Lines manifest, on local worker processes (default) or a Ray cluster (``--ray``).

Each line's outputs go to ``OUT/NAME/`` in the formats of ``sam2-fast track`` (NAME: the
line's ``id``, else the video's file name without extension), with ``OUT/NAME/done.json``
written last. A rerun skips the videos whose outputs are complete for the same options
(a video is known by its name and size, not its path: a moved data set stays done) and
redoes the rest; a video that failed on its inputs (``OUT/NAME/failed.json``: a prompt
past the end, an undecodable file) is reported again, not retried, unless
``--retry-failed``. ``OUT/status.jsonl`` gets one record per manifest line (done or
failed with the reason, frames, seconds, worker, tries), ``OUT/summary.json`` the totals.
The exit status is 1 when any video failed.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List

from sam2_fast.batch.manifest import (BadLine, Task, file_identity, options_hash, probe_frames, read_manifest,
                                      work_frames)
from sam2_fast.batch.scheduler import RunResult, run_tasks
from sam2_fast.batch.worker import FAULT_ENV, ModelSpec, read_complete, read_failed, record
from sam2_fast.commands import outputs as O
from sam2_fast.commands.models import CliError, add_model_args, find_checkpoint, overrides, pick_device, resolve_model
from sam2_fast.commands.track import SAVE_KINDS, save_kinds

EXAMPLES = """manifest (JSON Lines, one video per line; relative paths are relative to the manifest):
  {"video": "a.mp4", "prompts": [{"frame": 0, "obj": 1, "points": [[210, 350]], "labels": [1]}]}
  {"video": "b.mp4", "prompts": [{"frame": 0, "obj": 2, "box": [300, 0, 500, 400]}], "reverse": false}
  {"video": "frames/c", "id": "c-back", "prompts": [{"frame": 40, "obj": 1, "mask": "c40.png"}], "reverse": true}

examples:
  sam2-fast track-many videos.jsonl --model large --out out/                  # one worker per GPU
  sam2-fast track-many videos.jsonl --model tiny --device cpu --workers 2 --out out/
  sam2-fast track-many videos.jsonl --model large --ray --out /shared/out/    # a local Ray cluster, or $RAY_ADDRESS
  sam2-fast track-many videos.jsonl --model large --ray-address ray://head:10001 --out /shared/out/
"""


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="JSON Lines file: one {\"video\", \"prompts\", \"reverse\"} per line")
    add_model_args(p)
    p.add_argument("--out", required=True,
                   help="output folder: OUT/NAME/ per video, OUT/status.jsonl, OUT/summary.json")
    p.add_argument("--save", default="png",
                   help=f"comma-separated outputs per video: {', '.join(SAVE_KINDS)} (default png)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast (CUDA)")
    p.add_argument("--fast", action="store_true", help="our fast runtime (bf16, compiled, CUDA graphs on CUDA)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes / actors (default: one per GPU; else 1 local CPU process, or one per CPU "
                        "of a Ray cluster)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per worker (default: the cores split evenly among the workers; on Ray the "
                        "num_cpus of each CPU actor). CPU masks can differ at a few border pixels between "
                        "thread counts (fp32 sums in another order)")
    p.add_argument("--ray", action="store_true", help="run the workers as Ray actors (needs sam2-fast[ray]); joins "
                   "$RAY_ADDRESS or starts a local cluster")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="the Ray cluster to join (implies --ray)")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="tries per video when its worker dies (killed, out of memory) before it is failed (default 3)")
    p.add_argument("--retry-failed", action="store_true",
                   help="track again the videos that failed on their inputs in an earlier run with the same options "
                        "(a prompt past the end, an undecodable video); by default they are reported, not retried")


def _fault_hook(tasks: List[Task]) -> None:
    """The test hook (see worker.FAULT_ENV): mark the named task."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, sep, flag = spec.partition("=")
    if not sep or not flag:
        raise CliError(f"{FAULT_ENV}={spec!r}: expected NAME=FLAGFILE")
    for t in tasks:
        if t.name == name:
            t.fault = os.path.abspath(flag)


def _bad_record(b: BadLine) -> Dict[str, Any]:
    return {"line": b.line, "name": b.name, "video": b.video, "out": None, "status": "failed", "frames": 0,
            "seconds": 0.0, "worker": None, "error": b.error, "attempts": 0}


def plan(args: argparse.Namespace, out: str, log) -> tuple:
    """Read the manifest: records of bad lines and finished videos, and the tasks to run."""
    kinds = save_kinds(args.save)
    if "rle" in kinds:
        from sam2_fast.utils.amg import require_pycocotools

        require_pycocotools()
    info = resolve_model(args.model)
    ckpt = os.path.abspath(find_checkpoint(info, args.checkpoint))
    overrides(args.image_size)
    spec = ModelSpec(info.name, ckpt, args.image_size, args.fast)
    model_id = {"model": info.name, "checkpoint": file_identity(ckpt), "image_size": args.image_size,
                "fast": args.fast}
    if info.custom:  # your own YAML: an edited file is another model (official names keep their hashes)
        model_id["config"] = file_identity(info.config)
    records: Dict[int, Dict[str, Any]] = {}
    pending: List[Task] = []
    for e in read_manifest(args.manifest, out):
        if isinstance(e, BadLine):
            records[e.line] = _bad_record(e)
            continue
        e.kinds, e.dtype = kinds, args.dtype
        e.options = options_hash(e, model_id)
        marker = read_complete(e)
        if marker is not None:
            rec = record(e, "done", marker.get("worker"), marker["frames"], marker.get("seconds", 0.0))
            records[e.line] = {**rec, "skipped": True, "attempts": 0}
            continue
        failed = None if args.retry_failed else read_failed(e)
        if failed is not None:  # the same inputs failed before: say so again, do not redo it
            rec = record(e, "failed", failed.get("worker"), error=failed["error"])
            records[e.line] = {**rec, "skipped": True, "input_error": True, "attempts": 0}
            continue
        e.frames = work_frames(e, probe_frames(e.video))
        pending.append(e)
    _fault_hook(pending)
    done = sum(1 for r in records.values() if r.get("skipped") and r["status"] == "done")
    known = sum(1 for r in records.values() if r.get("skipped") and r["status"] == "failed")
    log(f"{len(records) + len(pending)} videos: {len(pending)} to track, {done} already done, "
        + (f"{known} failed before on their inputs (--retry-failed to try again), " if known else "")
        + f"{len(records) - done - known} unusable")
    return spec, records, pending


def _run_local(args, spec: ModelSpec, pending: List[Task], result: RunResult, log) -> None:
    from sam2_fast.batch.local_pool import LocalPool, cpu_threads, local_devices

    if args.device != "auto":
        pick_device(args.device)  # a clear error for a device this machine lacks
    devices = local_devices(args.device)
    n = args.workers or (len(devices) if devices[0].startswith("cuda") else 1)
    threads = args.threads or (cpu_threads(n) if devices[0] == "cpu" else None)
    log(f"local workers: {n} on {', '.join(devices[:n]) if len(devices) > 1 else devices[0]}"
        + (f", {threads} thread(s) each" if threads else ""))
    run_tasks(pending, LocalPool(spec, devices, threads), n, args.max_attempts, log, result)


def _run_ray(args, spec: ModelSpec, pending: List[Task], result: RunResult, log) -> None:
    from sam2_fast.batch import ray_pool

    ray = ray_pool.import_ray()
    started = ray_pool.connect(args.ray_address)
    try:
        p = ray_pool.cluster_plan(args.device, args.workers, args.threads)
        log(f"Ray cluster ({p['cluster']}): {p['workers']} actor(s), "
            + ("1 GPU each" if p["use_gpu"] else f"{p['cpus_per_actor']} CPU(s) each"))
        run_tasks(pending, ray_pool.RayPool(spec, p["use_gpu"], p["cpus_per_actor"]), p["workers"],
                  args.max_attempts, log, result)
    finally:
        if started:
            ray.shutdown()


def summarize(records: Dict[int, Dict[str, Any]], result: RunResult) -> Dict[str, Any]:
    recs = list(records.values())
    # a record "skipped" was done before, or failed before on the same inputs ("failed_before",
    # counted under "failed" too)
    tracked = [r for r in recs if r["status"] == "done" and not r.get("skipped")]
    frames = sum(r["frames"] for r in tracked)
    wall = result.wall
    per_worker = {w: {"videos": s.videos, "frames": s.frames, "seconds": round(s.seconds, 3),
                      "frames_per_s": round(s.frames / s.seconds, 3) if s.seconds else 0.0}
                  for w, s in sorted(result.workers.items())}
    return {"videos": len(recs), "done": sum(r["status"] == "done" for r in recs),
            "skipped": sum(bool(r.get("skipped")) and r["status"] == "done" for r in recs),
            "failed_before": sum(bool(r.get("skipped")) and r["status"] == "failed" for r in recs),
            "tracked": len(tracked),
            "failed": sum(r["status"] == "failed" for r in recs), "frames": frames, "seconds": round(wall, 3),
            "frames_per_s": round(frames / wall, 3) if wall else 0.0,
            "videos_per_hour": round(3600 * len(tracked) / wall, 1) if wall else 0.0,
            "worker_deaths": result.deaths,
            "startup_s": None if result.startup is None else round(result.startup, 3), "workers": per_worker}


def _write_status(out: str, records: Dict[int, Dict[str, Any]], summary: Dict[str, Any]) -> None:
    with O.atomic_path(os.path.join(out, "status.jsonl")) as tmp:
        with open(tmp, "w") as f:
            for line in sorted(records):
                f.write(json.dumps(records[line]) + "\n")
    O.write_json(os.path.join(out, "summary.json"), summary)


def run(args: argparse.Namespace, log=print) -> int:
    if args.workers is not None and args.workers < 1:
        raise CliError(f"--workers must be >= 1, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads must be >= 1, got {args.threads}")
    if args.max_attempts < 1:
        raise CliError(f"--max-attempts must be >= 1, got {args.max_attempts}")
    use_ray = bool(args.ray or args.ray_address)
    if use_ray:
        from sam2_fast.batch.ray_pool import import_ray

        import_ray()  # before any work: a missing extra is one clear line
    out = os.path.abspath(O.prepare_out_dir(args.out))
    spec, records, pending = plan(args, out, log)
    result = RunResult(records={})
    try:
        if pending:
            (_run_ray if use_ray else _run_local)(args, spec, pending, result, log)
    finally:  # an interrupted run still says what it finished
        records.update(result.records)
        summary = summarize(records, result)
        unfinished = sum(t.line not in result.records for t in pending)
        if unfinished:  # an interrupted or aborted run: not in status.jsonl; a rerun tracks them
            summary["unfinished"] = unfinished
            summary["videos"] += unfinished
        _write_status(out, records, summary)
    _log_summary(summary, out, log)
    return 1 if summary["failed"] else 0


def _log_summary(s: Dict[str, Any], out: str, log) -> None:
    before = f" ({s['failed_before']} known from an earlier run)" if s.get("failed_before") else ""
    log(f"{s['videos']} videos: {s['done']} done ({s['skipped']} already done), {s['failed']} failed{before}; "
        f"{s['frames']} frames tracked in {s['seconds']:.1f} s ({s['frames_per_s']:.2f} frames/s, "
        f"{s['videos_per_hour']:.0f} videos/hour)")
    for w, st in s["workers"].items():
        log(f"  {w}: {st['videos']} videos, {st['frames']} frames in {st['seconds']:.1f} s "
            f"({st['frames_per_s']:.2f} frames/s)")
    log(f"status: {out}/status.jsonl, summary: {out}/summary.json")
