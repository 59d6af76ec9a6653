"""``StreamingTracker`` frame input: every frame type gives the video predictor's pixels,
a video path streams, the background reader stays bounded, and device-side preprocessing
is bitwise the host's (PIL's) resize. Model and clip: ``stream_harness``.
"""

from __future__ import annotations

import threading

import av
import numpy as np
import pytest
import torch
from PIL import Image

import video_utils as V
from cli_harness import write_mp4
from stream_harness import CLIP_HW, S, stream_fixtures

predictor, clip = stream_fixtures()


# ---------------------------------------------------------------------- frame types
def test_frame_types_give_the_video_predictors_pixels(tmp_path, clip):
    from sam2_fast.video.frames import open_frames
    from sam2_fast.video.frames_stream import prepare_frame

    rgb = clip[5]
    with open_frames(clip, S, "cpu", prefetch=0) as src:
        want = src.load_u8(5)  # what init_state would feed the model
    variants = {
        "numpy": prepare_frame(rgb, S),
        "torch HWC": prepare_frame(torch.from_numpy(rgb), S),
        "torch CHW": prepare_frame(torch.from_numpy(rgb).permute(2, 0, 1), S),
        "PIL": prepare_frame(Image.fromarray(rgb), S),
        "cv2 BGR": prepare_frame(np.ascontiguousarray(rgb[..., ::-1]), S, color="bgr"),
    }
    for name, frame in variants.items():
        assert (frame.height, frame.width) == CLIP_HW, name
        assert torch.equal(frame.pixels, want), f"{name} frames are preprocessed differently"
    assert not torch.equal(prepare_frame(rgb[..., ::-1], S, color="rgb").pixels, want)

    path = write_mp4(str(tmp_path / "clip.mp4"), np.ascontiguousarray(clip[:4, :74, :100]))  # even sizes: yuv420p
    with open_frames(path, S, "cpu", prefetch=0) as src, av.open(path) as c:
        for i, frame in enumerate(c.decode(video=0)):
            assert torch.equal(prepare_frame(frame, S).pixels, src.load_u8(i)), f"PyAV frame {i}"


def test_stream_reads_a_video_path(predictor, tmp_path, clip):
    from sam2_fast.stream import StreamingTracker

    path = write_mp4(str(tmp_path / "clip.mp4"), np.ascontiguousarray(clip[:4, :74, :100]))  # even sizes: yuv420p
    a, b = StreamingTracker(predictor), StreamingTracker(predictor)
    from_path = []
    for f, _, masks in a.stream(path):
        if f == 0:
            a.add_new_prompt(0, 1, points=[[30, 35]], labels=[1])
        from_path.append(masks.clone())
    with av.open(path) as c:
        frames = [fr.to_image() for fr in c.decode(video=0)]
    b.load_first_frame(frames[0])
    b.add_new_prompt(0, 1, points=[[30, 35]], labels=[1])
    by_track = [b.track(fr)[1] for fr in frames[1:]]
    assert len(from_path) == 4 and a.frame_idx == 3
    assert all(torch.equal(x, y) for x, y in zip(from_path[1:], by_track))
    from sam2_fast.stream import StreamFrameError

    with pytest.raises(StreamFrameError, match="cannot open video .*nope.mp4"):
        next(iter(b.stream(str(tmp_path / "nope.mp4"))))
    assert b.frame_idx == 3


# ---------------------------------------------------------------------- background reading
def test_prefetcher_reads_ahead_boundedly_and_stops():
    from sam2_fast.video.frames_stream import FramePrefetcher

    pulled = []

    def source():
        for t in range(1000):
            pulled.append(t)
            yield np.full((8, 8, 3), t % 256, np.uint8)

    reader = FramePrefetcher(source(), 16, "rgb", depth=3)
    it = iter(reader)
    first = next(it)
    assert first.pixels.shape == (3, 16, 16) and int(first.pixels[0, 0, 0]) == 0
    threading.Event().wait(0.3)  # let the reader run ahead as far as it may
    assert len(pulled) <= 1 + 3 + 1, f"read {len(pulled)} frames ahead with a queue of 3"
    reader.close()
    assert not reader._thread.is_alive()


