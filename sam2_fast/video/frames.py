"""Video frame sources for the video predictor: lazy, bounded, and numerically the reference.

``open_frames(video_path, image_size, device)`` accepts a folder of JPEG frames (ordered by the
integer in the file name), a video file (.mp4/.mov/.avi/.webm/.mkv, or its bytes; decoded with
PyAV) or in-memory frames (an (N, H, W, C) uint8 array or a sequence of HWC uint8 frames).
``src[idx]`` is the model input of frame ``idx``: float32 (3, S, S), ImageNet-normalised, on the
compute device (on the CPU when ``offload_video_to_cpu``).

Preprocessing is the reference's JPEG path for every source: the uint8 RGB frame goes through
``PIL.Image.resize((S, S))`` (PIL's default filter), then ``/255``, ``-mean``, ``/std`` in
float32. We do the last three steps with a 256-entry table per channel built with exactly
those float ops on the CPU, so the result is bitwise the reference's on any device (a CUDA
``x / 255.`` multiplies by the reciprocal and can differ in the last bit).

Memory stays flat as the video grows: decoded frames live in a small cache of resized uint8
frames (3*S*S bytes each) around the access point, filled ahead by a background thread in the
direction of travel (reverse tracking is detected from the access pattern). ``preload_all=True``
keeps every normalised frame resident instead, as the reference does.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from sam2_fast.video.frames_decode import Decoder, open_decoder
from sam2_fast.video.frames_errors import FrameIndexError, FrameSourceError, VideoNotFoundError

__all__ = [
    "FrameSource",
    "LazyFrames",
    "PreloadedFrames",
    "open_frames",
    "load_video_frames",
    "normalize_lut",
    "FrameSourceError",
    "FrameIndexError",
    "VideoNotFoundError",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_lut(mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(3, 256) float32: ``(float32(k / 255) - mean_c) / std_c`` for every byte value ``k``.

    The reference divides in float64 then stores float32; k/255 has a repeating 8-bit binary
    expansion, so the double rounding never hits a tie and this equals a float32 division.
    """
    levels = torch.from_numpy(np.arange(256, dtype=np.float64) / 255.0).to(torch.float32)
    m = torch.tensor(mean, dtype=torch.float32)[:, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None]
    return (levels[None, :] - m) / s


