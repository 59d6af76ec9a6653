"""Video frame sources: reference numerics, random access into videos, bounded memory, errors."""

from __future__ import annotations

import os
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import sam2_fast.video.frames_base as frames_base
from sam2_fast.video.frames import (FrameIndexError, FrameSourceError, LazyFrames,
                                    PreloadedFrames, VideoNotFoundError,
                                    normalize_lut, open_frames)

av = pytest.importorskip("av")

BIKES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "bikes.mp4")
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def _ref_frames(folder: str, size: int) -> tuple[torch.Tensor, int, int]:
    from sam2.utils.misc import load_video_frames as ref_load
    return ref_load(folder, size, offload_video_to_cpu=True, compute_device=torch.device("cpu"))


def _expected(rgb: np.ndarray, size: int) -> torch.Tensor:
    """The reference's per-frame maths (PIL resize, /255 in float64, float32 normalisation)."""
    arr = np.array(Image.fromarray(rgb).convert("RGB").resize((size, size))) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32)
    return (x - MEAN) / STD


def _moving(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(n, h, w, 3) uint8 smooth moving pattern plus noise (codecs keep it distinct)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = [np.stack([(xx * 5 + t * 7) % 256, (yy * 7 + t * 3) % 256, ((xx + yy + t) * 4) % 256], -1)
           for t in range(n)]
    noise = rng.integers(0, 24, (n, h, w, 3))
    return np.clip(np.stack(out) + noise, 0, 255).astype(np.uint8)


def _write_video(path: str, frames: np.ndarray, codec: str = "libx264", gop: int = 6) -> None:
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


def _decode_all(path: str) -> list[np.ndarray]:
    with av.open(path) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _write_jpegs(folder, frames: np.ndarray, names: list[str], fmt: str = "JPEG") -> None:
    for arr, name in zip(frames, names):
        Image.fromarray(arr).save(os.path.join(folder, name), format=fmt)


# ----------------------------------------------------------------------------- numerics
def test_lut_matches_reference_float_ops():
    lut = normalize_lut((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    k = torch.from_numpy(np.arange(256) / 255.0).to(torch.float32)
    assert torch.equal(lut, (k[None] - MEAN[:, :, 0]) / STD[:, :, 0])
    # a float32 x / 255 agrees with the reference's float64 division for every byte value
    assert torch.equal(torch.arange(256, dtype=torch.float32) / 255, k)


def test_jpeg_folder_matches_reference(tmp_path):
    frames = _moving(6, 37, 53)
    names = ["7.jpg", "0.JPG", "10.jpeg", "2.JPEG", "3.jpg", "11.jpg"]  # int order, mixed case
    _write_jpegs(tmp_path, frames, names)
    (tmp_path / "notes.txt").write_text("not a frame")
    ref, h, w = _ref_frames(str(tmp_path), 67)
    with open_frames(str(tmp_path), 67, "cpu") as src:
        assert (len(src), src.video_height, src.video_width) == (6, h, w) == (6, 37, 53)
        ours = torch.stack([src[i] for i in range(len(src))])
    assert ours.dtype == torch.float32 and ours.shape == (6, 3, 67, 67)
    assert torch.equal(ours, ref), (ours - ref).abs().max()


def test_jpeg_folder_preload_and_async_match_reference(tmp_path):
    _write_jpegs(tmp_path, _moving(5, 29, 41, seed=3), [f"{i:05d}.jpg" for i in range(5)])
    ref, _, _ = _ref_frames(str(tmp_path), 45)
    for async_loading in (False, True):
        with open_frames(str(tmp_path), 45, preload_all=True, async_loading=async_loading) as src:
            assert isinstance(src, PreloadedFrames)
            assert torch.equal(torch.stack(list(src)), ref)


def test_mutation_wrong_resize_filter_fails_by_wide_margin(tmp_path, monkeypatch):
    _write_jpegs(tmp_path, _moving(3, 37, 53, seed=5), ["0.jpg", "1.jpg", "2.jpg"])
    ref, _, _ = _ref_frames(str(tmp_path), 67)

    def bilinear(pil_rgb, size):
        arr = np.asarray(pil_rgb.resize((size, size), Image.BILINEAR))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    monkeypatch.setattr(frames_base, "resize_u8", bilinear)
    with open_frames(str(tmp_path), 67, prefetch=0) as src:
        ours = torch.stack(list(src))
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel > 1e-2, rel  # >= 10^4 x the parity bound (exact)


def test_mutation_lexicographic_order_is_caught(tmp_path):
    frames = _moving(12, 16, 16, seed=1)
    _write_jpegs(tmp_path, frames, [f"{i}.jpg" for i in range(12)], "PNG")
    with open_frames(str(tmp_path), 16, prefetch=0) as src:
        ours = torch.stack(list(src))
    by_int = torch.stack([_expected(f, 16) for f in frames])
    by_name = torch.stack([_expected(frames[int(n)], 16) for n in sorted(str(i) for i in range(12))])
    assert torch.equal(ours, by_int)
    assert ((by_name - by_int).norm() / by_int.norm()).item() > 0.1


# ----------------------------------------------------------------------------- arrays
def test_array_sources_match_reference_numerics(tmp_path):
    frames = _moving(4, 23, 31, seed=2)
    # Lossless PNG data under .jpg names: the reference reads the exact same pixels.
    _write_jpegs(tmp_path, frames, [f"{i}.jpg" for i in range(4)], fmt="PNG")
    ref, _, _ = _ref_frames(str(tmp_path), 19)
    for given in (frames, list(frames), torch.from_numpy(frames), [torch.from_numpy(f) for f in frames]):
        with open_frames(given, 19, "cpu") as src:
            assert (src.video_height, src.video_width) == (23, 31)
            assert torch.equal(torch.stack(list(src)), ref)


def test_grayscale_and_rgba_frames_are_converted():
    rgb = _moving(3, 11, 13)
    gray = rgb[..., 0]
    with open_frames(list(gray), 9, prefetch=0) as src:
        assert torch.equal(src[1], _expected(np.repeat(gray[1][..., None], 3, -1), 9))
    with open_frames(gray[..., None], 9, prefetch=0) as src:
        assert torch.equal(src[2], _expected(np.repeat(gray[2][..., None], 3, -1), 9))
    rgba = np.concatenate([rgb, np.full_like(rgb[..., :1], 7)], -1)
    with open_frames(rgba, 9, prefetch=0) as src:
        assert torch.equal(src[0], _expected(rgb[0], 9))


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 8, 8, 3), np.float32) + 0.5, "dtype float32"),
    (np.ones((8, 8, 3), np.uint8), "single image"),
    (np.ones((2, 8, 8, 2), np.uint8), "2 channels"),
    ([np.ones((8, 8, 3), np.uint8), np.ones((8, 8, 5), np.uint8)], "frame 1 has 5 channels"),
    ([np.ones((8, 8, 3), np.uint8)] * 3 + [np.ones((8, 9, 3), np.uint8)], "frame 3 has shape"),
    ([np.ones((8, 8, 3), np.uint8), np.ones((1, 8, 8, 3), np.uint8)], "frame 1 has shape"),
    ([np.ones((8, 8, 3), np.uint8), "x"], "frame 1 is a str"),
    ([], "empty"),
    (np.zeros((0, 8, 8, 3), np.uint8), "empty"),
    (12345, "unsupported video_path"),
])
def test_bad_arrays_raise_clear_errors(bad, match):
    with pytest.raises(FrameSourceError, match=match):
        open_frames(bad, 16)


