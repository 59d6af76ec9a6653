"""A live stream in bounded memory: ``StreamingTracker`` over a long run of tiny frames.

A miniature SAM 2.1 (the real architecture with fewer, narrower layers, image_size 32) tracks
2 objects, the first prompted on frame 0 and the second added halfway. Checked:

* the tensor bytes the stream holds (its session: memories, outputs, prompts, current frame)
  and all tensors alive in the process (found through the garbage collector, so a leak
  outside the session counts too) are flat after warm-up: least-squares slope < 1 KiB/frame
  in each half, and no sample above the settled value;
* the process RSS stays bounded;
* every mask equals the video predictor's (``keep_outputs="reachable"``) on the same frames
  and prompts: propagate to the prompted frame, prompt, propagate on (measured: bitwise);
* with pruning switched off in the product code the same measurement grows (so it can fail).

Length: the issue asks for 3,000 frames. On the 2 shared CI cores one frame costs 13-40 ms
(depending on load) per run and the test runs the video predictor and the stream, so 3,000
frames took 172 s (48 s + 124 s, measured on a loaded machine);
the default is 600 frames (the windows of 16 frames are full after ~20, so both halves have
200 settled frames, sampled every 25) and ``SAM2_FAST_STREAM_FRAMES=3000`` runs the full length
(measured once, see benchmarks/NOTES.md "Streaming tracker").
"""

from __future__ import annotations

import dataclasses
import gc
import os
import warnings

import numpy as np
import pytest
import torch

import video_utils as V
from support import sensitize_

NUM_FRAMES = int(os.environ.get("SAM2_FAST_STREAM_FRAMES", "600"))
SECOND = NUM_FRAMES // 2  # the second object is added here
SAMPLE_EVERY = 25
# object-score bias: each object present on about half of its frames, absent on the rest
OBJ_SCORE_BIAS = 0.5
WARMUP = 100  # frames after a prompt before the memory / pointer windows (16 frames) are full
SLOPE_LIMIT = 1024.0  # bytes per frame
# RSS after warm-up, measured: +0.3 MiB over 1,400 frames, +1.9 MiB over 2,900 (allocator
# noise; tensors alive stay exactly flat); the bound is ~8x the 3,000-frame growth
RSS_LIMIT = 16 * 2**20


@pytest.fixture(scope="module")
def predictor():
    from sam2_fast.config import PRESETS, HieraConfig
    from sam2_fast.sam2_video_predictor import SAM2VideoPredictor

    trunk = HieraConfig(embed_dim=16, num_heads=1, stages=(1, 1, 1, 1), global_att_blocks=(2,),
                        window_spec=(8, 4, 4, 2), window_pos_embed_bkg_spatial_size=(2, 2))
    cfg = dataclasses.replace(PRESETS["sam2.1_hiera_tiny"], image_size=32, trunk=trunk, d_model=64,
                              mem_dim=32, mem_attn_layers=1, mem_attn_ffn_dim=64, fill_hole_area=8)
    with V.single_thread():
        torch.manual_seed(0)
        yield sensitize_(SAM2VideoPredictor(cfg), seed=0, obj_score_bias=OBJ_SCORE_BIAS).eval()


def _frame(t: int) -> np.ndarray:
    """(16, 16, 3) uint8: a bright square wandering over noise (drawn on the fly)."""
    frame = np.random.default_rng(t).integers(0, 120, (16, 16, 3), dtype=np.uint8)
    x, y = 2 + (t // 3) % 9, 3 + (t // 7) % 8
    frame[y : y + 5, x : x + 5] = 230
    return frame


def _is_tensor(obj) -> bool:
    try:
        return isinstance(obj, torch.Tensor)
    except ReferenceError:  # a weakref.proxy whose referent is gone (the session's frame view)
        return False


def _live_tensor_bytes() -> int:
    """Bytes of the distinct tensor storages reachable from Python (model weights included)."""
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance on deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if _is_tensor(obj)]
    for obj in tensors:
        if not obj.is_meta:
            try:
                storage = obj.untyped_storage()
                key = storage.data_ptr()
            except RuntimeError:  # fake/functional tensors left by compile tests: no memory
                continue
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _stream(predictor, num_frames: int, second: int, expected=None):
    """Stream the frames; masks are compared with ``expected`` as they come, not kept (so
    the memory measured is the tracker's). Returns (tracker, differing frames, presence, samples)."""
    from sam2_fast.stream import StreamingTracker

    tracker = StreamingTracker(predictor)
    differ, present, samples = [], [], []
    with V.single_thread():
        for f, ids, m in tracker.stream(_frame(t) for t in range(num_frames)):
            if f == 0:
                _, _, m = tracker.add_new_prompt(0, 1, points=[[4, 5]], labels=[1])
            if f == second:
                _, _, m = tracker.add_new_prompt(f, 2, points=[[12, 12]], labels=[1])
            if expected is not None:
                if not np.array_equal(m.numpy(), expected[f]):
                    differ.append(f)
                present.append(tuple(bool(v) for v in (m > 0).flatten(1).any(1)))
            del m
            if f % SAMPLE_EVERY == 0:
                samples.append((f, tracker.tensor_bytes(), _live_tensor_bytes(), _rss()))
    return tracker, differ, present, samples


