"""Frames of a live stream: any frame type -> model input, read ahead in a background thread.

* :func:`prepare_frame` turns one frame (HWC uint8 numpy array or torch tensor, a CHW uint8
  torch tensor, a PIL image, a PyAV ``VideoFrame``) into a :class:`PreparedFrame`: its
  native size and the (3, S, S) uint8 model input, resized exactly as the video predictor
  resizes its frames (PIL RGB -> ``resize((S, S))``), so a stream and a video of the same
  frames give the same masks.
* :class:`FramePrefetcher` pulls frames from any iterator in a background thread and
  prepares them while the model works on the current frame (bounded queue; on CUDA the
  uint8 frames land in a ring of pinned host buffers so the copy to the GPU is async).
* :class:`StreamFrames` is the session's ``images``: it holds only the current frame.

Device-side preprocessing (``on_device=True``, off by default): the host only checks and
converts the frame to an (H, W, 3) uint8 tensor; it is copied to the device once and resized
there (:func:`~sam2_fast.video.frames_base.resize_u8_on_device`: PIL's fixed-point bicubic
replayed exactly in float64, in the pass order this PIL uses for the frame size), so the
model input is bitwise the host path's while the host skips the PIL resize (~26 ms per 480p
and ~52 ms per 1080p frame on one of our CPU cores; see benchmarks/NOTES.md).
"""

from __future__ import annotations

import queue
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from sam2_fast.utils.transforms import IMAGENET_MEAN, IMAGENET_STD, check_hwc_uint8
from sam2_fast.video.frames_base import Normalizer, close_at_exit, pil_pass_order, resize_u8, resize_u8_on_device
from sam2_fast.video.frames_decode import array_to_pil
from sam2_fast.video.frames_errors import FrameSourceError

COLOR_ORDERS = ("rgb", "bgr")


class StreamFrameError(FrameSourceError):
    """A frame the stream cannot take (type, dtype, channels, size); the stream is unchanged."""


@dataclass
class PreparedFrame:
    """One frame ready for the model: native size and (3, S, S) uint8 model input (CPU)."""

    height: int
    width: int
    pixels: torch.Tensor  # (3, S, S) uint8 resized, or (H, W, 3) uint8 to resize on the device
    release: Optional[Any] = None  # hands a pinned ring buffer back (after its copy is done)
    resized: bool = True  # False: ``pixels`` is the native RGB frame (device-side preprocessing)


def _checked_array(frame: Any) -> Any:
    """A numpy array / torch tensor frame as HWC (CHW tensors are permuted), checked."""
    if not hasattr(frame, "shape") or not hasattr(frame, "dtype"):
        raise StreamFrameError(
            f"a frame must be an HWC uint8 numpy array or torch tensor, a PIL image or a PyAV "
            f"VideoFrame; got {type(frame).__name__}")
    shape = tuple(int(s) for s in frame.shape)
    if isinstance(frame, torch.Tensor) and len(shape) == 3 and shape[0] in (1, 3) and shape[2] not in (1, 3, 4):
        frame = frame.permute(1, 2, 0)  # CHW tensor (torchvision's layout) -> HWC
        shape = tuple(int(s) for s in frame.shape)
    check_hwc_uint8(shape, frame.dtype, what="frame", error=StreamFrameError)
    return frame


def _bgr_to_rgb(frame: Any) -> Any:
    shape = tuple(frame.shape)
    if len(shape) == 3 and shape[2] >= 3:  # cv2 frames: BGR(A) -> RGB(A)
        return frame[..., [2, 1, 0] + list(range(3, shape[2]))]
    return frame


def _is_pyav(frame: Any) -> bool:
    return hasattr(frame, "to_image") and not hasattr(frame, "shape")


def _to_pil(frame: Any, color: str) -> Image.Image:
    """Any supported frame -> RGB PIL image, with a clear error for anything else."""
    if isinstance(frame, Image.Image):
        return frame.convert("RGB")
    if _is_pyav(frame):
        return frame.to_image()  # rgb24 via swscale, as the video predictor decodes files
    frame = _checked_array(frame)
    return array_to_pil(_bgr_to_rgb(frame) if color == "bgr" else frame)


