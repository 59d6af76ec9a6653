"""LazyFrames: frames decoded on demand, a bounded cache, background prefetch.

Resident memory: at most ``cache_size`` resized uint8 frames (3*S*S bytes each, 3 MiB at
S=1024), whatever the video length. Layout of the work:

* the *access point* (``cursor``) and *direction* (``step``) follow the caller's requests
  (two requests in decreasing order mean reverse tracking), or ``hint()``;
* a prefetch thread walks the decoder to the nearest missing frame of the next
  ``prefetch`` frames in that direction (decoding is serial: a video decoder is stateful);
* resizing, the expensive part, runs on a small thread pool (PIL releases the GIL);
* frames decoded on the way to a target (a seek lands on the GOP's keyframe) are kept when
  they lie just ahead in the direction of travel, so a reverse walk decodes each GOP once;
* on overflow, frames behind the access point are evicted first (farthest first), then the
  farthest ahead.

A frame in flight is in ``_pending``; a caller that needs it waits for it instead of
decoding it twice. A frame the background could not produce goes to ``_failed``; the caller
then decodes it itself and gets the real error.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch

from sam2_fast.video.frames_base import FrameSource, close_at_exit
from sam2_fast.video.frames_decode import Decoder
from sam2_fast.video.frames_feed import DeviceFeed, HostFeed, _AheadFeed


FEED_ENV = "SAM2_FAST_CUDA_FEED"


def feed_default(device_type: str) -> bool:
    """Whether lazy sources prepare frames ahead by default: on the CPU yes (measured: main
    thread 3.1-3.8 -> 0.11 ms per frame at 1024 px, NOTES "Frame feed"); on CUDA only with
    ``SAM2_FAST_CUDA_FEED=1`` until a GPU run has checked and timed the pinned/async path
    (it has run on fake events only; ``benchmarks/bench_frame_feed.py --device cuda`` and
    ``pytest -m cuda tests/test_frames.py`` are the check)."""
    if device_type == "cuda":
        return os.environ.get(FEED_ENV, "0") == "1"
    return True


class LazyFrames(FrameSource):
    """See the module docstring. ``prefetch=0`` turns all background work off.

    ``fast_feed`` prepares the frame after the one asked for ahead (``frames_feed``: on CUDA
    pinned buffers and an asynchronous upload, on the CPU normalised on a worker); the
    default (None) is :func:`feed_default`;
    ``fast_feed=False`` normalises (and uploads, synchronously) on the caller's thread, as
    before (kept for benchmarks; the frames are the same bits). ``wait_s`` / ``produce_s``:
    seconds the caller spent blocked on the prefetcher / decoding a frame itself (misses).
    """

    def __init__(self, decoder: Decoder, image_size: int, device: torch.device,
                 mean: Sequence[float], std: Sequence[float], prefetch: int = 8,
                 cache_size: int | None = None, workers: int = 2, fast_feed: bool | None = None) -> None:
        super().__init__(decoder, image_size, device, mean, std)
        if prefetch < 0 or workers < 1:
            raise ValueError(f"need prefetch >= 0 and workers >= 1, got {prefetch}, {workers}")
        self.prefetch = int(prefetch)
        self.cache_size = int(cache_size) if cache_size is not None else self.prefetch + 4
        if self.cache_size < max(2, self.prefetch + 1):
            raise ValueError(f"cache_size ({self.cache_size}) must be >= 2 and > prefetch ({prefetch})")
        self._reach = self.cache_size - 1  # how far ahead a frame is worth keeping
        self._cache: dict[int, torch.Tensor] = {}  # idx -> (3, S, S) uint8 CPU
        self._pending: set[int] = set()
        self._failed: set[int] = set()
        self._cv = threading.Condition()
        self._cursor, self._step = 0, 1
        self.peak_resident = 0
        self.wait_s = 0.0
        self.produce_s = 0.0
        self._feed: _AheadFeed | None = None
        kind = torch.device(device).type
        if fast_feed is None:
            fast_feed = feed_default(kind)
        if fast_feed and kind == "cuda":
            self._feed = DeviceFeed(self._normalize, (3, self.image_size, self.image_size),
                                    ring_size=self.prefetch)
        elif fast_feed and kind == "cpu" and self.prefetch > 0:
            # (prefetch 0: no worker threads, so nothing to hand the work to and nothing
            # contending with torch's intra-op pool: the plain path is the faster one)
            self._feed = HostFeed(self._normalize, _submitter(weakref.ref(self)))
        self._pool: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self[0]  # fail early on a broken source; frame 0 is what init_state asks first
        if self.prefetch > 0:
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sam2_fast-resize")
            self._thread = threading.Thread(target=_prefetch_main, args=(weakref.ref(self),),
                                            daemon=True, name="sam2_fast-prefetch")
            self._thread.start()
            close_at_exit(self, self._thread)

    @property
    def num_resident(self) -> int:
        with self._cv:
            return len(self._cache)

    def hint(self, idx: int, reverse: bool = False) -> None:
        """Tell the prefetcher where tracking is about to start and which way it goes."""
        i = self.check_index(idx)
        with self._cv:
            self._cursor, self._step = i, (-1 if reverse else 1)
            self._cv.notify_all()

    # -- cache bookkeeping (all with the cv held) --------------------------------------------
    def _distance(self, i: int) -> int:
        return (i - self._cursor) * self._step  # > 0: ahead in the direction of travel

    def _keep_predicate(self) -> Callable[[int], bool]:
        cursor, step, reach = self._cursor, self._step, self._reach
        cache, pending = self._cache, self._pending  # live views; a stale read costs a redo
        return lambda j: 0 < (j - cursor) * step <= reach and j not in cache and j not in pending

    def _store(self, idx: int, frame: torch.Tensor) -> None:
        self._pending.discard(idx)
        self._failed.discard(idx)
        if idx == self._cursor or 0 <= self._distance(idx) <= self._reach:
            self._cache[idx] = frame
            while len(self._cache) > self.cache_size:
                def badness(i: int) -> tuple[int, int]:
                    d = self._distance(i)
                    return (1, -d) if d < 0 else (0, d)  # behind first, then farthest ahead
                del self._cache[max(self._cache, key=badness)]
            self.peak_resident = max(self.peak_resident, len(self._cache))
        self._cv.notify_all()

    def _next_target(self) -> int | None:
        n = len(self)
        for k in range(1, self.prefetch + 1):
            i = self._cursor + k * self._step
            if not 0 <= i < n:
                return None
            if i not in self._cache and i not in self._pending and i not in self._failed:
                return i
        return None

    # -- background work -----------------------------------------------------------------------
    def _finish_async(self, idx: int, raw: Any) -> None:
        try:
            frame = self.finish_frame(idx, raw)
        except Exception:
            with self._cv:
                self._pending.discard(idx)
                self._failed.add(idx)
                self._cv.notify_all()
            return
        with self._cv:
            self._store(idx, frame)

    def _prefetch_once(self, wait_s: float) -> bool:
        """One prefetch step; False once closed. Waits up to ``wait_s`` for work."""
        with self._cv:
            if self._closed:
                return False
            target = self._next_target()
            if target is None:
                self._cv.wait(wait_s)
                return not self._closed
            self._pending.add(target)
            keep = self._keep_predicate()
        try:
            raws = self.decode_raw(target, keep)
        except Exception:
            with self._cv:
                self._pending.discard(target)
                self._failed.add(target)
            return True
        with self._cv:
            if self._closed:
                self._pending.clear()
                return False
            self._pending.update(i for i, _ in raws)
        for i, raw in raws:
            self._pool.submit(self._finish_async, i, raw)
        return True

    # -- access ----------------------------------------------------------------------------------
    def __getitem__(self, idx: int) -> torch.Tensor:
        i = self.check_index(idx)
        if self._feed is None:
            return self.normalize(self._get_u8(i))
        out = self._feed.get(i, lambda: self._get_u8(i))
        with self._cv:  # (a frame uploaded ahead skipped _get_u8: move the window here too)
            self._move_cursor(i)
            nxt = i + self._step
            ahead = self._cache.get(nxt) if self._feed.wants(nxt) else None
        if ahead is not None:  # already cached: upload it now, its copy overlaps this frame
            self._feed.stage(nxt, ahead)
        return out

    def _move_cursor(self, i: int) -> None:  # with the cv held
        if i != self._cursor:
            self._step = 1 if i > self._cursor else -1
            self._cursor = i
            self._cv.notify_all()  # the window moved: wake the prefetcher

    def _get_u8(self, i: int) -> torch.Tensor:
        """Frame ``i`` as (3, S, S) uint8 CPU: cached, waited for, or decoded here."""
        with self._cv:
            self._move_cursor(i)
            if i not in self._cache and i in self._pending:
                t0 = time.perf_counter()
                while i not in self._cache and i in self._pending:
                    self._cv.wait()  # being produced in the background
                self.wait_s += time.perf_counter() - t0
            frame = self._cache.get(i)
            if frame is None:
                self._pending.add(i)
                keep = self._keep_predicate()
        if frame is None:
            t0 = time.perf_counter()
            frame = self._produce_now(i, keep)
            self.produce_s += time.perf_counter() - t0
        return frame

    def _produce_now(self, i: int, keep: Callable[[int], bool]) -> torch.Tensor:
        try:
            raws = self.decode_raw(i, keep)
            extra = [(j, raw) for j, raw in raws if j != i]
            frame = self.finish_frame(i, next(raw for j, raw in raws if j == i))
        except BaseException:
            with self._cv:
                self._pending.discard(i)
                self._cv.notify_all()
            raise
        with self._cv:
            self._store(i, frame)
            self._pending.update(j for j, _ in extra)
        for j, raw in extra:  # frames just ahead (reverse walk): finish them off-thread
            if self._pool is not None:
                self._pool.submit(self._finish_async, j, raw)
            else:
                self._finish_async(j, raw)
        return frame

    # -- lifetime ----------------------------------------------------------------------------------
    def _stop_workers(self) -> None:
        with self._cv:
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10.0)
        if self._pool is not None:
            self._pool.shutdown(wait=threading.current_thread() not in _pool_threads(self._pool))

    def _release(self) -> None:
        if self._feed is not None:
            self._feed.close()
        with self._cv:
            self._cache.clear()
            self._pending.clear()


def _submitter(ref: "weakref.ref[LazyFrames]") -> Callable[..., Any]:
    """``submit`` on the source's pool, holding the source weakly: a bound method would make
    a cycle, and the prefetch thread (which holds the source during its waits) would keep
    the garbage collector from ever finding the dropped source unreferenced."""
    def submit(fn: Callable[..., Any], *args: Any) -> Any:
        src = ref()
        pool = None if src is None else src._pool
        return None if pool is None else pool.submit(fn, *args)
    return submit


def _pool_threads(pool: ThreadPoolExecutor) -> set[threading.Thread]:
    return set(getattr(pool, "_threads", ()))


def _prefetch_main(ref: "weakref.ref[LazyFrames]") -> None:
    """Prefetch thread body. Holds the source only during a step, so that a source the
    caller dropped without ``close()`` is still garbage-collected (and then closed)."""
    while True:
        src = ref()
        if src is None or not src._prefetch_once(wait_s=0.25):
            return
        del src
