"""``sam2-fast track``: prompt objects on some frames of a video and track them through it.

Outputs (``--save``, comma-separated): ``png`` per-frame indexed PNGs in the DAVIS layout
(``OUT/masks/00000.png``, pixel value = object id, DAVIS palette); ``overlay`` an mp4 of
the masks blended over the frames (``OUT/overlay.mp4``); ``rle`` COCO RLE JSON per frame
(``OUT/rle/00000.json``). Every file is written under a temporary name and moved into
place, so a killed run leaves only whole files: the frames it finished.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from sam2_fast.commands import outputs as O
from sam2_fast.commands.models import (CliError, add_model_args, find_checkpoint, load_model, overrides, pick_device,
                                       resolve_model)
from sam2_fast.commands.prompts import FramePrompt, load_mask_png, parse_video_prompts

SAVE_KINDS = ("png", "overlay", "rle")
EXAMPLES = """examples:
  sam2-fast track clip.mp4 --model large --point 0:1:210,350 --out out/
  sam2-fast track frames/ --model tiny --point 0:1:210,350 --point 0:1:250,220:0 \\
      --box 0:2:300,0,500,400 --save png,overlay,rle --out out/
  sam2-fast track clip.mp4 --model small --mask 40:1:first.png --start 40 --reverse --out back/
