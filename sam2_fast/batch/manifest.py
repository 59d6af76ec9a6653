"""The ``track-many`` manifest: JSON Lines, one video per line::

    {"video": "a.mp4", "prompts": [{"frame": 0, "obj": 1, "points": [[210, 350]], "labels": [1]},
                                   {"frame": 0, "obj": 2, "box": [300, 0, 500, 400]}], "reverse": false}

Optional fields: ``start``, ``max_frames`` (as ``sam2-fast track``), ``id`` (the output
folder's name; default the video's file name without its extension), and per prompt
``mask`` (a PNG path) instead of clicks or a box. Relative paths are relative to the
manifest's folder, so a data set and its manifest can move together.

A line that cannot be used (bad JSON, an unknown field, a malformed prompt, a missing
video, a name another line already took) becomes a failed status record for that line
only; the other lines still run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from sam2_fast.commands.models import CliError
from sam2_fast.commands.prompts import MAX_OBJ_ID, FramePrompt

LINE_FIELDS = ("video", "prompts", "reverse", "start", "max_frames", "id")
PROMPT_FIELDS = ("frame", "obj", "points", "labels", "box", "mask")
RESERVED_NAMES = ("status.jsonl", "summary.json")


class ManifestError(ValueError):
    """One manifest line is unusable; the message names the field."""


@dataclass
class Task:
    """One video to track, as sent to a worker (pickled: keep it small)."""

    line: int  # 1-based line of the manifest
    name: str  # output folder name under --out
    video: str  # absolute path
    prompts: Dict[Tuple[int, int], FramePrompt]
    out: str  # OUT/name
    start: Optional[int] = None
    max_frames: Optional[int] = None
    reverse: bool = False
    kinds: List[str] = field(default_factory=lambda: ["png"])
    dtype: str = "fp32"
    frames: int = 0  # frames it will track (probed; 0 = unknown): the scheduling weight
    options: str = ""  # hash of everything that decides the outputs (see options_hash)
    fault: Optional[str] = None  # test hook: a flag file; see worker.maybe_fault


@dataclass
class BadLine:
    line: int
    error: str
    video: Optional[str] = None
    name: Optional[str] = None


Entry = Union[Task, BadLine]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _coords(v: Any, count: int, what: str, form: str) -> List[float]:
    if not isinstance(v, (list, tuple)) or len(v) != count:
        raise ManifestError(f"{what} must be {form}, got {json.dumps(v)}")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise ManifestError(f"{what} must be {form} (numbers), got {json.dumps(v)}")
    vals = [float(x) for x in v]
    if not all(math.isfinite(x) for x in vals) or any(x < 0 for x in vals):
        raise ManifestError(f"{what} {json.dumps(v)}: coordinates must be finite and >= 0 (pixels from the top-left)")
    return vals


def _path(value: Any, what: str, base_dir: str) -> str:
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{what} must be a path (a non-empty string), got {json.dumps(value)}")
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))


def parse_prompts(items: Any, base_dir: str) -> Dict[Tuple[int, int], FramePrompt]:
    """The ``prompts`` list -> {(frame, obj): FramePrompt}, as ``track``'s options give."""
    if not isinstance(items, list) or not items:
        raise ManifestError('"prompts" must be a non-empty list of {"frame", "obj", "points"/"box"/"mask"}')
    out: Dict[Tuple[int, int], FramePrompt] = {}
    for i, p in enumerate(items):
        where = f"prompts[{i}]"
        if not isinstance(p, dict):
            raise ManifestError(f"{where} must be an object, got {json.dumps(p)}")
        unknown = sorted(set(p) - set(PROMPT_FIELDS))
        if unknown:
            raise ManifestError(f"{where}: unknown field {unknown[0]!r}; fields: {', '.join(PROMPT_FIELDS)}")
        frame, obj = p.get("frame"), p.get("obj")
        if not _is_int(frame) or frame < 0:
            raise ManifestError(f"{where}.frame must be an integer >= 0, got {json.dumps(frame)}")
        if not _is_int(obj) or not 1 <= obj <= MAX_OBJ_ID:
            raise ManifestError(f"{where}.obj must be an object id in 1..{MAX_OBJ_ID}, got {json.dumps(obj)}")
        if not any(k in p for k in ("points", "box", "mask")):
            raise ManifestError(f"{where}: give \"points\" (with \"labels\"), \"box\" or \"mask\"")
        fp = out.setdefault((frame, obj), FramePrompt())
        if "points" in p:
            pts = p["points"]
            if not isinstance(pts, list) or not pts:
                raise ManifestError(f"{where}.points must be a non-empty list of [x, y], got {json.dumps(pts)}")
            xy = [tuple(_coords(q, 2, f"{where}.points[{k}]", "[x, y]")) for k, q in enumerate(pts)]
            labels = p.get("labels", [1] * len(xy))  # as track: a click is foreground unless labelled 0
            if not isinstance(labels, list) or len(labels) != len(xy) or any(l not in (0, 1) or isinstance(l, bool)
                                                                             for l in labels):
                raise ManifestError(f"{where}.labels must be one 1 (foreground) or 0 (background) per point, "
                                    f"got {json.dumps(labels)} for {len(xy)} point(s)")
            fp.points += xy  # type: ignore[arg-type]
            fp.labels += labels
        elif "labels" in p:
            raise ManifestError(f"{where}: \"labels\" without \"points\"")
        if "box" in p:
            box = _coords(p["box"], 4, f"{where}.box", "[x0, y0, x1, y1]")
            if box[2] < box[0] or box[3] < box[1]:
                raise ManifestError(f"{where}.box {json.dumps(p['box'])}: need x0 <= x1 and y0 <= y1")
            if fp.box is not None:
                raise ManifestError(f"{where}: object {obj} already has a box on frame {frame}")
            fp.box = tuple(box)  # type: ignore[assignment]
        if "mask" in p:
            path = _path(p["mask"], f"{where}.mask", base_dir)
            if not os.path.isfile(path):
                raise ManifestError(f"{where}.mask: mask file not found: {path}")
            if fp.points or fp.box is not None:
                raise ManifestError(f"{where}: object {obj} on frame {frame} has a mask and clicks or a box; give one")
            fp.mask_path = path
        fp.sources.append(where)
    return dict(sorted(out.items()))