# ----------------------------------------------------------------------------- video files
@pytest.fixture(scope="module")
def small_mp4(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vid") / "clip.mp4")
    _write_video(path, _moving(40, 32, 48, seed=4), gop=9)
    return path


def test_mp4_has_bframes_and_random_access_matches_sequential(small_mp4):
    with av.open(small_mp4) as c:
        order = [p.pts for p in c.demux(video=0) if p.size]
    assert order != sorted(order), "test clip should reorder frames (B-frames)"
    decoded = _decode_all(small_mp4)
    want = [_expected(f, 24) for f in decoded]
    rng = random.Random(0)
    visits = [39, 0, 17, 16, 18, 9, 8, 30, 31, 5] + rng.sample(range(40), 15) + list(range(39, -1, -1))
    with open_frames(small_mp4, 24, "cpu", prefetch=3) as src:
        assert (len(src), src.video_height, src.video_width) == (40, 32, 48)
        for i in visits:
            assert torch.equal(src[i], want[i]), i
        assert src.peak_resident <= src.cache_size


@pytest.mark.parametrize("ext, codec", [("avi", "mpeg4"), ("mov", "mpeg4"), ("mkv", "libx264"),
                                        ("webm", "libvpx-vp9"), ("MP4", "libx264")])
def test_other_containers(tmp_path, ext, codec):
    path = str(tmp_path / f"clip.{ext}")
    _write_video(path, _moving(12, 16, 24, seed=6), codec=codec, gop=5)
    decoded = _decode_all(path)
    with open_frames(path, 16, prefetch=2) as src:
        assert len(src) == len(decoded) == 12
        for i in (11, 3, 4, 0, 7):
            assert torch.equal(src[i], _expected(decoded[i], 16)), i


def test_video_bytes_and_preload(small_mp4):
    decoded = _decode_all(small_mp4)
    with open(small_mp4, "rb") as f:
        data = f.read()
    with open_frames(data, 20, preload_all=True) as src:
        assert src.num_resident == len(src) == 40
        assert torch.equal(src[33], _expected(decoded[33], 20))


def test_reverse_walk_decodes_each_gop_once(small_mp4, monkeypatch):
    calls = []
    with open_frames(small_mp4, 16, prefetch=0, cache_size=12) as src:
        real = src._decoder._decode_from

        def logged(key):  # log when the seek really happens (plans are built lazily)
            calls.append(key)
            yield from real(key)

        monkeypatch.setattr(src._decoder, "_decode_from", logged)
        for i in range(39, -1, -1):
            src[i]
    # 40 frames, keyframes every 9: one seek per GOP (5), not one per frame
    assert len(calls) <= 6, calls


@pytest.mark.skipif(not os.path.exists(BIKES), reason="shared/data/bikes.mp4 not present")
def test_bikes_mp4():
    decoded = _decode_all(BIKES)
    with open_frames(BIKES, 32, "cpu", offload_video_to_cpu=True, prefetch=4) as src:
        assert (len(src), src.video_height, src.video_width) == (len(decoded), 272, 640)
        for i in (0, 1, 2, len(src) - 1, 100, 29, 30, 31, 200):
            assert torch.equal(src[i], _expected(decoded[i], 32)), i


# ----------------------------------------------------------------------------- memory, API
def test_2000_frames_sequential_stays_bounded():
    frames = np.random.default_rng(0).integers(0, 256, (2000, 6, 5, 3), dtype=np.uint8)
    with open_frames(frames, 8, prefetch=6) as src:
        assert isinstance(src, LazyFrames) and src.cache_size == 10
        for i in range(len(src)):
            x = src[i]
            assert src.num_resident <= src.cache_size
        assert torch.equal(x, _expected(frames[-1], 8))
        assert src.peak_resident <= src.cache_size
    assert src.num_resident == 0  # closed: nothing held


def test_long_video_reverse_stays_bounded(tmp_path):
    path = str(tmp_path / "long.mp4")
    _write_video(path, _moving(300, 16, 16, seed=8), gop=25)
    with open_frames(path, 8, prefetch=4) as src:
        for i in range(len(src) - 1, -1, -1):
            src[i]
        assert len(src) == 300 and src.peak_resident <= src.cache_size == 8


def test_frame_source_index_rules(tmp_path):
    # (the official-shaped ``load_video_frames`` lives in sam2_fast.utils.misc, tested with
    # the drop-in items; this is the lazy source it and the predictor open)
    frames = _moving(5, 10, 12)
    src = open_frames(frames, 8, "cpu", offload_video_to_cpu=True)
    with src:
        assert (src.video_height, src.video_width) == (10, 12)
        assert torch.equal(src[-1], src[4]) and torch.equal(src[np.int64(2)], _expected(frames[2], 8))
        with pytest.raises(FrameIndexError, match="out of range"):
            src[5]
        with pytest.raises(IndexError):
            src[-6]
        with pytest.raises(FrameSourceError, match="must be an int"):
            src[1.0]
        assert list(iter(src))[3].shape == (3, 8, 8)
    with pytest.raises(FrameSourceError, match="closed"):
        src[0]


def test_path_errors(tmp_path):
    with pytest.raises(VideoNotFoundError, match="does not exist") as e:
        open_frames(str(tmp_path / "nope.mp4"), 16)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    with pytest.raises(FrameSourceError, match="is empty"):
        open_frames(str(tmp_path), 16)
    Image.fromarray(_moving(1, 8, 8)[0]).save(tmp_path / "0.png")
    with pytest.raises(FrameSourceError, match="no JPEG frames"):
        open_frames(str(tmp_path), 16)
    Image.fromarray(_moving(1, 8, 8)[0]).save(tmp_path / "first.jpg")
    with pytest.raises(FrameSourceError, match="no integer file name"):
        open_frames(str(tmp_path), 16)


def test_mixed_and_corrupt_jpegs(tmp_path):
    _write_jpegs(tmp_path, _moving(3, 8, 8), ["0.jpg", "1.jpg", "2.jpg"])
    Image.fromarray(_moving(1, 9, 8)[0]).save(tmp_path / "3.jpg")
    (tmp_path / "4.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with open_frames(str(tmp_path), 8, prefetch=0) as src:
        src[2]
        with pytest.raises(FrameSourceError, match="frame 3 .* is 8x9 but frame 0 is 8x8"):
            src[3]
        with pytest.raises(FrameSourceError, match="cannot read JPEG frame 4"):
            src[4]
        assert src[1].shape == (3, 8, 8)  # still usable after the errors


def test_bad_video_files(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(FrameSourceError, match="0 bytes"):
        open_frames(str(empty), 16)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(FrameSourceError, match="cannot open video"):
        open_frames(str(junk), 16)
    # A container cut right after its header: streams are declared, no packet survives.
    clip = str(tmp_path / "clip.mkv")
    _write_video(clip, _moving(10, 16, 16), gop=5)
    data = open(clip, "rb").read()
    messages = set()
    for n in range(100, len(data) // 2, 23):
        (tmp_path / "cut.mkv").write_bytes(data[:n])
        try:
            open_frames(str(tmp_path / "cut.mkv"), 16, prefetch=0).close()
        except FrameSourceError as e:  # any other exception type fails the test
            messages.add(str(e).split(":")[0].split("'")[-1].strip())
    assert "has zero frames" in messages, messages
    with pytest.raises(FrameSourceError, match="single image"):
        img = tmp_path / "one.jpg"
        Image.fromarray(_moving(1, 8, 8)[0]).save(img)
        open_frames(str(img), 16)


def test_truncated_video_reports_the_decodable_frames(tmp_path, small_mp4):
    """Issue 9 item 8. Index at the end (PyAV's default): a cut file loses it, a clear error
    at open. Index first (faststart, as streamed files): the cut file opens, the partial
    last packet and the frames waiting on it are dropped from ``len`` with a warning, and
    every frame left decodes to the full file's frame."""
    data = open(small_mp4, "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(FrameSourceError, match="cannot open video"):
        open_frames(str(cut), 16, prefetch=0)

    fast = str(tmp_path / "fast.mp4")
    with av.open(small_mp4) as src, av.open(fast, "w", options={"movflags": "faststart"}) as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)
    full = _decode_all(fast)
    assert len(full) == 40
    data = open(fast, "rb").read()
    for frac in (0.45, 0.8):
        cut.write_bytes(data[: int(len(data) * frac)])
        with pytest.warns(UserWarning, match="frames are indexed but only the first"):
            src = open_frames(str(cut), 16, prefetch=2)
        with src:
            n = len(src)
            assert 0 < n < 40 and src._decoder.dropped_tail > 0
            for i in list(range(n - 1, -1, -1)) + [n - 1, 0]:
                assert torch.equal(src[i], _expected(full[i], 16)), (frac, i)
            with pytest.raises(FrameIndexError):
                src[n]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the complete faststart file: nothing trimmed, no warning
        with open_frames(fast, 16, prefetch=0) as src:
            assert len(src) == 40 and src._decoder.dropped_tail == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fast_feed", [None, True, False])
def test_cuda_frames_bitwise_equal_cpu(small_mp4, fast_feed):
    # True: the pinned-ring / async-upload feed (opt-in on CUDA until this has passed and
    # bench_frame_feed.py has timed it on a GPU); None: the default
    with open_frames(small_mp4, 64, "cuda", fast_feed=fast_feed) as gpu, open_frames(small_mp4, 64, "cpu") as cpu:
        for i in (0, 5, 39, 12, 13, 14, 2):
            g = gpu[i]
            assert g.is_cuda and torch.equal(g.cpu(), cpu[i])
    with open_frames(small_mp4, 64, "cuda", offload_video_to_cpu=True) as off:
        assert off[3].device.type == "cpu"


def test_cpu_arithmetic_equals_table_for_every_byte():
    frame = torch.arange(256 * 60, dtype=torch.int64).remainder(256).to(torch.uint8).view(3, 64, 80)
    with open_frames(_moving(2, 8, 8), 8, prefetch=0) as src:
        by_ops = src.normalize(frame)  # CPU: in-place float32 ops
    lut = normalize_lut((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    by_table = lut.view(-1)[frame.long() + (torch.arange(3) * 256)[:, None, None]]
    assert torch.equal(by_ops, by_table)


def test_many_workers_any_access_pattern(small_mp4):
    decoded = _decode_all(small_mp4)
    want = [_expected(f, 20) for f in decoded]
    rng = random.Random(5)
    pattern = list(range(40)) + list(range(39, -1, -1)) + [rng.randrange(40) for _ in range(30)]
    with open_frames(small_mp4, 20, prefetch=5, cache_size=7, workers=3) as src:
        src.hint(20, reverse=True)
        for i in pattern:
            assert torch.equal(src[i], want[i]), i
            assert src.num_resident <= 7
        assert src.peak_resident <= 7


def test_dropped_source_releases_its_thread(small_mp4):
    import gc
    import threading
    import time

    src = open_frames(small_mp4, 16, prefetch=3)
    thread = src._thread
    src[5]
    del src
    for _ in range(100):  # the prefetch thread holds the source only between steps
        gc.collect()
        if not thread.is_alive():
            break
        time.sleep(0.05)
    assert not thread.is_alive()
    assert threading.active_count() < 50


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