# ---------------------------------------------------------------------- device-side preprocessing
@pytest.mark.parametrize("h,w,size", [(75, 101, 64), (75, 101, 128), (17, 23, 64), (64, 300, 64), (300, 64, 128),
                                      (383, 256, 64), (246, 98, 64), (64, 90, 64)])
def test_device_resize_is_bitwise_pil(h, w, size):
    """PIL's fixed-point bicubic replayed in float64 (exact), in the pass order PIL uses for
    the size: the same bytes as the host path on smooth frames and on noise, downscaling and
    upscaling, one pass or two. The other pass order is not (where both passes run)."""
    from sam2_fast.video.frames_base import pil_pass_order, resize_u8_on_device
    from sam2_fast.video.frames_stream import prepare_frame

    order = pil_pass_order(h, w, size)
    assert order is not None
    frames = [V.make_clip(1, h, w, seed=2)[0], np.random.default_rng(h * w).integers(0, 256, (h, w, 3), np.uint8)]
    for frame in frames:
        want = prepare_frame(frame, size).pixels
        got = resize_u8_on_device(torch.from_numpy(frame), size, order)
        assert torch.equal(got, want), f"{h}x{w}->{size}: max diff {(got.int() - want.int()).abs().max()}"
    if h != size and w != size:  # planted bug: the other order (the intermediate is rounded)
        assert not torch.equal(resize_u8_on_device(torch.from_numpy(frames[1]), size, not order),
                               prepare_frame(frames[1], size).pixels)


def test_mutation_device_resize_rounding_is_caught(monkeypatch):
    """Planted bug: PIL's rounding offset (+2^21 before the shift) left out."""
    import sam2_fast.video.frames_base as B
    from sam2_fast.video.frames_stream import prepare_frame

    monkeypatch.setattr(B, "_pil_round", lambda acc: torch.floor(acc / (1 << B._PIL_PRECISION_BITS)).clamp_(0, 255))
    frame = np.random.default_rng(0).integers(0, 256, (75, 101, 3), np.uint8)
    assert not any(torch.equal(B.resize_u8_on_device(torch.from_numpy(frame), 64, order),
                               prepare_frame(frame, 64).pixels) for order in (True, False))


def test_device_resize_falls_back_to_the_host_when_pil_cannot_be_matched(monkeypatch):
    import sam2_fast.video.frames_stream as FS

    monkeypatch.setattr(FS, "pil_pass_order", lambda *a: None)
    frame = V.make_clip(1, 75, 101, seed=3)[0]
    store = FS.StreamFrames(64, 75, 101, torch.device("cpu"))
    with pytest.warns(UserWarning, match="resizing on the host instead"):
        store.put(0, FS.prepare_frame(frame, 64, on_device=True))
    host = FS.StreamFrames(64, 75, 101, torch.device("cpu"))
    host.put(0, FS.prepare_frame(frame, 64))
    assert torch.equal(store[0], host[0])


def test_device_preprocessing_stream_equals_host(predictor, clip):
    from sam2_fast.stream import StreamingTracker

    runs = {}
    for mode in ("host", "device"):
        tracker = StreamingTracker(predictor, preprocess=mode)
        tracker.load_first_frame(torch.from_numpy(clip[0]))
        masks = [tracker.add_new_prompt(0, 1, points=[[30, 35]], labels=[1])[2]]
        masks += [tracker.track(Image.fromarray(clip[t]) if t % 2 else clip[t])[1] for t in range(1, 5)]
        runs[mode] = masks
    assert all(torch.equal(a, b) for a, b in zip(runs["host"], runs["device"]))
    with pytest.raises(ValueError, match="preprocess must be one of"):
        StreamingTracker(predictor, preprocess="gpu")
