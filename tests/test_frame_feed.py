"""The frame feed (sam2_fast.video.frames_feed): the next frame prepared ahead; on CUDA a
pinned ring and asynchronous uploads, checked here on the CPU with fake events."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from sam2_fast.video.frames import LazyFrames, open_frames

av = pytest.importorskip("av")
from frames_harness import MEAN, STD  # noqa: E402
from frames_harness import moving_frames as _moving, write_small_mp4  # noqa: E402


@pytest.fixture(scope="module")
def small_mp4(tmp_path_factory):
    return write_small_mp4(str(tmp_path_factory.mktemp("vid") / "clip.mp4"))


# ----------------------------------------------------------------------------- frame feed
# (sam2_fast.video.frames_feed: the next frame prepared ahead; CUDA: pinned ring + async copy)
from sam2_fast.video.frames_base import Normalizer  # noqa: E402
from sam2_fast.video.frames_feed import DeviceFeed, PinnedRing  # noqa: E402

EVERY_BYTE = torch.arange(3 * 256 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).view(3, 32, 32)


class _FakeEvent:
    """A copy that is still in flight until someone waits for it: it reads its source
    buffer only then (as a DMA engine reads a pinned buffer some time after the launch)."""

    def __init__(self, run=None) -> None:
        self._run, self.done = run, run is None

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        if not self.done:
            self._run()
            self.done = True


class _FakeOps:
    """CPU stand-in for CudaOps: deferred copies, the consumer 'stream' waits on the event."""

    pin = False

    def __init__(self) -> None:
        self.pending = 0

    def upload(self, host):
        dev = torch.empty_like(host)
        return dev, _FakeEvent(lambda: dev.copy_(host))

    def hand_over(self, dev, event) -> None:
        event.synchronize()


def test_normalize_variants_bitwise_equal_for_every_byte():
    norm = Normalizer(torch.device("cpu"), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    want = norm(EVERY_BYTE)  # the reference's float32 ops (torch, CPU)
    assert torch.equal(norm.in_numpy(EVERY_BYTE), want)
    assert torch.equal(norm.on_device(EVERY_BYTE), want)  # the CUDA table gather, run on CPU


def test_pinned_ring_never_hands_out_a_buffer_still_read():
    ring = PinnedRing(3, (2,), pin=False)
    events, seen = [], []
    for step in range(10):
        k, buf = ring.acquire()
        # whatever was recorded for this slot before must be complete by now
        assert all(ev.done for slot, ev in events if slot == k), step
        ev = _FakeEvent(lambda: None)
        ring.release(k, ev)
        events.append((k, ev))
        seen.append(k)
    assert seen[:4] == [0, 1, 2, 0] and ring.stalls == 7  # nothing ever completed by itself
    ring2 = PinnedRing(2, (2,), pin=False)
    k, _ = ring2.acquire()
    done = _FakeEvent()
    ring2.release(k, done)
    ring2.acquire(), ring2.acquire()
    assert ring2.stalls == 0  # a completed copy frees its slot without a wait


def _feed_pattern() -> list[int]:
    rng = random.Random(11)
    # jumps leave uploads issued ahead unconsumed while their ring slot comes round again
    return [0, 1, 2, 5, 1, 6, 7, 3, 4, 9, 2, 30, 31, 32, 10] + [rng.randrange(40) for _ in range(25)]


def _walk_with_fake_device_feed(path: str, ring: int, ahead: int) -> tuple[list[torch.Tensor], DeviceFeed]:
    src = open_frames(path, 24, prefetch=4, workers=2)
    feed = src._feed = DeviceFeed(src._normalize, (3, 24, 24), ring_size=ring, ops=_FakeOps(), ahead=ahead)
    got, prev = [], 0
    try:
        for i in _feed_pattern():
            _settle(src, i, reverse=i < prev)  # the next frame is cached: get(i) uploads it ahead
            got.append(src[i])
            prev = i
        return got, feed
    finally:
        src.close()


def _settle(src: LazyFrames, i: int, reverse: bool) -> None:
    import time

    src.hint(i, reverse=reverse)
    for _ in range(200):
        with src._cv:
            if not src._pending and src._next_target() is None:
                return
        time.sleep(0.01)


def test_device_feed_frames_bitwise_equal_plain_with_async_copies(small_mp4):
    with open_frames(small_mp4, 24, prefetch=0, fast_feed=False) as plain:
        want = [plain[i] for i in _feed_pattern()]
    got, feed = _walk_with_fake_device_feed(small_mp4, ring=2, ahead=2)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert feed.hits >= 8 and feed.stalls > 0  # uploads ahead were used and the ring did wait


def test_mutation_ring_ignoring_events_is_caught(small_mp4, monkeypatch):
    def careless_acquire(self):  # planted bug: reuse a buffer whose copy has not run yet
        k = self._next
        self._next = (k + 1) % len(self.buffers)
        return k, self.buffers[k]

    monkeypatch.setattr(PinnedRing, "acquire", careless_acquire)
    with open_frames(small_mp4, 24, prefetch=0, fast_feed=False) as plain:
        want = [plain[i] for i in _feed_pattern()]
    got, _ = _walk_with_fake_device_feed(small_mp4, ring=2, ahead=2)
    assert not all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("workers", [1, 3])
def test_host_feed_frames_bitwise_equal_plain(small_mp4, workers):
    pattern = list(range(40)) + list(range(39, -1, -1)) + _feed_pattern()
    with open_frames(small_mp4, 32, prefetch=0, fast_feed=False) as plain:
        want = {i: plain[i] for i in set(pattern)}
    with open_frames(small_mp4, 32, prefetch=0) as src:
        assert src._feed is None  # no workers: the plain path
    with open_frames(small_mp4, 32, prefetch=5, workers=workers) as src:
        assert src._feed is not None
        for i in pattern:  # tight loop: whatever the prefetcher managed, same bits
            assert torch.equal(src[i], want[i]), i
        before = src._feed.hits
        for i in range(40):  # the next frame cached each time: served from frames done ahead
            _settle(src, i, reverse=False)
            assert torch.equal(src[i], want[i]), i
        assert src._feed.hits - before >= 35


def test_mutation_fused_normalisation_is_caught(small_mp4, monkeypatch):
    # x * 1/(255 std) - mean/std is 2 ops instead of 4 but not bitwise the reference's
    scale = (1.0 / (255.0 * STD)).numpy().astype(np.float32)
    shift = (-MEAN / STD).numpy().astype(np.float32)

    def fused(self, frame_u8):
        return torch.from_numpy(frame_u8.numpy().astype(np.float32) * scale + shift)

    monkeypatch.setattr(Normalizer, "in_numpy", fused)
    with open_frames(small_mp4, 32, prefetch=0, fast_feed=False) as plain:
        want = [plain[i] for i in range(8)]
    with open_frames(small_mp4, 32, prefetch=3) as src:
        got = [src[i] for i in range(8)]
    assert not all(torch.equal(g, w) for g, w in zip(got, want))


def test_feed_default_is_on_for_cpu_and_opt_in_for_cuda(monkeypatch):
    from sam2_fast.video import frames_lazy

    monkeypatch.delenv(frames_lazy.FEED_ENV, raising=False)
    assert frames_lazy.feed_default("cpu") and not frames_lazy.feed_default("cuda")
    monkeypatch.setenv(frames_lazy.FEED_ENV, "1")
    assert frames_lazy.feed_default("cuda")
    with open_frames(_moving(3, 8, 8), 8, "cpu", prefetch=2) as src:  # the CPU default takes the feed
        assert src._feed is not None


def test_background_readers_are_stopped_before_the_interpreter_exits(small_mp4, monkeypatch):
    """Sources left open (a session abandoned after a tracking error) and their daemon
    readers are closed and joined by a threading exit hook. Without it about half the runs of
    such a test aborted at exit ("terminate called without an active exception", status 134):
    a daemon thread killed inside a C++ call. A source closed from its own reader thread (on
    garbage collection) leaves that thread finishing its step: it is joined as well."""
    import threading
    import time

    from sam2_fast.video import frames_base

    if hasattr(threading, "_threading_atexits"):  # run in reverse: ours before the pools' shutdown
        hooks = [getattr(f, "func", f) for f in threading._threading_atexits]
        assert frames_base._close_open in hooks
        names = [h.__name__ for h in hooks]
        assert "_python_exit" not in names or names.index("_python_exit") < hooks.index(frames_base._close_open)
    open_src = open_frames(small_mp4, 64, "cpu", prefetch=4)
    closed_src = open_frames(small_mp4, 64, "cpu", prefetch=4)
    readers = (open_src._thread, closed_src._thread)
    assert all(t is not None and t.is_alive() for t in readers)
    with monkeypatch.context() as m:  # as a close from the reader itself does: no join
        m.setattr(threading, "current_thread", lambda: closed_src._thread)
        closed_src.close()
    busy = threading.Thread(target=time.sleep, args=(0.3,), daemon=True)  # a reader mid-step
    busy.start()
    frames_base.close_at_exit(closed_src, busy)
    frames_base._close_open()
    assert open_src._closed and closed_src._closed
    assert not any(t.is_alive() for t in readers + (busy,))