def _resize_u8(pil_rgb: Any, size: int) -> torch.Tensor:
    """PIL RGB image -> (3, S, S) uint8, resized exactly like the reference's JPEG loader."""
    arr = np.asarray(pil_rgb.resize((size, size)))  # (S, S, 3) uint8
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class FrameSource:
    """Indexable video: ``len(src)``, ``src[idx] -> (3, S, S) float32``, ``src.close()``."""

    image_size: int
    video_height: int
    video_width: int
    device: torch.device  # where ``src[idx]`` lands

    def __init__(self, decoder: Decoder, image_size: int, device: torch.device,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self._decoder = decoder
        self.image_size = int(image_size)
        self.video_height = int(decoder.height)
        self.video_width = int(decoder.width)
        self.device = device
        self._lut = normalize_lut(mean, std).to(device)
        self._lut_offsets = (torch.arange(3, device=device) * 256)[:, None, None]
        self._decode_lock = threading.Lock()  # one decoder, used by caller and worker threads
        self._closed = False

    # -- shared helpers ------------------------------------------------------------------
    def __len__(self) -> int:
        return self._decoder.num_frames

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def _check_index(self, idx: Any) -> int:
        if isinstance(idx, torch.Tensor) and idx.numel() == 1:
            idx = idx.item()
        if not isinstance(idx, (int, np.integer)) or isinstance(idx, bool):
            raise FrameSourceError(f"frame index must be an int, got {type(idx).__name__}")
        n = len(self)
        i = int(idx) + n if idx < 0 else int(idx)
        if not 0 <= i < n:
            raise FrameIndexError(f"frame index {idx} out of range for a video of {n} frames")
        if self._closed:
            raise FrameSourceError("this frame source is closed")
        return i

    def _normalize(self, frame_u8: torch.Tensor) -> torch.Tensor:
        """(3, S, S) uint8 (any device) -> (3, S, S) float32 on ``self.device``, normalised."""
        codes = frame_u8.to(self.device, non_blocking=True).long() + self._lut_offsets
        return self._lut.view(-1)[codes]

    def _decode_resized(self, idx: int, keep: Any = None) -> dict[int, torch.Tensor]:
        """Decode frame ``idx`` (caller holds the decode lock); also resize the frames decoded
        on the way for which ``keep(i)`` is true. Returns {index: (3, S, S) uint8 CPU}."""
        out: dict[int, torch.Tensor] = {}
        try:
            for i, raw in self._decoder.walk_to(idx):
                if i == idx or (keep is not None and keep(i)):
                    out[i] = _resize_u8(self._decoder.to_pil(i, raw), self.image_size)
        except FrameSourceError:
            raise
        except Exception as e:  # codec / PIL errors: name the frame that failed
            raise FrameSourceError(f"cannot decode frame {idx}: {type(e).__name__}: {e}") from e
        return out

    def __getitem__(self, idx: int) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_resident(self) -> int:
        """How many decoded frames are held in memory right now."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop background work, close the decoder and drop resident frames (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop_workers()
        with self._decode_lock:  # waits for a decode in flight
            self._decoder.close()
        self._release()

    def _stop_workers(self) -> None:
        pass

    def _release(self) -> None:
        pass

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} frames, {self.video_width}x"
                f"{self.video_height} -> {self.image_size}x{self.image_size}, {self.device})")


class LazyFrames(FrameSource):
    """Frames decoded on demand; at most ``cache_size`` resized uint8 frames resident.

    A worker thread keeps the next ``prefetch`` frames (in the direction of the last two
    accesses) decoded. On eviction, frames behind the access point go first, farthest first.
    """

    def __init__(self, decoder: Decoder, image_size: int, device: torch.device,
                 mean: Sequence[float], std: Sequence[float], prefetch: int = 8,
                 cache_size: int | None = None) -> None:
        super().__init__(decoder, image_size, device, mean, std)
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.prefetch = int(prefetch)
        self.cache_size = max(2, int(cache_size) if cache_size is not None else self.prefetch + 4)
        if self.cache_size < self.prefetch + 1:
            raise ValueError(f"cache_size ({cache_size}) must be > prefetch ({prefetch})")
        self._cache: dict[int, torch.Tensor] = {}  # idx -> (3, S, S) uint8 CPU
        self._cv = threading.Condition()
        self._cursor = 0
        self._step = 1  # +1 forward, -1 reverse
        self._failed: set[int] = set()  # indices the worker could not decode (caller re-raises)
        self._worker: threading.Thread | None = None
        self.peak_resident = 0
        self[0]  # decode frame 0 now: fail early on a broken source, and it is the first asked
        if self.prefetch > 0:
            self._worker = threading.Thread(target=self._prefetch_loop, daemon=True,
                                            name="sam2_fast-frame-prefetch")
            self._worker.start()

    @property
    def num_resident(self) -> int:
        with self._cv:
            return len(self._cache)

    def _ahead(self) -> list[int]:
        """Indices the worker should have ready, nearest first (call with the cv held)."""
        n = len(self)
        steps = (self._cursor + k * self._step for k in range(1, self.prefetch + 1))
        return [i for i in steps if 0 <= i < n]

    def _in_window(self, i: int, reach: int) -> bool:
        d = (i - self._cursor) * self._step
        return 0 <= d <= reach

    def _store(self, frames: dict[int, torch.Tensor]) -> None:
        """Insert frames and evict down to ``cache_size`` (call with the cv held)."""
        self._cache.update(frames)
        while len(self._cache) > self.cache_size:
            def badness(i: int) -> tuple[int, int]:
                d = (i - self._cursor) * self._step
                return (1, -d) if d < 0 else (0, d)  # behind first, then farthest ahead
            del self._cache[max(self._cache, key=badness)]
        self.peak_resident = max(self.peak_resident, len(self._cache))
        self._cv.notify_all()

    def __getitem__(self, idx: int) -> torch.Tensor:
        i = self._check_index(idx)
        with self._cv:
            if i != self._cursor:
                self._step = 1 if i > self._cursor else -1
            self._cursor = i
            frame = self._cache.get(i)
            self._cv.notify_all()  # wake the worker: the window moved
        if frame is None:
            with self._decode_lock:
                with self._cv:
                    frame = self._cache.get(i)  # the worker may have just made it
                if frame is None:
                    with self._cv:
                        keep = self._keep_predicate()
                    got = self._decode_resized(i, keep)
                    frame = got[i]
                    with self._cv:
                        self._failed.discard(i)
                        self._store(got)
        return self._normalize(frame)

    def _keep_predicate(self) -> Callable[[int], bool]:
        """Which frames decoded on the way to a target are worth resizing and keeping: the
        ones just ahead in the direction of travel (a reverse walk through a GOP), as many
        as the cache can hold next to the current frame (call with the cv held)."""
        cursor, step, cache = self._cursor, self._step, self._cache
        reach = max(self.prefetch, self.cache_size - 1)

        def keep(j: int) -> bool:
            d = (j - cursor) * step
            return 0 < d <= reach and j not in cache
        return keep

    def _prefetch_loop(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._closed:
                        return
                    todo = [i for i in self._ahead() if i not in self._cache and i not in self._failed]
                    if todo:
                        break
                    self._cv.wait()
                target, keep = todo[0], self._keep_predicate()
            with self._decode_lock:
                if self._closed:
                    return
                with self._cv:
                    if target in self._cache or not self._in_window(target, self.prefetch):
                        continue
                try:
                    got = self._decode_resized(target, keep)
                except Exception:
                    with self._cv:
                        self._failed.add(target)  # the caller will decode it and raise
                    continue
            with self._cv:
                reach = max(self.prefetch, self.cache_size - 1)
                self._store({i: f for i, f in got.items() if self._in_window(i, reach)})

    def _stop_workers(self) -> None:
        with self._cv:
            self._cv.notify_all()  # the worker sees _closed and leaves
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=10.0)

    def _release(self) -> None:
        with self._cv:
            self._cache.clear()


class PreloadedFrames(FrameSource):
    """Every frame normalised and resident, as the reference keeps them (for benchmarks).

    With ``async_loading`` frame 0 is loaded on open and the rest by a background thread;
    asking for a frame the thread has not reached yet decodes it on the spot.
    """

    def __init__(self, decoder: Decoder, image_size: int, device: torch.device,
                 mean: Sequence[float], std: Sequence[float], async_loading: bool = False) -> None:
        super().__init__(decoder, image_size, device, mean, std)
        self._frames: list[torch.Tensor | None] = [None] * len(self)
        self._error: BaseException | None = None
        self._worker: threading.Thread | None = None
        self._load(0)
        if async_loading:
            self._worker = threading.Thread(target=self._load_rest, daemon=True,
                                            name="sam2_fast-frame-preload")
            self._worker.start()
        else:
            self._load_rest()
            if self._error is not None:
                raise self._error

    def _load(self, i: int) -> torch.Tensor:
        with self._decode_lock:
            frame = self._frames[i]
            if frame is None:
                frame = self._normalize(self._decode_resized(i)[i])
                self._frames[i] = frame
        return frame

    def _load_rest(self) -> None:
        try:
            for i in range(1, len(self)):
                if self._closed:
                    return
                self._load(i)
        except BaseException as e:  # kept for the caller; __getitem__ re-decodes and raises
            self._error = e

    @property
    def num_resident(self) -> int:
        return sum(f is not None for f in self._frames)

    def __getitem__(self, idx: int) -> torch.Tensor:
        i = self._check_index(idx)
        frame = self._frames[i]
        return frame if frame is not None else self._load(i)

    def _stop_workers(self) -> None:
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=10.0)

    def _release(self) -> None:
        self._frames = [None] * len(self._frames)


def open_frames(video_path: Any, image_size: int, device: torch.device | str = "cpu", *,
                offload_video_to_cpu: bool = False, async_loading: bool = False,
                preload_all: bool = False, prefetch: int = 8, cache_size: int | None = None,
                img_mean: Sequence[float] = IMAGENET_MEAN,
                img_std: Sequence[float] = IMAGENET_STD) -> FrameSource:
    """Open a video for the predictor. See the module docstring for sources and numerics.

    ``device`` is the compute device; frames land there unless ``offload_video_to_cpu``.
    Lazy sources (the default) always prefetch in the background (``prefetch`` frames ahead,
    ``cache_size`` resident at most, default ``prefetch + 4``); ``async_loading`` only matters
    with ``preload_all``, where it loads all but frame 0 in a background thread.
    """
    if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    target = torch.device("cpu") if offload_video_to_cpu else torch.device(device)
    decoder = open_decoder(video_path)
    try:
        if preload_all:
            return PreloadedFrames(decoder, int(image_size), target, img_mean, img_std,
                                   async_loading=async_loading)
        return LazyFrames(decoder, int(image_size), target, img_mean, img_std,
                          prefetch=prefetch, cache_size=cache_size)
    except BaseException:
        decoder.close()
        raise


def load_video_frames(video_path: Any, image_size: int, offload_video_to_cpu: bool,
                      img_mean: Sequence[float] = IMAGENET_MEAN,
                      img_std: Sequence[float] = IMAGENET_STD, async_loading_frames: bool = False,
                      compute_device: torch.device | str = "cuda",
                      ) -> tuple[FrameSource, int, int]:
    """The reference's ``load_video_frames`` call shape: ``(frames, video_height, video_width)``
    with a lazy, bounded frame source in place of the all-frames tensor."""
    src = open_frames(video_path, image_size, compute_device,
                      offload_video_to_cpu=offload_video_to_cpu,
                      async_loading=async_loading_frames, img_mean=img_mean, img_std=img_std)
    return src, src.video_height, src.video_width