def _video(predictor, num_frames: int, second: int):
    frames = np.stack([_frame(t) for t in range(num_frames)])
    masks = {}
    with V.single_thread():
        state = predictor.init_state(frames, keep_outputs="reachable")
        predictor.add_new_points_or_box(state, 0, 1, points=[[4, 5]], labels=[1])
        for f, _, m in predictor.propagate_in_video(state, 0, second):
            masks[f] = m.numpy().copy()
        _, _, m = predictor.add_new_points_or_box(state, second, 2, points=[[12, 12]], labels=[1])
        masks[second] = m.numpy().copy()
        for f, _, m in predictor.propagate_in_video(state, second + 1):
            masks[f] = m.numpy().copy()
    return masks


def _slope(points) -> float:
    """Least-squares bytes per frame of [(frame, bytes), ...]."""
    x = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    return float(np.polyfit(x, y, 1)[0])


@pytest.fixture(scope="module")
def expected(predictor):
    return _video(predictor, NUM_FRAMES, SECOND)


@pytest.fixture(scope="module")
def run(predictor, expected):
    return _stream(predictor, NUM_FRAMES, SECOND, expected)


def _growth(series) -> list:
    """What is wrong with a settled series [(frame, bytes), ...] (empty list: flat)."""
    problems = []
    slope = _slope(series)
    if abs(slope) >= SLOPE_LIMIT:
        problems.append(f"slope {slope:.0f} B/frame")
    settled = series[0][1]
    if max(b for _, b in series) > settled:
        problems.append(f"rose above the settled {settled} B")
    return problems


@pytest.mark.parametrize("column,name", [(1, "stream tensor bytes"), (2, "live tensor bytes")])
def test_tensor_bytes_flat_after_warmup(run, column, name):
    tracker, _, _, samples = run
    assert tracker.frame_idx == NUM_FRAMES - 1
    halves = ([s for s in samples if WARMUP <= s[0] < SECOND],
              [s for s in samples if s[0] >= SECOND + WARMUP])
    for half in halves:
        assert len(half) >= 5, "too few samples to fit a slope"
        series = [(s[0], s[column]) for s in half]
        assert not _growth(series), f"{name}: {_growth(series)}: {series}"
    # the second object holds memories too: the second plateau is higher
    assert halves[1][0][column] > halves[0][-1][column]
    # only the windows are left: conditioning frame + the last reach_window frames
    from sam2_fast.video.propagate import reach_window

    kept = [len(obj.outputs["non_cond_frame_outputs"]) for obj in tracker.session.objects]
    assert max(kept) <= reach_window(tracker.predictor), kept
    assert tracker.session.images.num_resident == 1


def test_rss_bounded(run):
    _, _, _, samples = run
    late = [s[3] for s in samples if s[0] >= SECOND + WARMUP]
    early = [s[3] for s in samples if WARMUP <= s[0] < SECOND]
    growth = max(late) - min(early)
    assert growth < RSS_LIMIT, f"RSS grew by {growth / 2**20:.1f} MiB after warm-up"


def test_masks_equal_the_video_predictor(run, expected):
    _, differ, present, _ = run
    assert len(present) == len(expected) == NUM_FRAMES
    assert not differ, f"the stream differs from the video predictor on frames {differ[:10]}"
    # both objects tracked, present on some frames and absent on others: not a vacuous match
    shown = np.array(present[SECOND + 1:])  # (T, 2)
    assert shown.shape[1] == 2 and shown.any(axis=0).all() and not shown.all(axis=0).any(), shown.sum(axis=0)


def test_mutation_no_pruning_grows(monkeypatch, predictor):
    """Pruning off in the product code: the same measurement fails (measured ~1.5 KiB/frame)."""
    import sam2_fast.video.propagate as T

    monkeypatch.setattr(T, "drop_unreachable", lambda *a, **k: None)
    _, _, _, samples = _stream(predictor, 250, second=1)
    series = [(s[0], s[1]) for s in samples if s[0] >= WARMUP]
    assert _slope(series) > SLOPE_LIMIT and len(_growth(series)) == 2, f"unpruned stream should grow: {series}"