def _to_rgb_tensor(frame: Any, color: str) -> torch.Tensor:
    """Any supported frame -> (H, W, 3) uint8 CPU tensor, without a PIL round trip for RGB
    arrays (the point of device-side preprocessing is to leave the host nearly idle)."""
    if _is_pyav(frame):
        return torch.from_numpy(frame.to_ndarray(format="rgb24"))
    if not isinstance(frame, Image.Image):
        frame = _checked_array(frame)
        if len(frame.shape) == 3 and frame.shape[2] == 3:
            if color == "bgr":
                frame = _bgr_to_rgb(frame)
            if isinstance(frame, torch.Tensor):  # a GPU-decoded frame stays where it is
                return frame.detach().contiguous()
            return torch.from_numpy(np.ascontiguousarray(frame))
    return torch.from_numpy(np.array(_to_pil(frame, color)))  # grayscale / RGBA / PIL (a writable copy)


def prepare_frame(frame: Any, image_size: int, color: str = "rgb", on_device: bool = False) -> PreparedFrame:
    """One frame -> :class:`PreparedFrame` (raises :class:`StreamFrameError` naming the problem).

    ``on_device``: skip the host resize; the frame is resized where it is normalised."""
    if color not in COLOR_ORDERS:
        raise ValueError(f"color must be one of {COLOR_ORDERS}, got {color!r}")
    try:
        if on_device:
            rgb = _to_rgb_tensor(frame, color)
            return PreparedFrame(height=rgb.shape[0], width=rgb.shape[1], pixels=rgb, resized=False)
        pil = _to_pil(frame, color)
    except StreamFrameError:
        raise
    except Exception as e:  # a decoder / conversion failure: say what it was
        raise StreamFrameError(f"cannot read the frame ({type(frame).__name__}): {type(e).__name__}: {e}") from e
    return PreparedFrame(height=pil.size[1], width=pil.size[0], pixels=resize_u8(pil, image_size))


