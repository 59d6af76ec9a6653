"""The compiled runtime compiles each part once per shape, whatever the frame source.

On the GPU the runtime compiles with ``max-autotune-no-cudagraphs``: a recompile of the
image encoder costs minutes there (the first H200 run's compiled row had not finished
after 9 minutes). A backend that only records the graphs dynamo hands it (no code
generation, a few seconds here) counts them while the predictor tracks:

* 1 object: image encoder, memory attention (static bank), mask decoder, memory encoder:
  4 graphs. Before the fix this was 7: the sine position table cache was a dict that
  dynamo guarded on (the entry its own trace added failed the guard next call: image and
  memory encoder compiled twice), and frame 0 (loaded in the caller's thread, inside
  inference mode) was an inference tensor while later frames, loaded by the prefetch
  threads, were normal tensors (dispatch-key guard: the image encoder compiled a third time).
* 3 objects with interactive prompts (object 1: 1 to 4 clicks, object 2 a box, object 3 a
  box and a click) and object 1 corrected on frame 2: the same 4 graphs, at the session's
  bucket (4 rows). Prompted decodes run eagerly; compiled, the decoder recompiled for every
  new prompt-token count (6 more). Bucketing the objects tracked on a frame instead of the
  session's (2 on frame 2) compiled 3 more.
"""

from __future__ import annotations

import os
import sys
from typing import List

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import sensitize_  # noqa: E402
from video_utils import make_clip, write_jpeg_folder  # noqa: E402

from sam2_fast.build_sam import build_sam2_video_predictor  # noqa: E402
from sam2_fast.runtime import disable_fast_runtime, enable_fast_runtime  # noqa: E402

SIZE = 64
FRAMES = 9  # frame 8 attends to a full bank (1 conditioning + 6 recent frames)


class GraphRecorder:
    """A torch.compile backend that keeps (first input shape, node count) per graph and runs
    the graph as traced (no code generation)."""

    def __init__(self) -> None:
        self.graphs: List[tuple] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        first = next((tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)), None)
        self.graphs.append((first, len(gm.graph.nodes)))
        return gm.forward


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_jpeg_folder(make_clip(FRAMES, 72, 88, seed=3), str(tmp_path_factory.mktemp("clip")))


