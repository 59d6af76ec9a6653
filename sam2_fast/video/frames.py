"""Video frame sources for the video predictor: lazy, bounded, and numerically the reference.

``open_frames(video_path, image_size, device)`` accepts a folder of JPEG frames (ordered by the
integer in the file name), a video file (.mp4/.mov/.avi/.webm/.mkv, or its bytes; decoded with
PyAV) or in-memory frames (an (N, H, W, C) uint8 array or a sequence of HWC uint8 frames).
``src[idx]`` is the model input of frame ``idx``: float32 (3, S, S), ImageNet-normalised, on the
compute device (on the CPU when ``offload_video_to_cpu``).

Preprocessing is the reference's JPEG path for every source: the uint8 RGB frame goes through
``PIL.Image.resize((S, S))`` (PIL's default filter), then ``/255``, ``-mean``, ``/std`` in
float32: bitwise the reference's tensor. Off the CPU the last three steps are a 256-entry
table per channel built with those float ops (a CUDA ``x / 255.`` multiplies by the
reciprocal and can differ in the last bit), so GPU frames are bitwise equal too.

Memory stays flat as the video grows (``LazyFrames``, the default): a small cache of resized
uint8 frames around the access point, filled ahead in the direction of travel by background
threads (see ``frames_lazy``); the frame after the one asked for is normalised (CPU) or
uploaded through pinned memory (CUDA) ahead, off the tracker's path (``frames_feed``).
``preload_all=True`` keeps every normalised frame resident instead, as the reference does
(``PreloadedFrames``, for benchmarks).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Sequence

import numpy as np
import torch

from sam2_fast.utils.transforms import IMAGENET_MEAN, IMAGENET_STD
from sam2_fast.video.frames_base import FrameSource, close_at_exit, normalize_lut
from sam2_fast.video.frames_decode import Decoder, open_decoder
from sam2_fast.video.frames_errors import FrameIndexError, FrameSourceError, VideoNotFoundError
from sam2_fast.video.frames_lazy import LazyFrames

__all__ = [
    "FrameSource",
    "LazyFrames",
    "PreloadedFrames",
    "open_frames",
    "normalize_lut",
    "FrameSourceError",
    "FrameIndexError",
    "VideoNotFoundError",
]



class PreloadedFrames(FrameSource):
    """Every frame normalised and resident, as the reference keeps them (for benchmarks).

    With ``async_loading`` frame 0 is loaded on open and the rest by a background thread;
    asking for a frame the thread has not reached yet decodes it on the spot.
    """

    def __init__(self, decoder: Decoder, image_size: int, device: torch.device,
                 mean: Sequence[float], std: Sequence[float], async_loading: bool = False) -> None:
        super().__init__(decoder, image_size, device, mean, std)
        self._frames: list[torch.Tensor | None] = [None] * len(self)
        self._fill_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._load(0)
        if async_loading:
            self._thread = threading.Thread(target=self._load_rest, kwargs={"quiet": True},
                                            daemon=True, name="sam2_fast-preload")
            self._thread.start()
            close_at_exit(self, self._thread)
        else:
            self._load_rest(quiet=False)

    def _load(self, i: int) -> torch.Tensor:
        with self._fill_lock:  # in order with the loader thread: a video decodes forward once
            frame = self._frames[i]
            if frame is None:
                frame = self.normalize(self.load_u8(i))
                self._frames[i] = frame
        return frame

    def _load_rest(self, quiet: bool) -> None:
        for i in range(1, len(self)):
            if self._closed:
                return
            try:
                self._load(i)
            except Exception:
                if not quiet:
                    raise
                return  # background: __getitem__ re-decodes the frame and raises there

    @property
    def num_resident(self) -> int:
        return sum(f is not None for f in self._frames)

    def __getitem__(self, idx: int) -> torch.Tensor:
        i = self.check_index(idx)
        frame = self._frames[i]
        return frame if frame is not None else self._load(i)

    def _stop_workers(self) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30.0)

    def _release(self) -> None:
        self._frames = [None] * len(self._frames)


def _default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def open_frames(video_path: Any, image_size: int, device: torch.device | str = "cpu", *,
                offload_video_to_cpu: bool = False, async_loading: bool = False,
                preload_all: bool = False, prefetch: int = 8, cache_size: int | None = None,
                workers: int | None = None, fast_feed: bool | None = None,
                img_mean: Sequence[float] = IMAGENET_MEAN,
                img_std: Sequence[float] = IMAGENET_STD) -> FrameSource:
    """Open a video for the predictor. See the module docstring for sources and numerics.

    ``device`` is the compute device; frames land there unless ``offload_video_to_cpu``.
    Lazy sources (the default) always work in the background: ``prefetch`` frames ahead,
    at most ``cache_size`` resident (default ``prefetch + 4``), ``workers`` resize threads
    (default: half the cores, at most 4). ``async_loading`` only matters with ``preload_all``,
    where it loads all frames but frame 0 in a background thread. ``fast_feed`` (lazy
    sources): prepare the next frame ahead (CUDA: pinned buffers, asynchronous upload);
    None: on for CPU, on CUDA only with ``SAM2_FAST_CUDA_FEED=1`` until measured on a GPU
    (``frames_lazy.feed_default``); ``False``: the plain path (same frames).
    """
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    target = torch.device("cpu") if offload_video_to_cpu else torch.device(device)
    decoder = open_decoder(video_path)
    try:
        src: FrameSource
        if preload_all:
            src = PreloadedFrames(decoder, int(image_size), target, img_mean, img_std,
                                  async_loading=async_loading)
        else:
            src = LazyFrames(decoder, int(image_size), target, img_mean, img_std, prefetch=prefetch,
                             cache_size=cache_size, workers=workers or _default_workers(),
                             fast_feed=fast_feed)
    except BaseException:
        decoder.close()
        raise
    src.recipe = dict(video_path=video_path, image_size=int(image_size), device=device,
                      offload_video_to_cpu=offload_video_to_cpu, async_loading=async_loading,
                      preload_all=preload_all, prefetch=prefetch, cache_size=cache_size,
                      workers=workers, fast_feed=fast_feed, img_mean=tuple(img_mean), img_std=tuple(img_std))
    return src
