"""The fast runtime (``vos_optimized=True``): static memory bank, compile, CUDA graphs, bf16.

CPU (this module): the predictor built with ``vos_optimized=True`` against the eager one on
a synthetic clip, with a broken bank that must fail (the bank itself against the plain
memory attention: test_static_bank.py); CUDA graph bookkeeping on a CPU stand-in;
``torch.compile`` (aot_eager) against eager; the settings and what the runtime records.
CUDA (``@pytest.mark.cuda``, run by the GPU check): test_runtime_cuda.py. Shared pieces:
``runtime_harness``.
"""

from __future__ import annotations

import pytest
import torch

from runtime_harness import BF16_TRACK_TOL, TRACK_TOL, ReplayByRerun, build_predictor, runtime_clip, track
from support import rel_err

from sam2_fast.runtime import disable_fast_runtime, enable_fast_runtime, runtime_settings
from sam2_fast.runtime import static_bank as sb
from sam2_fast.runtime.graphs import GraphedStep, install_graphs


@pytest.fixture(scope="module")
def clip():
    return runtime_clip()


@pytest.fixture(scope="module")
def eager_logits(clip):
    return track(build_predictor(False), clip)


def test_vos_optimized_predictor_matches_eager(clip, eager_logits):
    pred = build_predictor(True)
    info = pred.runtime_info
    assert info["settings"]["dtype"] == "float32" and info["autocast"] is None
    assert info["static_bank"]["frame_buckets"] == (7, 9)
    assert "cuda_graphs" in info["skipped"] and "compile" in info["skipped"]
    fast = track(pred, clip)
    err = rel_err(fast, eager_logits)
    present = (eager_logits > 0).float().mean().item()
    print(f"vos_optimized vs eager: rel err {err:.2e}; foreground fraction {present:.2f}; "
          f"counters {dict(info['counters'])}")
    assert 0.05 < present < 0.95, "the clip should show the object on part of the frames"
    assert err <= TRACK_TOL
    counters = info["counters"]
    assert counters["bank_calls"] >= 5 and counters["bank_fallbacks"] == 0
    assert counters["bank_bucket_9"] > 0  # three conditioning frames + recent ones


def test_vos_optimized_two_objects_reverse_and_correction(clip, monkeypatch):
    """Two objects, reverse then forward tracking, a correction click mid-video.

    Memories are stored in fp32 here: with bf16 storage, the bank's different summation
    order (~1e-7) flips an occasional bf16 rounding (4e-3 steps) and tracking compounds
    those into ~1e-4 (measured 4e-5..1.3e-4), which would hide what this test measures.
    """
    import sam2_fast.video.outputs as outputs

    monkeypatch.setattr(outputs, "store_memory",
                        lambda session, features: features.to(session.storage_device))

    def script(pred):
        state = pred.init_state(clip)
        pred.add_new_points_or_box(state, 5, 1, points=[[40, 36]], labels=[1])
        pred.add_new_points_or_box(state, 5, 2, box=[5, 5, 30, 30])
        outs = [m for _, _, m in pred.propagate_in_video(state, reverse=True)]
        outs += [m for _, _, m in pred.propagate_in_video(state)]
        outs.append(pred.add_new_points_or_box(state, 8, 1, points=[[50, 40]], labels=[1])[2])
        outs += [m for _, _, m in pred.propagate_in_video(state, start_frame_idx=8)]
        return torch.cat([o.flatten() for o in outs])

    fast = build_predictor(True)
    err = rel_err(script(fast), script(build_predictor(False)))
    counters = fast.runtime_info["counters"]
    print(f"two objects, reverse + correction: rel err {err:.2e}; {dict(counters)}")
    # one bank call per tracked frame for both objects (batched): 14 frames tracked
    assert err <= TRACK_TOL and counters["bank_calls"] >= 14 and counters["bank_fallbacks"] == 0


def test_vos_optimized_tracking_notices_a_broken_bank(clip, eager_logits):
    pred = build_predictor(True)
    unmasked = sb._attention_mask
    try:
        sb._attention_mask = lambda key_ok: None
        bad = track(pred, clip)
    finally:
        sb._attention_mask = unmasked
    err = rel_err(bad, eager_logits)
    print(f"tracking with an unmasked bank: rel err {err:.2e}")
    assert err >= 10 * TRACK_TOL