def _opt_int(d: Dict[str, Any], key: str) -> Optional[int]:
    v = d.get(key)
    if v is not None and (not _is_int(v) or v < 0):
        raise ManifestError(f'"{key}" must be an integer >= 0 or null, got {json.dumps(v)}')
    return v


def _name(d: Dict[str, Any], video: str) -> str:
    name = d.get("id")
    if name is None:
        name = os.path.splitext(os.path.basename(video.rstrip(os.sep)))[0]
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or os.sep in name:
        raise ManifestError(f'"id" must be a folder name (no "/", not starting with "."), got {json.dumps(name)}')
    if name in RESERVED_NAMES:
        raise ManifestError(f'the output name {name!r} is reserved for the run\'s own files; give the line an "id"')
    return name


def parse_line(text: str, line: int, base_dir: str, out_dir: str) -> Task:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(d, dict):
        raise ManifestError(f'expected an object {{"video": ..., "prompts": [...]}}, got {type(d).__name__}')
    unknown = sorted(set(d) - set(LINE_FIELDS))
    if unknown:
        raise ManifestError(f"unknown field {unknown[0]!r}; fields: {', '.join(LINE_FIELDS)}")
    if "video" not in d:
        raise ManifestError('no "video" field')
    video = _path(d["video"], '"video"', base_dir)
    name = _name(d, video)
    reverse = d.get("reverse", False)
    if not isinstance(reverse, bool):
        raise ManifestError(f'"reverse" must be true or false, got {json.dumps(reverse)}')
    task = Task(line, name, video, {}, os.path.join(out_dir, name), _opt_int(d, "start"), _opt_int(d, "max_frames"),
                reverse)
    task.prompts = parse_prompts(d.get("prompts"), base_dir)
    if not os.path.exists(video):
        raise ManifestError(f"video not found: {video}")
    return task


