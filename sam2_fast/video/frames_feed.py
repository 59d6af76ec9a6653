"""Frame feed of a lazy frame source: the next frame prepared ahead, off the caller's path.

On the CPU (``HostFeed``): the next frame is normalised on a resize worker while the tracker
works on this one, in numpy (single-threaded: the torch ops' intra-op pool stalled ~32 ms at
p90 behind the resize threads on the 2-core machine). On CUDA (``DeviceFeed``), below.

Why: on the first H200 run (tiny @480p, 1 object, eager bf16) our tracking loop spent
~3.6 ms per frame outside the model stages against ~0.3 ms for the reference, which preloads
every frame on the device. The old feed uploaded the cached uint8 frame with
``frame_u8.to(cuda, non_blocking=True)`` from *pageable* memory: CUDA then stages the copy
through a driver buffer and first waits for the stream to drain, so the host sat idle until
the GPU had finished all the model work it had queued, every frame (no CPU/GPU overlap).

Here (all on the caller's thread, under one lock):

* the cached uint8 frame is copied into one of a small ring of *pinned* host buffers
  (``np.copyto``, 0.066 ms at 1024 px on the 2-core machine; for a pageable source the
  driver made the same staging copy) and the H2D copy is queued on a side stream with ``non_blocking=True``, which
  from pinned memory is truly asynchronous. An event is recorded after it;
* a ring slot is written again only after the event of its last copy completed
  (``PinnedRing``): the buffer must live until the DMA engine has read it;
* after handing out frame ``t`` the source uploads the next frame in the direction of
  travel when its bytes are already cached (``stage``; never waits for the prefetcher for a
  frame nobody asked for yet), so its copy overlaps frame ``t``'s compute;
* the consumer's stream waits on the event (a device-side wait, no host sync) and
  normalises with :meth:`Normalizer.on_device` (cast + table gather, 2 kernels, bitwise
  the reference).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Optional

import numpy as np
import torch

from sam2_fast.video.frames_base import Normalizer


class PinnedRing:
    """``n`` host buffers of one shape, handed out round-robin; a buffer is handed out again
    only after the event recorded with its last use has completed (``query()`` True, else
    the caller blocks on ``synchronize()``, counted in ``stalls``)."""

    def __init__(self, n: int, shape: tuple[int, ...], pin: bool) -> None:
        if n < 1:
            raise ValueError(f"a pinned ring needs at least one buffer, got {n}")
        # pinned once here and reused for the source's lifetime: pinning is a driver call
        # (page locking) far slower than the copy itself
        self.buffers = [torch.empty(shape, dtype=torch.uint8, pin_memory=pin) for _ in range(n)]
        self._events: list[Any] = [None] * n
        self._next = 0
        self.stalls = 0

    def acquire(self) -> tuple[int, torch.Tensor]:
        k = self._next
        self._next = (k + 1) % len(self.buffers)
        ev = self._events[k]
        if ev is not None and not ev.query():
            self.stalls += 1
            ev.synchronize()  # its copy is still reading the buffer
        self._events[k] = None
        return k, self.buffers[k]

    def release(self, k: int, event: Any) -> None:
        """Buffer ``k`` is in use until ``event`` completes."""
        self._events[k] = event


class CudaOps:
    """The device side of the feed: a side copy stream, events, cross-stream hand-off."""

    pin = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def upload(self, host: torch.Tensor) -> tuple[torch.Tensor, Any]:
        with torch.cuda.stream(self.stream):
            # allocated on the copy stream: the allocator hands out a block that is free for
            # this stream (a block the compute stream freed may still be read by its kernels)
            dev = torch.empty(host.shape, dtype=host.dtype, device=self.device)
            dev.copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return dev, event

    def hand_over(self, dev: torch.Tensor, event: Any) -> None:
        cur = torch.cuda.current_stream(self.device)
        cur.wait_event(event)  # device-side wait: the host does not block
        dev.record_stream(cur)  # its block is not reused before the consumer's kernels ran


class _AheadFeed:
    """uint8 (3, S, S) CPU frames -> normalised float32 frames, the next one started ahead.

    ``get(idx, load)`` hands out frame ``idx`` (started ahead, or now from ``load()``);
    ``stage(idx, u8)`` starts frame ``idx`` for a later ``get``; at most ``ahead`` are kept
    started (the oldest is dropped: the caller moved elsewhere). Thread-safe.
    """

    def __init__(self, ahead: int = 1) -> None:
        self._ahead = max(0, int(ahead))
        self._staged: dict[int, Any] = {}  # idx -> handle of _start
        self._lock = threading.Lock()
        self.hits = 0  # frames handed out that were started ahead
        self.wait_s = 0.0  # time get() blocked on a frame started ahead

    def _start(self, u8: torch.Tensor) -> Any:
        raise NotImplementedError

    def _finish(self, handle: Any) -> torch.Tensor:
        raise NotImplementedError

    def _can_stage(self) -> bool:
        return self._ahead > 0

    def get(self, idx: int, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``load()`` (called without the lock: it may wait for the prefetcher) gives the
        uint8 CPU frame when it was not started ahead."""
        with self._lock:
            handle = self._staged.pop(idx, None)
        if handle is None:
            u8 = load()
            with self._lock:
                handle = self._start(u8)
        else:
            self.hits += 1
        return self._finish(handle)

    def wants(self, idx: int) -> bool:
        with self._lock:
            return self._can_stage() and idx not in self._staged

    def stage(self, idx: int, u8: torch.Tensor) -> None:
        with self._lock:
            if not self._can_stage() or idx in self._staged:
                return
            while len(self._staged) >= self._ahead:
                del self._staged[next(iter(self._staged))]
            self._staged[idx] = self._start(u8)

    def close(self) -> None:
        with self._lock:
            self._staged.clear()