def test_enable_is_reversible_and_keeps_the_state_dict():
    pred = build_predictor(False)
    keys = list(pred.state_dict())
    enable_fast_runtime(pred)
    assert list(pred.state_dict()) == keys
    assert "forward" in pred.memory_attention.__dict__  # routed through the bank
    enable_fast_runtime(pred, static_bank=False)  # reconfiguring replaces the old setup
    assert "forward" not in pred.memory_attention.__dict__
    assert "static_bank" in pred.runtime_info["skipped"]
    disable_fast_runtime(pred)
    assert not hasattr(pred, "runtime_info")
    with pytest.raises(ValueError, match="CUDA"):
        enable_fast_runtime(pred, cuda_graphs=True)
    with pytest.raises(TypeError, match="SAM 2 model"):
        enable_fast_runtime(torch.nn.Linear(2, 2))


def test_bf16_autocast_on_cpu_when_asked(clip, eager_logits):
    """The bf16 policy run on CPU (CPU autocast): same code path as CUDA's autocast regions.
    Measured here: rel err ~0.02, 99.4% of mask pixels agree. The lower bound proves that
    autocast engaged at all."""
    pred = enable_fast_runtime(build_predictor(False), dtype=torch.bfloat16)
    assert pred.runtime_info["autocast"] == "bfloat16"
    fast = track(pred, clip)
    err = rel_err(fast, eager_logits)
    agree = ((fast > 0) == (eager_logits > 0)).float().mean().item()
    print(f"CPU bf16 autocast vs fp32: rel err {err:.3e} (tol {BF16_TRACK_TOL:.3f}), agreement {agree:.4f}")
    assert 1e-4 < err <= BF16_TRACK_TOL and agree >= 0.97
    assert fast.dtype == torch.float32


# ----------------------------------------------------------------------------- settings
def test_settings_cpu_and_cuda_policies():
    cpu = runtime_settings("cpu")
    assert (cpu.dtype, cpu.compile, cpu.cuda_graphs, cpu.static_bank, cpu.allow_tf32) == \
        (torch.float32, False, False, True, False)
    assert cpu.inductor_config == {}
    gpu = runtime_settings("cuda")  # the policy itself needs no GPU to be inspected
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        pytest.skip("pre-Ampere GPU: fp32 policy")
    assert (gpu.dtype, gpu.compile, gpu.cuda_graphs, gpu.allow_tf32) == (torch.bfloat16, True, True, True)
    for part, kwargs in gpu.compile_kwargs.items():
        assert kwargs["mode"] == "max-autotune-no-cudagraphs" and kwargs["fullgraph"] and not kwargs["dynamic"]
    assert gpu.inductor_config["coordinate_descent_tuning"] is True
    fp32_gpu = runtime_settings("cuda", dtype=torch.float32)
    assert not fp32_gpu.allow_tf32  # an fp32 run is a parity run
    for s in (cpu, gpu):
        for key in ("dtype", "compile", "cuda_graphs", "static_bank", "compile.mode", "inductor_config"):
            assert s.reasons[key], f"no reason recorded for {key}"
    with pytest.raises(ValueError, match="static_bank"):
        runtime_settings("cuda", cuda_graphs=True, static_bank=False)


def test_graphed_step_passes_cpu_calls_through():
    calls = []

    def fn(x):
        calls.append(1)
        return x * 2

    step = GraphedStep(fn, "toy")
    with torch.inference_mode():
        assert torch.equal(step(torch.ones(3)), torch.full((3,), 2.0))
    assert calls == [1] and not step._graphs


def test_graphed_step_keeps_the_recently_used_signatures():
    """More signatures than ``max_graphs``: the least recently used graph is dropped and the
    new one captured (a model reused for videos of many object counts keeps replaying what it
    sees now); before, every signature past the limit ran eagerly for good."""
    lin = torch.nn.Linear(16, 8)
    step = GraphedStep(lambda x: lin(x) * 2, "toy", max_graphs=2, backend=ReplayByRerun())
    rows = (1, 2, 1, 4, 2, 4, 4)  # 1, 2 captured; 4 evicts 2 (1 was used later); 2 evicts 1; 4 hits
    with torch.inference_mode():
        for r in rows:
            x = torch.randn(r, 16)
            assert torch.equal(step(x), lin(x) * 2)
    c = step.counters
    assert (c["graph_captures[toy]"], c["graph_evictions[toy]"], c["graph_replays[toy]"]) == (4, 2, 7)
    assert c["graph_eager_calls[toy]"] == 0 and len(step._graphs) == 2