"""


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", help="a video file or a folder of JPEG frames")
    add_model_args(p)
    p.add_argument("--point", action="append", default=[], metavar="FRAME:OBJ:X,Y[:LABEL]",
                   help="a click on object OBJ (1..255) at pixel X,Y of frame FRAME; LABEL 1 (default) = "
                        "foreground, 0 = background; repeat for more clicks/objects")
    p.add_argument("--box", action="append", default=[], metavar="FRAME:OBJ:X0,Y0,X1,Y1", help="a box prompt")
    p.add_argument("--mask", action="append", default=[], metavar="FRAME:OBJ:PNG",
                   help="a mask prompt (non-zero pixels of the PNG)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--save", default="png", help=f"comma-separated outputs: {', '.join(SAVE_KINDS)} (default png)")
    p.add_argument("--start", type=int, default=None, help="first frame to track from (default: the first prompted frame; the last with --reverse)")
    p.add_argument("--max-frames", type=int, default=None, help="track at most this many frames after the start")
    p.add_argument("--reverse", action="store_true", help="track backwards in time")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast (CUDA)")
    p.add_argument("--fast", action="store_true", help="our fast runtime (bf16, compiled, CUDA graphs on CUDA)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def save_kinds(text: str) -> List[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in SAVE_KINDS]
    if bad or not kinds:
        raise CliError(f"--save {text!r}: choose from {', '.join(SAVE_KINDS)} (comma-separated)")
    return kinds


def _check_video(path: str) -> None:
    if path == "-" or "://" in path:
        raise CliError("live sources (stdin '-', camera or stream URLs) need the streaming tracker, which this "
                       "build does not have yet; record the stream to a file and track that")
    if not os.path.exists(path):
        raise CliError(f"video not found: {path}")


class FrameReader:
    """Original RGB frames for the overlay, decoded in the order the tracker yields them."""

    def __init__(self, video: str) -> None:
        from sam2_fast.video.frames_decode import open_decoder

        self.decoder = open_decoder(video)
        self.fps = 25.0
        if os.path.isfile(video):
            import av

            with av.open(video) as c:
                rate = c.streams.video[0].average_rate
                self.fps = float(rate) if rate else 25.0

    def __getitem__(self, idx: int) -> np.ndarray:
        last = None
        for i, raw in self.decoder.walk_to(idx):
            if i == idx:
                last = raw
        return np.asarray(self.decoder.to_pil(idx, last).convert("RGB"))

    def close(self) -> None:
        self.decoder.close()


def _add_prompts(predictor, state, prompts: Dict[Tuple[int, int], FramePrompt]) -> None:
    n = state["num_frames"]
    h, w = state["video_height"], state["video_width"]
    for (frame, obj), p in prompts.items():
        where = ", ".join(p.sources)
        if frame >= n:
            raise CliError(f"{where}: frame {frame} is past the end of the video ({n} frames, 0..{n - 1})")
        for (x, y) in p.points + ([p.box[:2], p.box[2:]] if p.box else []):
            if x > w or y > h:
                raise CliError(f"{where}: ({x:g}, {y:g}) lies outside the {w}x{h} frame")
        if p.mask_path:
            predictor.add_new_mask(state, frame, obj, load_mask_png(p.mask_path))
        else:
            predictor.add_new_points_or_box(
                state, frame, obj, points=np.asarray(p.points, np.float32) if p.points else None,
                labels=np.asarray(p.labels, np.int32) if p.points else None,
                box=np.asarray(p.box, np.float32) if p.box else None)


def _expected_frames(n: int, start: int, max_frames: Optional[int], reverse: bool) -> int:
    span = start + 1 if reverse else n - start
    return span if max_frames is None else min(span, max_frames + 1)


@dataclass
class TrackJob:
    """One video to track: what ``sam2-fast track`` takes besides the model (also one line
    of a ``track-many`` manifest)."""

    video: str
    prompts: Dict[Tuple[int, int], FramePrompt]
    out: str
    kinds: List[str] = field(default_factory=lambda: ["png"])
    start: Optional[int] = None
    max_frames: Optional[int] = None
    reverse: bool = False
    dtype: str = "fp32"
    progress: bool = True


@dataclass
class TrackResult:
    frames: List[int]  # frame indices written, in tracking order
    objects: List[int]
    seconds: float  # the frame loop (init_state and prompts excluded)
    interrupted: bool = False


def check_job(job: TrackJob) -> None:
    """What can be checked without the model: prompts, frame options, the video path."""
    if not job.prompts:
        raise CliError("no prompt given: add --point FRAME:OBJ:X,Y, --box FRAME:OBJ:X0,Y0,X1,Y1 "
                       "or --mask FRAME:OBJ:PNG")
    if job.max_frames is not None and job.max_frames < 0:
        raise CliError(f"--max-frames must be >= 0, got {job.max_frames}")
    if job.start is not None and job.start < 0:
        raise CliError(f"--start must be >= 0, got {job.start}")
    _check_video(job.video)
    if "rle" in job.kinds:
        from sam2_fast.utils.amg import require_pycocotools

        require_pycocotools()


def build_predictor(model: str, checkpoint: Optional[str], device, image_size: Optional[int], fast: bool):
    """The video predictor every front end tracks with (built once per process)."""
    info = resolve_model(model)
    ckpt = find_checkpoint(info, checkpoint)
    over = overrides(image_size)
    from sam2_fast.build_sam import build_sam2_video_predictor

    return load_model(build_sam2_video_predictor, info, ckpt, device=device, hydra_overrides_extra=over,
                      vos_optimized=fast)


def prepare_outputs(out: str, kinds: List[str]) -> str:
    out = O.prepare_out_dir(out)
    for sub, kind in (("masks", "png"), ("rle", "rle")):
        if kind in kinds:
            O.prepare_out_dir(os.path.join(out, sub))
    return out


def run(args: argparse.Namespace, log=print) -> int:
    kinds = save_kinds(args.save)
    job = TrackJob(args.video, parse_video_prompts(args.point, args.box, args.mask), args.out, kinds,
                   args.start, args.max_frames, args.reverse, args.dtype, not args.no_progress)
    check_job(job)
    info = resolve_model(args.model)
    find_checkpoint(info, args.checkpoint)
    device = pick_device(args.device)
    overrides(args.image_size)
    prepare_outputs(job.out, job.kinds)
    predictor = build_predictor(args.model, args.checkpoint, device, args.image_size, args.fast)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    res = track_video(predictor, job, device)
    out, done = job.out, res.frames
    if res.interrupted:
        if not done:
            raise CliError("interrupted before the first frame was written")
        step = -1 if job.reverse else 1
        log(f"interrupted: {len(done)} frames written to {out} (frames {done[0]}..{done[-1]}); "
            f"resume with --start {done[-1] + step}" + (" --reverse" if job.reverse else ""))
        return 130
    secs = res.seconds
    dev_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    host_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    wrote = ", ".join({"png": f"{out}/masks/", "overlay": f"{out}/overlay.mp4", "rle": f"{out}/rle/"}[k]
                      for k in job.kinds)
    log(f"tracked {len(done)} frames, {len(res.objects)} object(s) in {secs:.1f} s ({len(done) / max(secs, 1e-9):.2f} "
        f"frames/s); peak memory: device {'-' if dev_mib is None else f'{dev_mib:.0f} MiB'}, host {host_mib:.0f} MiB; "
        f"wrote {wrote}")
    return 0


def track_video(predictor, job: TrackJob, device,
                on_frame: Optional[Callable[[int, int], None]] = None) -> TrackResult:
    """Track ``job`` with an already built predictor and write its outputs (folders made by
    ``prepare_outputs``). ``on_frame(frame_idx, frames_done)`` runs after each frame's files
    are in place. Bad prompts raise ``CliError``; the predictor stays usable for the next job."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=job.dtype == "bf16")
    with torch.inference_mode(), autocast:
        state = predictor.init_state(job.video, keep_outputs="all" if job.reverse else "reachable")
        n = state["num_frames"]
        if job.start is not None and job.start >= n:
            raise CliError(f"--start {job.start} is past the end of the video ({n} frames)")
        _add_prompts(predictor, state, job.prompts)
        start = job.start if job.start is not None else (max if job.reverse else min)(f for f, _ in job.prompts)
        return _track(predictor, state, job, start, on_frame)


