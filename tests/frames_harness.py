"""Shared helpers of the frame-source tests (test_frames.py, test_frame_feed.py): synthetic
videos and the reference's per-frame maths."""

from __future__ import annotations

import av
import numpy as np
import torch
from PIL import Image

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def expected_frame(rgb: np.ndarray, size: int) -> torch.Tensor:
    """The reference's per-frame maths (PIL resize, /255 in float64, float32 normalisation)."""
    arr = np.array(Image.fromarray(rgb).convert("RGB").resize((size, size))) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32)
    return (x - MEAN) / STD


def moving_frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(n, h, w, 3) uint8 smooth moving pattern plus noise (codecs keep it distinct)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = [np.stack([(xx * 5 + t * 7) % 256, (yy * 7 + t * 3) % 256, ((xx + yy + t) * 4) % 256], -1)
           for t in range(n)]
    noise = rng.integers(0, 24, (n, h, w, 3))
    return np.clip(np.stack(out) + noise, 0, 255).astype(np.uint8)


def write_video(path: str, frames: np.ndarray, codec: str = "libx264", gop: int = 6) -> None:
    opts = {"x264-params": "bframes=2:b-adapt=0"} if codec == "libx264" else {}
    c = av.open(path, "w")
    s = c.add_stream(codec, rate=10, options=opts)
    s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    s.codec_context.gop_size = gop
    for a in frames:
        for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()


def decode_all(path: str) -> list[np.ndarray]:
    with av.open(path) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def write_small_mp4(path: str) -> str:
    """40 frames of 32x48 H.264 with B-frames and a GOP of 9 (the modules' ``small_mp4``)."""
    write_video(path, moving_frames(40, 32, 48, seed=4), gop=9)
    return path