class DeviceFeed(_AheadFeed):
    """CUDA: pinned ring, async upload on a side stream, normalised on the consumer's stream."""

    def __init__(self, normalizer: Normalizer, shape: tuple[int, ...], ring_size: int,
                 ops: Optional[Any] = None, ahead: int = 1) -> None:
        super().__init__(ahead)
        self._normalizer = normalizer
        self._ops = ops if ops is not None else CudaOps(normalizer.device)
        self._ring = PinnedRing(max(2, ring_size), shape, pin=self._ops.pin)
        self.uploads = 0

    @property
    def stalls(self) -> int:
        return self._ring.stalls

    def _start(self, u8: torch.Tensor) -> tuple[torch.Tensor, Any]:
        k, buf = self._ring.acquire()
        # numpy's copy is single-threaded: a torch copy_ of this size runs on the intra-op
        # pool, whose barrier can wait for a thread the resize threads keep off a core
        np.copyto(buf.numpy(), u8.numpy())
        dev, event = self._ops.upload(buf)
        self._ring.release(k, event)
        self.uploads += 1
        return dev, event

    def _finish(self, handle: tuple[torch.Tensor, Any]) -> torch.Tensor:
        with self._lock:
            self._ops.hand_over(*handle)
            return self._normalizer.on_device(handle[0])


class HostFeed(_AheadFeed):
    """CPU: the next frame is normalised on a worker thread (numpy: single-threaded, GIL
    released in its loops) while the tracker works on this one; ``submit`` is the source's
    thread pool (None: everything on the caller's thread)."""

    def __init__(self, normalizer: Normalizer, submit: Callable[..., Optional[Future]],
                 ahead: int = 1) -> None:
        super().__init__(ahead)
        self._normalizer = normalizer
        self._submit = submit

    def _start(self, u8: torch.Tensor) -> tuple[Optional[Future], torch.Tensor]:
        return None, u8  # a frame needed now is normalised by the caller (see _finish)

    def stage(self, idx: int, u8: torch.Tensor) -> None:
        with self._lock:
            if not self._can_stage() or idx in self._staged:
                return
            try:
                fut = self._submit(self._normalizer.in_numpy, u8)
            except RuntimeError:  # the pool is shut down (closing)
                fut = None
            if fut is None:
                return
            while len(self._staged) >= self._ahead:
                self._staged.pop(next(iter(self._staged)))[0].cancel()
            self._staged[idx] = (fut, u8)

    def _finish(self, handle: tuple[Optional[Future], torch.Tensor]) -> torch.Tensor:
        fut, u8 = handle
        # Not started yet (queued behind resizes: the pool is FIFO): do it here instead of
        # waiting (1 worker at 1024 px waited 7.8 ms per frame on average before this).
        if fut is not None and not fut.cancel():
            t0 = time.perf_counter()
            try:
                return fut.result()
            except Exception:  # cancelled by a pool shutdown: do it here
                pass
            finally:
                self.wait_s += time.perf_counter() - t0
        return self._normalizer.in_numpy(u8)