def _track(predictor, state, job: TrackJob, start: int, on_frame) -> TrackResult:
    from tqdm import tqdm

    from sam2_fast.video.propagate import propagate

    kinds, out = job.kinds, job.out
    n = state["num_frames"]
    h, w = state["video_height"], state["video_width"]
    reader = FrameReader(job.video) if "overlay" in kinds else None
    writer = O.OverlayWriter(os.path.join(out, "overlay.mp4"), reader.fps, w, h) if reader else None
    total = _expected_frames(n, start, job.max_frames, job.reverse)
    bar = tqdm(total=total, unit="frame", desc="track", disable=not job.progress, dynamic_ncols=True)
    done: List[int] = []
    obj_ids: List[int] = []
    t0 = time.perf_counter()
    try:
        for frame_idx, obj_ids, logits in propagate(predictor, state, start, job.max_frames, job.reverse,
                                                     progress=False):
            lg = logits[:, 0].float().cpu().numpy()  # (N, H, W)
            masks = lg > 0
            index = O.index_mask(masks, lg, obj_ids)
            if "png" in kinds:
                O.write_png(os.path.join(out, "masks", f"{frame_idx:05d}.png"), O.indexed_png(index))
            if "rle" in kinds:
                rles = O.coco_rles(masks)
                objs = [{"id": int(o), "segmentation": r, "area": int(m.sum()), "bbox": b}
                        for o, r, m, b in zip(obj_ids, rles, masks, O.mask_boxes(masks))]
                O.write_json(os.path.join(out, "rle", f"{frame_idx:05d}.json"),
                             {"frame": int(frame_idx), "height": h, "width": w, "objects": objs})
            if writer is not None:
                writer.add(O.blend(reader[frame_idx], index))
            done.append(frame_idx)
            bar.update(1)
            if on_frame is not None:
                on_frame(frame_idx, len(done))
    except KeyboardInterrupt:
        bar.close()
        if writer is not None:
            writer.close()
        return TrackResult(done, list(obj_ids), time.perf_counter() - t0, interrupted=True)
    except BaseException:
        bar.close()
        if writer is not None:
            writer.abort()
        raise
    finally:
        if reader is not None:
            reader.close()
    bar.close()
    if writer is not None:
        writer.close()
    return TrackResult(done, [int(o) for o in obj_ids], time.perf_counter() - t0)