# ---------------------------------------------------------------------- background reading
class _Failed:
    """A frame the producer could not prepare: re-raised by the consumer at its position."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


class _PinnedRing:
    """Pinned uint8 host buffers reused round-robin (pinning per frame costs more than the
    copy). A buffer comes back once the GPU copy that read it has finished. Buffers have
    the shape of the frames they carry; one of another shape is replaced."""

    def __init__(self, count: int) -> None:
        self._free: "queue.Queue[tuple[Optional[torch.Tensor], Optional[torch.cuda.Event]]]" = queue.Queue()
        for _ in range(count):
            self._free.put((None, None))

    def take(self, shape: Sequence[int], stop: threading.Event) -> Optional[torch.Tensor]:
        while not stop.is_set():
            try:
                buf, event = self._free.get(timeout=0.1)
            except queue.Empty:
                continue
            if event is not None:
                event.synchronize()  # the previous frame's copy out of this buffer is done
            if buf is None or tuple(buf.shape) != tuple(shape):
                buf = torch.empty(tuple(shape), dtype=torch.uint8).pin_memory()
            return buf
        return None

    def releaser(self, buf: torch.Tensor):
        def release() -> None:
            event = torch.cuda.Event()
            event.record()  # after the H2D copy issued on the current stream
            self._free.put((buf, event))
        return release


class FramePrefetcher:
    """Iterate prepared frames of ``frames`` while a background thread reads ahead.

    At most ``depth`` prepared frames wait in the queue. A frame that cannot be prepared is
    yielded as its exception (``StreamFrameError``) at its position and reading stops
    there. ``close()`` (also on garbage collection of the iterator) stops the thread; frames
    already read ahead are dropped.
    """

    def __init__(self, frames: Iterable[Any], image_size: int, color: str, depth: int = 2,
                 pin: bool = False, on_device: bool = False) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        if color not in COLOR_ORDERS:
            raise ValueError(f"color must be one of {COLOR_ORDERS}, got {color!r}")
        try:
            self._source = iter(frames)
        except TypeError:
            raise StreamFrameError(f"frames must be an iterable of frames, got {type(frames).__name__}") from None
        self._image_size, self._color, self._on_device = int(image_size), color, bool(on_device)
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        # depth queued + one being prepared + one in use by the consumer
        self._ring = _PinnedRing(depth + 2) if pin else None
        self._thread = threading.Thread(target=self._run, daemon=True, name="sam2_fast-stream")
        self._thread.start()
        close_at_exit(self, self._thread)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for frame in self._source:
                if self._stop.is_set():
                    return
                try:
                    item: Any = prepare_frame(frame, self._image_size, self._color, self._on_device)
                except StreamFrameError as e:
                    self._put(_Failed(e))
                    return
                if self._ring is not None and item.pixels.device.type == "cpu":
                    buf = self._ring.take(item.pixels.shape, self._stop)
                    if buf is None:
                        return
                    buf.copy_(item.pixels)
                    item = PreparedFrame(item.height, item.width, buf, self._ring.releaser(buf), item.resized)
                if not self._put(item):
                    return
        except BaseException as e:  # the user's iterator failed (camera gone, decode error)
            self._put(_Failed(StreamFrameError(f"the frame iterator raised {type(e).__name__}: {e}")))
            return
        self._put(_DONE)

    def __iter__(self) -> Iterator[Union[PreparedFrame, StreamFrameError]]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                yield item.error  # type: ignore[misc]
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        try:
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=10.0)
        except Exception:  # interpreter shutdown: module globals may be gone; the thread is a daemon
            pass

    def __del__(self) -> None:
        try:
            self._stop.set()
        except Exception:
            pass


# ---------------------------------------------------------------------- the session's images
class StreamFrames:
    """``session.images`` of a stream: the current frame only, normalised on ``device``.

    The backbone runs once per frame (the session caches its output), so older frames are
    never read again; keeping only the current one is what bounds memory on a stream.
    """

    def __init__(self, image_size: int, height: int, width: int, device: torch.device,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.image_size = int(image_size)
        self.video_height, self.video_width = int(height), int(width)
        self.device = torch.device(device)
        self._normalize = Normalizer(self.device, mean, std)
        self._idx = -1
        self._frame: Optional[torch.Tensor] = None  # (3, S, S) float32 on device
        self._warned = False

    def check(self, frame: PreparedFrame, idx: int) -> None:
        if (frame.height, frame.width) != (self.video_height, self.video_width):
            raise StreamFrameError(
                f"frame {idx} is {frame.width}x{frame.height} but the stream is "
                f"{self.video_width}x{self.video_height} (the size of its first frame); every "
                f"frame of a stream must have the same size (start a new stream with load_first_frame)")

    def put(self, idx: int, frame: PreparedFrame) -> None:
        """Make ``frame`` the current frame ``idx`` (normalised now; the uint8 input is let go)."""
        self.check(frame, idx)
        pixels = frame.pixels
        if not frame.resized:
            pixels = self._resize_native(pixels)
        normalized = self._normalize(pixels)
        if frame.release is not None:
            frame.release()
        self._idx, self._frame = idx, normalized

    def _resize_native(self, hwc: torch.Tensor) -> torch.Tensor:
        """Device-side preprocessing: one copy of the native frame, resized where it lands,
        in PIL's pass order for this size (bitwise the host path); if this PIL's order
        cannot be matched, the host path (with a warning, once)."""
        order = pil_pass_order(self.video_height, self.video_width, self.image_size, str(self.device))
        if order is None:
            if not self._warned:
                self._warned = True
                warnings.warn("device-side preprocessing cannot reproduce this PIL's resize for "
                              f"{self.video_width}x{self.video_height} frames; resizing on the host instead")
            return resize_u8(array_to_pil(hwc), self.image_size)
        return resize_u8_on_device(hwc.to(self.device, non_blocking=True), self.image_size, order)

    @property
    def current(self) -> int:
        return self._idx

    @property
    def num_resident(self) -> int:
        return int(self._frame is not None)

    def __getitem__(self, idx: int) -> torch.Tensor:
        if self._frame is None or idx != self._idx:
            raise FrameSourceError(f"frame {idx} of the stream is no longer held; a stream keeps only "
                                   f"its current frame ({self._idx})")
        return self._frame

    def iter_tensors(self) -> Iterator[torch.Tensor]:
        if self._frame is not None:
            yield self._frame

    def close(self) -> None:
        self._frame = None

    def __repr__(self) -> str:
        return (f"StreamFrames(at frame {self._idx}, {self.video_width}x{self.video_height} -> "
                f"{self.image_size}x{self.image_size}, {self.device})")
