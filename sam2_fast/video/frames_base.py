"""The common part of the frame sources: indexing rules, per-frame preprocessing, closing.

Preprocessing (shared by every source, so all of them have the reference's numerics):

* ``decode_raw``: walk the decoder to a frame (serialised for stateful decoders);
* ``finish_frame``: raw -> RGB PIL -> ``resize((S, S))`` with PIL's default filter -> (3, S, S)
  uint8 CPU tensor. Thread-safe, so a pool can run it for several frames at once;
* ``normalize``: uint8 -> float32 ``(x / 255 - mean) / std`` on the target device.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  (its exit hook first: ours is registered after it, runs before)
import contextlib
import functools
import threading
import weakref
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from sam2_fast.video.frames_decode import Decoder
from sam2_fast.video.frames_errors import FrameIndexError, FrameSourceError


def normalize_lut(mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(3, 256) float32: ``(float32(k / 255) - mean_c) / std_c`` for every byte value ``k``.

    The reference divides in float64 then stores float32; k/255 has a repeating 8-bit binary
    expansion, so the double rounding never meets a tie and a float32 division agrees.
    """
    levels = torch.from_numpy(np.arange(256, dtype=np.float64) / 255.0).to(torch.float32)
    m = torch.tensor(mean, dtype=torch.float32)[:, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None]
    return (levels[None, :] - m) / s


def resize_u8(pil_rgb: Any, size: int) -> torch.Tensor:
    """PIL RGB image -> (3, S, S) uint8, resized exactly like the reference's JPEG loader."""
    small = pil_rgb.resize((size, size))  # PIL's default filter, as the reference
    planes = [np.asarray(band) for band in small.split()]  # split is a fast C de-interleave
    return torch.from_numpy(np.stack(planes))


# PIL's 8-bit resampling (Resample.c): filter weights in double, rounded to fixed point with
# 22 fractional bits, accumulated in integers with a rounding offset, clipped to 0..255 after
# each of the two separable passes (horizontal first).
_PIL_PRECISION_BITS = 22


