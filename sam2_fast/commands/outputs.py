"""What the commands write, each file atomically (a temporary name in the same folder,
then ``os.replace``): indexed PNGs in the DAVIS layout, COCO RLE JSON, an overlay video."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
from PIL import Image

from sam2_fast.commands.models import CliError


def davis_palette() -> List[int]:
    """The DAVIS / PASCAL VOC palette (index i -> colour), flat [r, g, b] * 256."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


PALETTE = davis_palette()


def prepare_out_dir(path: str) -> str:
    """Create the output folder (and parents); fail clearly if it is a file or not writable."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"output folder {path} exists and is a file")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise CliError(f"cannot write to the output folder {path}: {exc.strerror or exc}") from None
    return path


def prepare_out_file(path: str) -> str:
    """The parent folder of an output file must exist (created) and be writable."""
    if os.path.isdir(path):
        raise CliError(f"output {path} is a folder; give a file name")
    prepare_out_dir(os.path.dirname(os.path.abspath(path)))
    return path


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """A temporary path next to ``path``, moved onto it if the block succeeds, removed if not."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=suffix + ".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_png(path: str, image: Image.Image) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write_json(path: str, obj: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f)


def index_mask(masks: np.ndarray, logits: Optional[np.ndarray], obj_ids: Sequence[int]) -> np.ndarray:
    """(N, H, W) bool masks -> (H, W) uint8 palette indices (the object id; 0 = background).
    Where objects overlap, the one with the larger logit wins."""
    h, w = masks.shape[-2:]
    out = np.zeros((h, w), np.uint8)
    if len(obj_ids) == 0:
        return out
    score = np.where(masks, logits if logits is not None else 1.0, -np.inf)  # (N, H, W)
    best = score.argmax(0)
    any_fg = masks.any(0)
    ids = np.asarray(obj_ids, dtype=np.uint8)
    out[any_fg] = ids[best[any_fg]]
    return out


def indexed_png(index: np.ndarray) -> Image.Image:
    img = Image.fromarray(index, mode="P")
    img.putpalette(PALETTE)
    return img


def coco_rles(masks: np.ndarray) -> List[Dict[str, Any]]:
    """(N, H, W) bool -> COCO compressed RLEs (column-major, counts as str for JSON)."""
    from sam2_fast.utils.amg import require_pycocotools

    mask_utils = require_pycocotools()
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def mask_boxes(masks: np.ndarray) -> List[List[int]]:
    """(N, H, W) bool -> XYWH boxes (inclusive pixel extents; [0, 0, 0, 0] when empty)."""
    out = []
    for m in masks:
        ys, xs = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        out.append([0, 0, 0, 0] if len(xs) == 0 else
                   [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)])
    return out


def blend(frame: np.ndarray, index: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Masks (palette colours) blended over an RGB frame."""
    colors = np.asarray(PALETTE, np.float32).reshape(256, 3)[index]  # (H, W, 3)
    fg = (index > 0)[..., None]
    out = np.where(fg, frame * (1 - alpha) + colors * alpha, frame)
    return np.clip(out, 0, 255).astype(np.uint8)


class OverlayWriter:
    """An mp4 (H.264 where PyAV has it) written to a temporary name and moved into place on
    ``close``; ``abort`` removes it."""

    def __init__(self, path: str, fps: float, width: int, height: int) -> None:
        import av

        self.path = path
        folder = os.path.dirname(os.path.abspath(path))
        fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        os.close(fd)
        self.container = av.open(self.tmp, "w", format="mp4")
        rate = max(1, int(round(fps or 25)))
        if "libx264" in av.codecs_available:
            self.stream = self.container.add_stream("libx264", rate=rate)
            # 4:2:0 needs even sides; 4:4:4 encodes any size (fewer players decode it)
            self.stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        else:
            self.stream = self.container.add_stream("mpeg4", rate=rate)
            self.stream.pix_fmt = "yuv420p"
        self.stream.width, self.stream.height = width, height
        self.frames = 0

    def add(self, rgb: np.ndarray) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.container.close()
        with contextlib.suppress(OSError):
            os.remove(self.tmp)