def test_graph_bookkeeping_on_cpu_stand_in(clip, eager_logits):
    """Every per-frame step replayed through GraphedStep (with the stand-in backend) tracks
    the clip like the eager predictor."""
    pred = build_predictor(True)
    counters = pred.runtime_info["counters"]
    steps, undo = install_graphs(pred, pred._fast_runtime_bank, counters, backend=ReplayByRerun())
    try:
        replayed = track(pred, clip)
    finally:
        for fn in reversed(undo):
            fn()
    names = list(steps)
    assert names == ["image_encoder", "mask_decoder", "memory_encoder", "memory_attention"]
    err = rel_err(replayed, eager_logits)
    print(f"stand-in graphs vs eager: rel err {err:.2e}; {dict(counters)}")
    assert err <= TRACK_TOL
    for name in names:
        assert counters[f"graph_replays[{name}]"] > counters[f"graph_captures[{name}]"] >= 1
    assert counters["graph_captures[memory_attention]"] == 2  # one per bank bucket
    assert not any(k.startswith("graph_capture_failed") for k in counters)


def test_graphed_decoder_leaves_prompts_eager(clip, eager_logits):
    """The runtime's order on CUDA: graphs over the decoder, then prompted decodes routed to
    its eager forward. The clip's prompts (1 click, 2 clicks, a box) would each capture a
    decoder graph; only the tracking signature may, and the masks stay the eager ones."""
    from sam2_fast.runtime import _prompts_run_eager

    pred = build_predictor(True)
    counters = pred.runtime_info["counters"]
    _, undo = install_graphs(pred, pred._fast_runtime_bank, counters, backend=ReplayByRerun())
    info: dict = {}
    _prompts_run_eager(pred, undo, info)
    try:
        replayed = track(pred, clip)
    finally:
        for fn in reversed(undo):
            fn()
    assert "forward" not in pred.sam_mask_decoder.__dict__ and info["mask_decoder_prompts"].startswith("eager")
    assert rel_err(replayed, eager_logits) <= TRACK_TOL
    assert counters["graph_captures[mask_decoder]"] == 1, dict(counters)


def test_graph_stand_in_catches_a_missing_output_clone(clip):
    """Mutation: handing out the replay buffers themselves (no clone) corrupts stored outputs
    (or the captured structure itself: forward_image edits the returned feature list)."""
    pred = build_predictor(True)
    steps, undo = install_graphs(pred, pred._fast_runtime_bank, pred.runtime_info["counters"],
                                 backend=ReplayByRerun())
    for step in steps.values():
        step.clone_outputs = False
    # forward_image replaces the level-0 feature map (256 channels) of the list it returns by
    # its 32-channel projection: without a clone that edits the captured output itself, and
    # the next replay's copy into it fails with exactly this shape error.
    try:
        with pytest.raises(RuntimeError, match=r"The size of tensor a \(32\) must match the size of "
                                               r"tensor b \(256\) at non-singleton dimension 1") as info:
            track(pred, clip)
    finally:
        for fn in reversed(undo):
            fn()
    assert any(entry.name == "replay" for entry in info.traceback), "raised outside the graph replay"


# ----------------------------------------------------------------------------- compile (CPU)
@pytest.mark.slow
def test_enable_with_compile_tracks_like_eager(clip, eager_logits):
    """compile=True through enable_fast_runtime (aot_eager on CPU, ~30 s): all four parts
    trace with fullgraph=True as the predictor really calls them, and undo restores them."""
    torch._dynamo.reset()
    pred = enable_fast_runtime(build_predictor(False), compile=True, compile_backend="aot_eager")
    assert set(pred.runtime_info["compiled"]) == {"image_encoder", "memory_encoder", "mask_decoder",
                                                  "memory_attention"}
    err = rel_err(track(pred, clip), eager_logits)
    disable_fast_runtime(pred)
    assert "forward" not in pred.image_encoder.__dict__ and "forward" not in pred.sam_mask_decoder.__dict__
    print(f"compiled (aot_eager) runtime vs eager: rel err {err:.2e}")
    assert err <= TRACK_TOL