def _pil_bicubic(x: float) -> float:
    a = -0.5  # PIL's bicubic (its default filter for ``Image.resize``)
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=8)
def _pil_weights_cpu(in_size: int, out_size: int) -> torch.Tensor:
    """(out, in) float64 holding PIL's integer resampling weights (``precompute_coeffs``
    then ``normalize_coeffs_8bpc``), the same double operations in the same order."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ss = 1.0 / filterscale
    rows = torch.zeros(out_size, in_size, dtype=torch.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int(): C's truncating cast
        xmax = min(int(center + support + 0.5), in_size) - xmin
        ws = [_pil_bicubic((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for w in ws:
            ww += w
        if ww != 0.0:
            ws = [w / ww for w in ws]
        one = 1 << _PIL_PRECISION_BITS
        rows[xx, xmin:xmin + xmax] = torch.tensor(
            [int(-0.5 + w * one) if w < 0 else int(0.5 + w * one) for w in ws], dtype=torch.float64)
    return rows


_pil_weights_dev: "dict[tuple[int, int, str], torch.Tensor]" = {}


def _pil_weights(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    key = (in_size, out_size, str(device))
    w = _pil_weights_dev.get(key)
    if w is None:
        if len(_pil_weights_dev) >= 8:
            _pil_weights_dev.clear()
        w = _pil_weights_dev[key] = _pil_weights_cpu(in_size, out_size).to(device)
    return w


def _pil_round(acc: torch.Tensor) -> torch.Tensor:
    # clip8(ss): (ss + 2^21) >> 22, clamped to 0..255; exact: acc holds integers < 2^53
    half = float(1 << (_PIL_PRECISION_BITS - 1))
    return torch.floor((acc + half) * (1.0 / (1 << _PIL_PRECISION_BITS))).clamp_(0, 255)


def resize_u8_on_device(hwc_u8: torch.Tensor, size: int, horizontal_first: bool = True) -> torch.Tensor:
    """(H, W, 3) uint8 on any device -> (3, S, S) uint8 on that device, bitwise what
    ``resize_u8`` (PIL's default bicubic ``resize``) gives, without the host resize.

    PIL's fixed-point arithmetic is replayed in float64 as two matrix products with its
    integer weights: every product and partial sum is an integer below 2^36, so float64 is
    exact whatever the summation order (fp64 GEMM has no reduced-precision mode). The order
    of the two passes matters (the intermediate is rounded to uint8) and PIL's choice
    depends on its version and the sizes: :func:`pil_pass_order` finds it.
    """
    h, w = int(hwc_u8.shape[0]), int(hwc_u8.shape[1])
    x = hwc_u8.permute(2, 0, 1).to(torch.float64)  # (3, H, W)

    def horizontal(x: torch.Tensor) -> torch.Tensor:  # a pass runs only when its size changes
        return x if w == size else _pil_round(x @ _pil_weights(w, size, x.device).T)  # (3, rows, S)

    def vertical(x: torch.Tensor) -> torch.Tensor:
        return x if h == size else _pil_round(_pil_weights(h, size, x.device) @ x)  # (3, S, cols)

    x = vertical(horizontal(x)) if horizontal_first else horizontal(vertical(x))
    return x.to(torch.uint8)


@functools.lru_cache(maxsize=16)
def pil_pass_order(height: int, width: int, size: int, device: str = "cpu") -> Optional[bool]:
    """Which pass this PIL runs first for (height, width) -> (size, size): True horizontal,
    False vertical, None if neither replay is bitwise PIL (then use the host path).

    Found once per size by resizing a noise probe both ways and with PIL (on noise the two
    orders always differ somewhere; one PIL resize, ~50 ms for a 1080p frame)."""
    from PIL import Image

    probe = np.random.default_rng(height * 100_003 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    want = resize_u8(Image.fromarray(probe), size).to(device)
    x = torch.from_numpy(probe).to(device)
    for horizontal_first in (True, False):
        if torch.equal(resize_u8_on_device(x, size, horizontal_first), want):
            return horizontal_first
    return None


# ---------------------------------------------------------------------- closing at exit
_OPEN: "weakref.WeakSet[Any]" = weakref.WeakSet()
_THREADS: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()


def close_at_exit(obj: Any, thread: Optional[threading.Thread] = None) -> None:
    """When the interpreter starts to exit: ``obj.close()`` if nobody closed it, then wait for
    ``thread`` (its daemon reader) to end.

    Frame sources and stream prefetchers read ahead in daemon threads. A daemon thread still
    inside a torch, PIL or decoder call when the interpreter finalizes is ended by
    pthread_exit, whose unwinding through C++ frames aborts the process: "terminate called
    without an active exception", exit status 134. Seen in about half the runs of a test that
    leaves a session open after a tracking error; the source was even closed already (from
    its own thread, on garbage collection), its thread still finishing a step."""
    _OPEN.add(obj)
    if thread is not None:
        _THREADS.add(thread)


def _close_open() -> None:
    for obj in list(_OPEN):
        try:
            obj.close()
        except Exception:  # noqa: BLE001 - exiting anyway; the next one may still close
            pass
    for thread in list(_THREADS):
        if thread is not threading.current_thread():
            thread.join(timeout=5.0)  # each stops within one step once its source is closed


# Run with threading's own exit hooks, before threads are joined and before atexit's (the
# interpreter calls them in reverse order of registration: this one before the thread
# pools' shutdown, registered at the import above, so the resize pools still take work).
getattr(threading, "_register_atexit", atexit.register)(_close_open)


class Normalizer:
    """(3, S, S) uint8 -> (3, S, S) float32 on ``device``, ImageNet-normalised, bitwise the
    reference's ``(x / 255 - mean) / std`` (shared by every frame source and the stream).

    Its frames are always normal tensors, never inference tensors, whichever thread makes
    them: frame 0 is made in the caller's thread inside ``torch.inference_mode``, later ones
    by prefetch threads outside it, and a compiled image encoder guards on its input's
    dispatch keys, so mixing the two kinds compiled it once more (minutes under
    max-autotune; ``tests/test_compile_census.py``)."""

    def __init__(self, device: torch.device, mean: Sequence[float], std: Sequence[float]) -> None:
        self.device = torch.device(device)
        self._mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self._mean_np, self._std_np = self._mean.numpy(), self._std.numpy()
        # Off the CPU a float ``x / 255`` may become ``x * (1/255)`` (not bitwise the
        # reference), so there we look the normalised values up in a table instead.
        # On the CPU the 4 float ops stay: measured 1.05 ms at 1024 px (1 thread) against
        # 2.72 ms for the table gather; a fused ``x * (1 / (255 std)) - mean / std`` (2 ops)
        # is not bitwise the reference (checked for every byte value), so it is not used.
        self._lut_cpu = normalize_lut(mean, std)  # (3, 256)
        self._lut = None if self.device.type == "cpu" else self._lut_cpu.to(self.device)

    @torch.inference_mode(False)
    def __call__(self, frame_u8: torch.Tensor) -> torch.Tensor:
        x = frame_u8.to(self.device, non_blocking=True)
        if self._lut is None:  # CPU: the reference's float32 ops, in place
            return x.to(torch.float32).div_(255.0).sub_(self._mean).div_(self._std)
        return self.on_device(x)

    @torch.inference_mode(False)
    def in_numpy(self, frame_u8: torch.Tensor) -> torch.Tensor:
        """CPU (3, S, S) uint8 -> float32, the same float32 ops in numpy: bitwise equal (IEEE
        division and subtraction, checked for every byte value) and single-threaded. Torch's
        version splits the 3M elements over the intra-op pool, whose barrier waits for a
        thread the resize threads (or other jobs) keep off a core: measured p90 32 ms against
        1.2 ms here on the 2-core machine, 1024 px (p50 0.55 vs 1.1 ms when idle)."""
        a = frame_u8.numpy().astype(np.float32)
        np.divide(a, np.float32(255.0), out=a)
        np.subtract(a, self._mean_np, out=a)
        np.divide(a, self._std_np, out=a)
        return torch.from_numpy(a)

    @torch.inference_mode(False)
    def on_device(self, x: torch.Tensor) -> torch.Tensor:
        """(3, S, S) uint8 already on its device -> float32 by the table: a cast and one
        gather per channel row (2 kernels; the flat-index form took 3: cast, add, index)."""
        lut = self._lut
        if lut is None or x.device != lut.device:  # a CPU normaliser asked for the table form
            lut = self._lut_cpu.to(x.device)
        return torch.gather(lut, 1, x.reshape(3, -1).long()).view(x.shape)


class FrameSource:
    """Indexable video: ``len(src)``, ``src[idx] -> (3, S, S) float32``, ``src.close()``.

    Attributes: ``image_size`` (S), ``video_height`` / ``video_width`` (native size of frame
    0), ``device`` (where ``src[idx]`` lands), ``num_resident`` (decoded frames held now).
    """

    image_size: int
    video_height: int
    video_width: int
    device: torch.device
    # how ``open_frames`` made this source: pickling / deep-copying a source reopens it from
    # this recipe (threads, locks and the decoder cannot be copied; the video can be reread)
    recipe: dict[str, Any] | None = None

    def __init__(self, decoder: Decoder, image_size: int, device: torch.device,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self._decoder = decoder
        self.image_size = int(image_size)
        self.video_height = int(decoder.height)
        self.video_width = int(decoder.width)
        self.device = device
        self._normalize = Normalizer(device, mean, std)
        # Video decoders are stateful: one walker at a time. Folders and arrays are not.
        self._decode_lock: Any = (contextlib.nullcontext() if getattr(decoder, "thread_safe", False)
                                  else threading.Lock())
        self._close_lock = threading.Lock()
        self._closed = False
        close_at_exit(self)

    def __len__(self) -> int:
        return self._decoder.num_frames

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, idx: int) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_resident(self) -> int:
        raise NotImplementedError

    def check_index(self, idx: Any) -> int:
        """Python-style index (negatives count from the end) -> 0 <= i < len."""
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

    # -- preprocessing ---------------------------------------------------------------------
    def decode_raw(self, idx: int, keep: Callable[[int], bool] | None = None) -> list[tuple[int, Any]]:
        """Raw frame ``idx``, plus the frames decoded on the way for which ``keep(i)``."""
        try:
            with self._decode_lock:
                return [(i, raw) for i, raw in self._decoder.walk_to(idx)
                        if i == idx or (keep is not None and keep(i))]
        except FrameSourceError:
            raise
        except Exception as e:  # codec errors: name the frame that failed
            raise FrameSourceError(f"cannot decode frame {idx}: {type(e).__name__}: {e}") from e

    def finish_frame(self, idx: int, raw: Any) -> torch.Tensor:
        """Raw frame -> (3, S, S) uint8 CPU tensor (thread-safe)."""
        try:
            return resize_u8(self._decoder.to_pil(idx, raw), self.image_size)
        except FrameSourceError:
            raise
        except Exception as e:
            raise FrameSourceError(f"cannot decode frame {idx}: {type(e).__name__}: {e}") from e

    def load_u8(self, idx: int) -> torch.Tensor:
        """Decode and resize one frame, nothing kept: (3, S, S) uint8 CPU."""
        [(_, raw)] = self.decode_raw(idx)
        return self.finish_frame(idx, raw)

    def normalize(self, frame_u8: torch.Tensor) -> torch.Tensor:
        """(3, S, S) uint8 -> (3, S, S) float32 on ``self.device``, ImageNet-normalised."""
        return self._normalize(frame_u8)

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop background work, close the decoder and drop resident frames (idempotent)."""
        with self._close_lock:
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

    def __reduce__(self) -> tuple[Any, ...]:
        if self.recipe is None:
            raise TypeError(f"{type(self).__name__} was not made by open_frames, so it cannot be "
                            "pickled or copied (nothing says how to reopen it)")
        return (_reopen, (self.recipe,))

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} frames, {self.video_width}x"
                f"{self.video_height} -> {self.image_size}x{self.image_size}, {self.device})")


def _reopen(recipe: dict[str, Any]) -> FrameSource:
    """Unpickling / deep copy of a frame source: open the same video again."""
    from sam2_fast.video.frames import open_frames

    return open_frames(**recipe)
