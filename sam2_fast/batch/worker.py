"""One worker: builds the model once, then tracks task after task with ``track_video`` (the
code of ``sam2-fast track``) and writes each video's outputs and completion marker itself,
so only a small status record goes back to the driver.

A video's folder is complete when its marker ``done.json`` (written last, atomically)
carries the options hash of the current run and the frame count matches the files on
disk; anything else (no marker, another hash, missing files) is partial and is cleared
and redone.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from sam2_fast.batch.manifest import Task
from sam2_fast.commands import outputs as O

MARKER = "done.json"
MARKER_VERSION = 1
# A video whose inputs cannot work (a prompt past the end, an undecodable file) gets this
# marker instead: a rerun with the same options reports the failure again without
# re-decoding the video (``--retry-failed`` tries it anyway). Worker deaths and device
# out-of-memory are not written here: another machine or a rerun may pass.
FAILED_MARKER = "failed.json"
# The test hook that kills a worker mid-video: NAME=FLAGFILE. The worker tracking video NAME
# exits the process (os._exit, as a kill or the OOM killer would end it) after writing its
# first frame, unless FLAGFILE exists; it creates FLAGFILE first, so only the first try dies.
FAULT_ENV = "SAM2_FAST_FAULT_EXIT_ONCE"
FAULT_EXIT_CODE = 70


@dataclass(frozen=True)
class ModelSpec:
    """What every worker builds its model from (the CLI's model options)."""

    model: str
    checkpoint: Optional[str]
    image_size: Optional[int]
    fast: bool = False


def describe_error(exc: BaseException) -> str:
    """One line, as the CLI prints errors: known user errors bare, others with their type."""
    from sam2_fast.checkpoint import CheckpointError
    from sam2_fast.cli import _one_line
    from sam2_fast.commands.models import CliError
    from sam2_fast.config import ConfigError

    known = (CliError, CheckpointError, ConfigError, ValueError, FileNotFoundError, PermissionError, ImportError)
    return ("" if isinstance(exc, known) else f"{type(exc).__name__}: ") + _one_line(exc)


# ---------------------------------------------------------------------------- markers
def _count(folder: str, ext: str) -> int:
    try:
        return sum(1 for n in os.listdir(folder) if n.endswith(ext) and not n.startswith("."))
    except OSError:
        return -1


def _read_marker(task: Task, name: str) -> Optional[Dict[str, Any]]:
    """Marker ``name`` of the task's folder if it was written for the current options."""
    try:
        with open(os.path.join(task.out, name)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("version") != MARKER_VERSION or marker.get("options") != task.options:
        return None
    return marker


def read_complete(task: Task) -> Optional[Dict[str, Any]]:
    """The marker of a finished video whose outputs are all there, else None."""
    marker = _read_marker(task, MARKER)
    if marker is None:
        return None
    n = marker.get("frames")
    if "png" in task.kinds and _count(os.path.join(task.out, "masks"), ".png") != n:
        return None
    if "rle" in task.kinds and _count(os.path.join(task.out, "rle"), ".json") != n:
        return None
    if "overlay" in task.kinds and not os.path.isfile(os.path.join(task.out, "overlay.mp4")):
        return None
    return marker


def read_failed(task: Task) -> Optional[Dict[str, Any]]:
    """The marker of a video that failed on its inputs with the current options, else None."""
    marker = _read_marker(task, FAILED_MARKER)
    return marker if marker is not None and isinstance(marker.get("error"), str) else None


def is_input_error(exc: BaseException) -> bool:
    """Would the same inputs fail the same way again? (user errors, bad or undecodable videos,
    prompts that do not fit the video; ``FrameSourceError`` is a ValueError)."""
    from sam2_fast.commands.models import CliError

    return isinstance(exc, (CliError, ValueError))


def clear_partial(out: str) -> None:
    """Remove what a previous, unfinished try left (only the files track writes, and the
    temporary files of a try that was killed mid-write)."""
    try:
        names = os.listdir(out)
    except OSError:
        return
    for name in names:
        if name in (MARKER, FAILED_MARKER, "overlay.mp4") or (name.startswith(".") and name.endswith(".tmp")):
            os.remove(os.path.join(out, name))
    for sub in ("masks", "rle"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)


def maybe_fault(task: Task, frames_done: int) -> None:
    if task.fault and frames_done == 1:
        try:
            fd = os.open(task.fault, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(FAULT_EXIT_CODE)


def record(task: Task, status: str, worker: str, frames: int = 0, seconds: float = 0.0,
           error: Optional[str] = None, retry: bool = False) -> Dict[str, Any]:
    """The per-video status record (JSON-ready)."""
    rec: Dict[str, Any] = {"line": task.line, "name": task.name, "video": task.video, "out": task.out,
                           "status": status, "frames": frames, "seconds": round(seconds, 3), "worker": worker}
    if error is not None:
        rec["error"] = error
    if retry:
        rec["retry"] = True
    return rec


# ---------------------------------------------------------------------------- the worker
class Worker:
    """A model built once on ``device``; ``process`` tracks one task and never raises."""

    def __init__(self, spec: ModelSpec, wid: str, device: str = "cpu", threads: Optional[int] = None) -> None:
        import torch

        from sam2_fast.commands.models import pick_device
        from sam2_fast.commands.track import build_predictor

        self.wid = wid
        if threads:
            torch.set_num_threads(threads)  # N CPU workers x all cores each would oversubscribe
        self.device = pick_device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # so code that says plain "cuda" means this worker's GPU too
        self.predictor = build_predictor(spec.model, spec.checkpoint, self.device, spec.image_size, spec.fast)

    def process(self, task: Task) -> Dict[str, Any]:
        from sam2_fast.commands.track import TrackJob, prepare_outputs, track_video

        t0 = time.perf_counter()
        try:
            clear_partial(task.out)
            prepare_outputs(task.out, task.kinds)
            job = TrackJob(task.video, task.prompts, task.out, task.kinds, task.start, task.max_frames,
                           task.reverse, task.dtype, progress=False)
            res = track_video(self.predictor, job, self.device, on_frame=lambda _f, k: maybe_fault(task, k))
            if res.interrupted:
                raise KeyboardInterrupt
            secs = time.perf_counter() - t0
            frames: List[int] = res.frames
            O.write_json(os.path.join(task.out, MARKER), {
                "version": MARKER_VERSION, "options": task.options, "frames": len(frames),
                "first": frames[0] if frames else None, "last": frames[-1] if frames else None,
                "objects": res.objects, "kinds": task.kinds, "seconds": round(secs, 3), "worker": self.wid,
                "video": task.video})
            return record(task, "done", self.wid, len(frames), secs)
        except Exception as exc:  # noqa: BLE001 - one video's failure is its record, the worker goes on
            _remove_empty(task.out)  # frames it wrote stay (as with track); empty folders go
            retry = _is_device_oom(exc)
            if retry:
                _free_device_memory(self.device)
            error = describe_error(exc)
            rec = record(task, "failed", self.wid, seconds=time.perf_counter() - t0, error=error, retry=retry)
            if not retry and is_input_error(exc):
                rec["input_error"] = True
                _write_failed(task, error, self.wid)
            return rec


def _write_failed(task: Task, error: str, wid: str) -> None:
    try:
        os.makedirs(task.out, exist_ok=True)
        O.write_json(os.path.join(task.out, FAILED_MARKER), {
            "version": MARKER_VERSION, "options": task.options, "error": error, "worker": wid,
            "video": task.video})
    except OSError:  # the record still says why; a rerun then simply tries again
        pass


def _remove_empty(out: str) -> None:
    for folder in (os.path.join(out, "masks"), os.path.join(out, "rle"), out):
        try:
            os.rmdir(folder)  # only succeeds when empty
        except OSError:
            pass


def _is_device_oom(exc: BaseException) -> bool:
    # a device out-of-memory may pass on another worker (less fragmented, or a smaller neighbour)
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def _free_device_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