def _recorded_predictor():
    """A fresh tiny predictor under the compiled runtime, compiling with a GraphRecorder."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    pred = build_sam2_video_predictor("sam2.1_hiera_tiny", device="cpu",
                                      hydra_overrides_extra=[f"++model.image_size={SIZE}"])
    sensitize_(pred, 0, obj_score_bias=2.0)
    rec = GraphRecorder()
    enable_fast_runtime(pred, compile=True, compile_backend=rec)
    return pred, rec


def compiled_graphs(video: str, objects: int, async_loading: bool = False, interactive: bool = False) -> List[tuple]:
    pred, rec = _recorded_predictor()
    try:
        state = pred.init_state(video, async_loading_frames=async_loading)
        for o in range(objects):
            pred.add_new_points_or_box(state, 0, o + 1, points=[[30 + 8 * o, 36]], labels=[1])
        if interactive:  # refine object 1 click by click; a box, then a box and a click
            for k in range(3):
                pred.add_new_points_or_box(state, 0, 1, points=[[20 + 10 * k, 30]], labels=[1],
                                           clear_old_points=False)
            pred.add_new_points_or_box(state, 0, 2, box=[10, 10, 40, 40])
            pred.add_new_points_or_box(state, 0, 3, box=[10, 10, 40, 40], points=[[20, 20]], labels=[1])
        pred.add_new_points_or_box(state, 2, 1, points=[[40, 36]], labels=[1])  # a correction
        n = sum(1 for _ in pred.propagate_in_video(state))
        assert n == FRAMES
        pred.reset_state(state)
    finally:
        disable_fast_runtime(pred)
    return rec.graphs


@pytest.mark.parametrize("objects,interactive", [(1, False), (3, True)])
def test_each_part_compiles_once_per_shape(video, objects, interactive):
    graphs = compiled_graphs(video, objects, interactive=interactive)
    assert len(graphs) == 4, f"{len(graphs)} graphs compiled, expected 4: {graphs}"


def test_preloaded_frames_loaded_in_the_background_do_not_recompile(video):
    """async_loading_frames=True: frame 0 is loaded in the caller's thread, the rest in a
    background thread; both must reach the image encoder as the same kind of tensor."""
    graphs = compiled_graphs(video, 1, async_loading=True)
    assert len(graphs) == 4, graphs


# ----------------------------------------------------------------------------- mutations
def _plant(monkeypatch, which: str) -> None:
    from sam2_fast.modeling import batched_step
    from sam2_fast.modeling.position_encoding import PositionEmbeddingSine
    from sam2_fast.video.frames_base import Normalizer

    if which == "table-cache-traced":
        monkeypatch.setattr(PositionEmbeddingSine, "table", PositionEmbeddingSine._cached)  # also when tracing
    elif which == "frames-in-callers-mode":
        for name in ("__call__", "in_numpy", "on_device"):  # undecorated: the caller's mode
            monkeypatch.setattr(Normalizer, name, getattr(Normalizer, name).__wrapped__)
    elif which == "prompts-compiled":
        from sam2_fast.modeling import sam2_heads

        monkeypatch.setattr(sam2_heads, "prompted_decode", lambda: False)
    elif which == "bucket-of-tracked-objects":
        monkeypatch.setattr(batched_step, "step_rows",
                            lambda model, n, total: batched_step.batch_bucket(n)
                            if batched_step.wants_static_shapes(model) else n)


@pytest.mark.parametrize("which,objects,interactive", [
    ("table-cache-traced", 1, False), ("frames-in-callers-mode", 1, False),
    ("bucket-of-tracked-objects", 3, True), ("prompts-compiled", 3, True)])
def test_mutation_recompiles_are_counted(video, monkeypatch, which, objects, interactive):
    _plant(monkeypatch, which)
    graphs = compiled_graphs(video, objects, interactive=interactive)
    assert len(graphs) > 4, graphs


# ----------------------------------------------------------------------------- recompile limit
def _sessions(video: str, object_counts) -> int:
    """One predictor tracking the clip once per object count (as a worker reuses its model
    for video after video); returns the graphs compiled."""
    pred, rec = _recorded_predictor()
    try:
        for k in object_counts:
            state = pred.init_state(video)
            for o in range(k):
                pred.add_new_points_or_box(state, 0, o + 1, points=[[30 + 8 * o, 36]], labels=[1])
            assert sum(1 for _ in pred.propagate_in_video(state)) == FRAMES
    finally:
        disable_fast_runtime(pred)
    return len(rec.graphs)


def test_more_shapes_than_dynamos_recompile_limit(video):
    """Videos of 1, 2, 3, 5 and 9 objects on one predictor compile the memory attention 5
    times (x2 with the second bank bucket): past dynamo's default limit of 8, fullgraph=True
    raised FailOnRecompileLimitHit mid-video. Here the limit is set to 2 so that 3 object
    buckets stand for it; the runtime raises the limit while on and restores it after."""
    with torch._dynamo.config.patch(recompile_limit=2):  # (monkeypatch would delete the key after)
        assert _sessions(video, (1, 2, 3)) == 1 + 3 * 3  # the image encoder once; 3 parts x 3 buckets
        assert torch._dynamo.config.recompile_limit == 2


def test_mutation_recompile_limit_left_alone(video, monkeypatch):
    from sam2_fast.runtime import settings

    monkeypatch.setattr(settings, "RECOMPILE_LIMIT", 1)  # max(1, 2): the limit stays 2
    with torch._dynamo.config.patch(recompile_limit=2), pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
        _sessions(video, (1, 2, 3))
