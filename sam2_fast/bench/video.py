"""Videos for the benchmark: synthetic moving shapes, or frames decoded from a file.

The synthetic clip is deterministic (seeded), textured (so the image encoder sees
structure rather than flat colour) and holds ``objects`` coloured shapes that drift and
bounce; the click for each object is placed on its centre in frame 0.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

RESOLUTIONS = {
    "240p": (240, 426),
    "360p": (360, 640),
    "480p": (480, 854),
    "720p": (720, 1280),
    "1080p": (1080, 1920),
}


def parse_resolution(text: str) -> Tuple[int, int]:
    """'480p' or 'HxW' (e.g. '200x300') -> (height, width)."""
    key = text.strip().lower()
    if key in RESOLUTIONS:
        return RESOLUTIONS[key]
    if "x" in key:
        h, _, w = key.partition("x")
        if h.isdigit() and w.isdigit() and int(h) >= 16 and int(w) >= 16:
            return int(h), int(w)
    raise ValueError(f"bad resolution {text!r}: use one of {sorted(RESOLUTIONS)} or HxW such as 240x320")


@dataclass
class Clip:
    frames: List[np.ndarray]  # each (H, W, 3) uint8
    clicks: List[Tuple[float, float]]  # one (x, y) per object, in pixels of frame 0
    source: str

    @property
    def height(self) -> int:
        return int(self.frames[0].shape[0])

    @property
    def width(self) -> int:
        return int(self.frames[0].shape[1])


def synthetic_clip(num_frames: int, height: int, width: int, objects: int, seed: int = 0) -> Clip:
    if num_frames < 1 or objects < 1:
        raise ValueError(f"need at least one frame and one object, got frames={num_frames} objects={objects}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Low-frequency background texture: a few random plane waves per channel.
    bg = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        for _ in range(4):
            fx, fy = rng.uniform(-6, 6, size=2) * 2 * math.pi
            bg[..., c] += np.sin(fx * xx / width + fy * yy / height + rng.uniform(0, 6.28))
    bg = 90 + 25 * bg
    side = min(height, width)
    radius = rng.uniform(0.07, 0.13, size=objects) * side
    pos = np.stack([rng.uniform(0.2, 0.8, objects) * width, rng.uniform(0.2, 0.8, objects) * height], 1)
    vel = rng.uniform(-0.012, 0.012, size=(objects, 2)) * side
    colors = rng.uniform(150, 255, size=(objects, 3)) * rng.permutation([1.0, 0.55, 0.25])
    square = rng.random(objects) < 0.5
    frames, clicks = [], [(float(x), float(y)) for x, y in pos]
    for _ in range(num_frames):
        img = bg.copy()
        for k in range(objects):
            dx, dy = xx - pos[k, 0], yy - pos[k, 1]
            inside = (np.maximum(abs(dx), abs(dy)) if square[k] else np.hypot(dx, dy)) <= radius[k]
            img[inside] = colors[k] + 20 * np.sin(dx[inside] / 5.0)[:, None]
        noise = rng.normal(0, 4, size=img.shape).astype(np.float32)
        frames.append(np.clip(img + noise, 0, 255).astype(np.uint8))
        pos += vel
        for ax, lim in ((0, width), (1, height)):  # bounce off the borders
            out = (pos[:, ax] < radius) | (pos[:, ax] > lim - radius)
            vel[out, ax] *= -1
            pos[:, ax] = np.clip(pos[:, ax], radius, lim - radius)
    return Clip(frames, clicks, f"synthetic {height}x{width}, {objects} object(s), seed {seed}")


def load_clip(path: str, num_frames: int, objects: int, clicks: Sequence[Tuple[float, float]] = ()) -> Clip:
    """First ``num_frames`` frames of a video file (PyAV) or of a folder of JPEG frames."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"video not found: {path}")
    frames: List[np.ndarray] = []
    if os.path.isdir(path):
        from PIL import Image

        names = [n for n in os.listdir(path) if os.path.splitext(n)[1].lower() in (".jpg", ".jpeg")]
        if not names:
            raise ValueError(f"no JPEG frames in folder {path}")
        names.sort(key=lambda n: int(os.path.splitext(n)[0]) if os.path.splitext(n)[0].isdigit() else n)
        for n in names[:num_frames]:
            frames.append(np.asarray(Image.open(os.path.join(path, n)).convert("RGB")))
    else:
        import av

        with av.open(path) as container:
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) >= num_frames:
                    break
    if not frames:
        raise ValueError(f"no frames decoded from {path}")
    h, w = frames[0].shape[:2]
    if clicks:
        if len(clicks) != objects:
            raise ValueError(f"{len(clicks)} click(s) given for {objects} object(s)")
        pts = [tuple(map(float, c)) for c in clicks]
    else:
        # No clicks given: spread them on a grid over the centre of the frame.
        cols = math.ceil(math.sqrt(objects))
        rows = math.ceil(objects / cols)
        pts = [(w * (0.25 + 0.5 * (i % cols + 0.5) / cols), h * (0.25 + 0.5 * (i // cols + 0.5) / rows)) for i in range(objects)]
    return Clip(frames, pts, f"{os.path.basename(path)} {h}x{w}, first {len(frames)} frames")