def read_manifest(path: str, out_dir: str) -> List[Entry]:
    """Every non-blank line -> a Task or a BadLine (with its reason)."""
    if not os.path.isfile(path):
        raise CliError(f"manifest not found: {path}" if not os.path.isdir(path) else f"manifest {path} is a folder")
    base_dir = os.path.dirname(os.path.abspath(path))
    entries: List[Entry] = []
    names: Dict[str, int] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                task = parse_line(text, line, base_dir, out_dir)
                if task.name in names:
                    raise ManifestError(f"output name {task.name!r} is already used by line {names[task.name]}; "
                                        f'give this line an "id"')
            except ManifestError as exc:
                video = _peek_video(text, base_dir)
                entries.append(BadLine(line, f"manifest line {line}: {exc}", video))
                continue
            names[task.name] = line
            entries.append(task)
    if not entries:
        raise CliError(f"manifest {path} has no lines "
                       '(JSON Lines: one {"video": ..., "prompts": [...]} per line)')
    return entries


def _peek_video(text: str, base_dir: str) -> Optional[str]:
    try:
        v = json.loads(text).get("video")
        return os.path.normpath(os.path.join(base_dir, v)) if isinstance(v, str) else None
    except Exception:  # noqa: BLE001 - only for the record of a line that is already bad
        return None


# ---------------------------------------------------------------------------- probing and hashing
def probe_frames(video: str) -> int:
    """The video's frame count, cheaply (container metadata or a listing; 0 if unknown).
    Only orders the work (longest first); the worker's decoder is the authority."""
    try:
        if os.path.isdir(video):
            from sam2_fast.video.frames_decode import JPEG_EXTS

            return sum(1 for n in os.listdir(video) if os.path.splitext(n)[1].lower() in JPEG_EXTS)
        import av

        with av.open(video) as c:
            s = c.streams.video[0]
            if s.frames:
                return int(s.frames)
            if s.duration and s.time_base and s.average_rate:
                return int(float(s.duration * s.time_base) * float(s.average_rate))
    except Exception:  # noqa: BLE001 - an unreadable video fails in its worker, with the decoder's reason
        return 0
    return 0


def work_frames(task: Task, n: int) -> int:
    """Frames ``task`` will track in a video of ``n`` frames (as ``track`` counts them)."""
    from sam2_fast.commands.track import _expected_frames

    if n <= 0:
        return 0
    first = (max if task.reverse else min)(f for f, _ in task.prompts)
    start = task.start if task.start is not None else first
    return max(0, _expected_frames(n, min(start, n - 1), task.max_frames, task.reverse))


def file_identity(path: str) -> List[Any]:
    """What identifies a file's contents cheaply: its size and a hash of its first and last
    MiB. A torch checkpoint is a zip whose central directory (at the end) holds a CRC-32 of
    every tensor record, so the tail changes whenever any weight does; reading 2 MiB instead
    of the whole 150-900 MB file keeps a rerun's start instant."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return [st.st_size, h.hexdigest()[:16]]


def video_identity(video: str) -> List[Any]:
    """The video's name and size (a JPEG folder: its name, frame count and bytes), not its
    path: a data set moved or mounted elsewhere (with its manifest) is still done."""
    name = os.path.basename(os.path.normpath(video))
    if os.path.isfile(video):
        return [name, os.path.getsize(video)]
    with os.scandir(video) as it:
        sizes = [e.stat().st_size for e in it if e.is_file()]
    return [name, len(sizes), sum(sizes)]


def options_hash(task: Task, model: Dict[str, Any]) -> str:
    """A hash of everything that decides a video's outputs: the video (name and size, see
    ``video_identity``), its prompts and frame options, the outputs asked for, and the model
    (name, checkpoint identity, image size, dtype, runtime). The device is left out on
    purpose: moving a half-done run from one GPU type to another should not redo the
    finished videos."""
    prompts = [[f, o, p.points, p.labels, p.box, p.mask_path and file_identity(p.mask_path)]
               for (f, o), p in task.prompts.items()]
    spec = {"video": video_identity(task.video), "prompts": prompts, "start": task.start,
            "max_frames": task.max_frames, "reverse": task.reverse, "kinds": sorted(task.kinds),
            "dtype": task.dtype, "model": model}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=list).encode()).hexdigest()[:32]
