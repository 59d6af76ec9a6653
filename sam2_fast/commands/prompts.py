"""Parsing prompt options: ``FRAME:OBJ:X,Y[:LABEL]``, ``FRAME:OBJ:X0,Y0,X1,Y1``,
``FRAME:OBJ:PNG`` (track) and ``X,Y[:LABEL]``, ``X0,Y0,X1,Y1`` (segment).

Every malformed value is rejected with the option, the value and the expected form.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from sam2_fast.commands.models import CliError

MAX_OBJ_ID = 255  # one palette index per object in the PNG outputs


def _numbers(text: str, count: int, what: str, form: str, full: Optional[str] = None) -> List[float]:
    parts = text.split(",")
    text = full or text  # the whole option value, for the message
    if len(parts) != count:
        raise CliError(f"{what} {text!r}: expected {form}")
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise CliError(f"{what} {text!r}: expected numbers in {form}") from None
    if not all(math.isfinite(v) for v in vals):
        raise CliError(f"{what} {text!r}: coordinates must be finite numbers")
    if any(v < 0 for v in vals):
        raise CliError(f"{what} {text!r}: coordinates must be >= 0 (pixels from the top-left corner)")
    return vals


def _label(text: str, what: str, full: str) -> int:
    if text not in ("0", "1"):
        raise CliError(f"{what} {full!r}: the label must be 1 (foreground) or 0 (background), got {text!r}")
    return int(text)


def _frame_obj(parts: Sequence[str], what: str, full: str, form: str) -> Tuple[int, int]:
    try:
        frame, obj = int(parts[0]), int(parts[1])
    except ValueError:
        raise CliError(f"{what} {full!r}: expected {form} with integer FRAME and OBJ") from None
    if frame < 0:
        raise CliError(f"{what} {full!r}: FRAME must be >= 0")
    if not 1 <= obj <= MAX_OBJ_ID:
        raise CliError(f"{what} {full!r}: OBJ must be an object id in 1..{MAX_OBJ_ID}")
    return frame, obj


def parse_image_point(text: str) -> Tuple[float, float, int]:
    """``X,Y[:LABEL]`` -> (x, y, label)."""
    form = "X,Y or X,Y:LABEL (e.g. 210,350 or 210,350:0)"
    xy, _, lab = text.partition(":")
    x, y = _numbers(xy, 2, "--point", form)
    return x, y, _label(lab, "--point", text) if lab else 1


def parse_image_box(text: str) -> Tuple[float, float, float, float]:
    form = "X0,Y0,X1,Y1 (e.g. 10,20,200,180)"
    x0, y0, x1, y1 = _numbers(text, 4, "--box", form)
    if x1 < x0 or y1 < y0:
        raise CliError(f"--box {text!r}: need X0 <= X1 and Y0 <= Y1 ({form})")
    return x0, y0, x1, y1


@dataclass
class FramePrompt:
    """Everything given for one object on one frame."""

    points: List[Tuple[float, float]] = field(default_factory=list)
    labels: List[int] = field(default_factory=list)
    box: Optional[Tuple[float, float, float, float]] = None
    mask_path: Optional[str] = None
    sources: List[str] = field(default_factory=list)  # the option texts, for error messages


def parse_video_prompts(points: Sequence[str], boxes: Sequence[str], masks: Sequence[str]
                        ) -> Dict[Tuple[int, int], FramePrompt]:
    """The track options -> {(frame, obj): FramePrompt}, in (frame, obj) order."""
    out: Dict[Tuple[int, int], FramePrompt] = {}
    pform = "FRAME:OBJ:X,Y or FRAME:OBJ:X,Y:LABEL (e.g. 0:1:210,350)"
    for text in points:
        parts = text.split(":")
        if len(parts) not in (3, 4):
            raise CliError(f"--point {text!r}: expected {pform}")
        key = _frame_obj(parts, "--point", text, pform)
        x, y = _numbers(parts[2], 2, "--point", pform, text)
        p = out.setdefault(key, FramePrompt())
        p.points.append((x, y))
        p.labels.append(_label(parts[3], "--point", text) if len(parts) == 4 else 1)
        p.sources.append(f"--point {text}")
    bform = "FRAME:OBJ:X0,Y0,X1,Y1 (e.g. 0:1:10,20,200,180)"
    for text in boxes:
        parts = text.split(":")
        if len(parts) != 3:
            raise CliError(f"--box {text!r}: expected {bform}")
        key = _frame_obj(parts, "--box", text, bform)
        box = tuple(_numbers(parts[2], 4, "--box", bform, text))
        if box[2] < box[0] or box[3] < box[1]:
            raise CliError(f"--box {text!r}: need X0 <= X1 and Y0 <= Y1")
        p = out.setdefault(key, FramePrompt())
        if p.box is not None:
            raise CliError(f"--box {text!r}: object {key[1]} already has a box on frame {key[0]}")
        p.box = box  # type: ignore[assignment]
        p.sources.append(f"--box {text}")
    mform = "FRAME:OBJ:PNG (e.g. 0:1:mask.png)"
    for text in masks:
        parts = text.split(":", 2)
        if len(parts) != 3 or not parts[2]:
            raise CliError(f"--mask {text!r}: expected {mform}")
        key = _frame_obj(parts, "--mask", text, mform)
        if not os.path.isfile(parts[2]):
            raise CliError(f"--mask {text!r}: mask file not found: {parts[2]}")
        p = out.setdefault(key, FramePrompt())
        if p.points or p.box is not None:
            raise CliError(f"--mask {text!r}: object {key[1]} on frame {key[0]} also has clicks or a box; "
                           "give a mask or clicks/box for one object on one frame, not both")
        p.mask_path = parts[2]
        p.sources.append(f"--mask {text}")
    return dict(sorted(out.items()))


def load_mask_png(path: str) -> np.ndarray:
    """A mask PNG -> (H, W) bool (non-zero pixels; palette PNGs by index)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise CliError(f"cannot read mask {path}: {exc}") from None
    if arr.ndim == 3:
        arr = arr[..., :3].max(-1)
    return arr != 0
