"""Video predictor parity with the official ``SAM2VideoPredictor`` (CPU, float32).

Both predictors get identical sensitive random weights (``sensitize_``) with an object-score
bias that keeps each object present on most frames and absent on some (asserted), and play
the same scripted interaction on a small synthetic clip (18 frames, so 7 memories and 16
pointers fill). Every returned mask must match: relative error <= 1e-4 per frame and
object, identical binary masks away from logit 0.

SAM 2 stores memories in bfloat16. Two fp32 networks that differ by 1e-7 (operation
order) now and then round a memory element to neighbouring bf16 values (a 4e-3 step), and
tracking compounds these: our submodules match the reference to ~2e-7, which grows to
~1e-4 after 18 frames. So parity is checked in two exact parts plus the plain one:
* tracking rules, bf16 memories included: our predictor and ``SAM2Base`` running the
  reference's own submodules reproduce the reference to 1e-6 (measured: 0);
* network numerics: our whole model against the reference with both memory banks kept in
  float32 (``video_utils.float32_memory_bank``), 1e-4 (measured: ~1e-6);
* the plain drop-in comparison (ours and the reference, both in bf16), bounded by
  ``BF16_E2E_TOL`` for the reason above.

Mutation tests break one rule each (temporal slot order, pointer count, pointer
selection, RoPE exclusion of pointer tokens, conditioning-frame selection) and check the
output moves by >= 10x the tolerance.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

import video_utils as V
from support import rel_err

TOL = 1e-4
# plain bf16-vs-bf16 bound: measured 1.2e-4 after 18 frames with ~2e-7 submodule differences
BF16_E2E_TOL = 1e-3
S = 128  # reduced input size keeps CPU time low
NUM_FRAMES = 18
CLIP_HW = (75, 101)  # odd video size: exercises the video-resolution resize
SEED = 0
# object-score bias per config: objects present on most frames, absent on some
BIAS = {"sam2.1_hiera_tiny": -0.04, "sam2_hiera_tiny": -0.5}
SUBMODULES = ("image_encoder", "memory_attention", "memory_encoder", "sam_prompt_encoder",
              "sam_mask_decoder")

# one object by click
ONE_CLICK = [
    ("points", dict(frame_idx=0, obj_id=1, points=[[30, 35]], labels=[1])),
    ("propagate", {}),
]
# several objects (clicks and a box), a correction with re-propagation, an object added
# after tracking began, reverse propagation from the last frame, an object removed, and
# max_frame_num_to_track
MANY = [
    ("points", dict(frame_idx=0, obj_id=1, points=[[30, 35]], labels=[1])),
    ("points", dict(frame_idx=0, obj_id=2, box=[55, 8, 80, 30])),
    ("points", dict(frame_idx=0, obj_id=2, points=[[70, 20]], labels=[1], clear_old_points=False)),
    ("propagate", {}),
    ("points", dict(frame_idx=9, obj_id=1, points=[[60, 40], [20, 60]], labels=[1, 0], clear_old_points=False)),
    ("propagate", dict(start_frame_idx=10, max_frame_num_to_track=4)),
    ("points", dict(frame_idx=6, obj_id="late", points=[[12, 62]], labels=[1])),
    ("propagate", dict(start_frame_idx=NUM_FRAMES - 1, reverse=True)),
    ("remove", dict(obj_id=2)),
    ("propagate", dict(max_frame_num_to_track=6)),
]
# a mask prompt on the first frame and a click on the last one, tracked backwards first:
# frames then have no object pointer to attend to (where the reference needs its patch);
# then prompts cleared on a frame, a reset, and a fresh start
MASK_REVERSE = [
    ("mask", dict(frame_idx=0, obj_id=5, mask=None)),  # filled in by _with_mask
    ("points", dict(frame_idx=NUM_FRAMES - 1, obj_id=7, points=[[75, 40]], labels=[1])),
    ("propagate", dict(reverse=True, start_frame_idx=NUM_FRAMES - 1)),
    ("propagate", {}),
    ("clear", dict(frame_idx=NUM_FRAMES - 1, obj_id=7)),
    ("reset", {}),
    ("points", dict(frame_idx=3, obj_id=9, points=[[40, 30], [41, 50]], labels=[1, 1])),
    ("propagate", dict(max_frame_num_to_track=3)),
]
# for mutations: two conditioning frames of one object, forward over the whole clip
MUTATION = [
    ("points", dict(frame_idx=0, obj_id=1, points=[[30, 35]], labels=[1])),
    ("points", dict(frame_idx=12, obj_id=1, points=[[70, 45]], labels=[1])),
    ("propagate", {}),
]


def _with_mask(steps, clip):
    """MASK_REVERSE with a real mask: the bright ellipse of frame 0."""
    frame = torch.from_numpy(clip[0]).float()
    mask = (frame.mean(-1) > 140).numpy()
    out = []
    for name, kw in steps:
        if name == "mask":
            kw = dict(kw, mask=mask)
        out.append((name, kw))
    return out


@pytest.fixture(scope="module")
def clip():
    return V.make_clip(NUM_FRAMES, *CLIP_HW, seed=1)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, clip):
    return V.write_jpeg_folder(clip, str(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module", autouse=True)
def _scipy_components():
    undo = V.install_scipy_components()
    yield
    undo()


@pytest.fixture(scope="module")
def threads():
    with V.single_thread():
        yield


def _pair(config, postprocessing):
    ref = V.build_reference(config, S, SEED, BIAS[config], apply_postprocessing=postprocessing)
    ours = V.build_ours_from(ref, config, S, apply_postprocessing=postprocessing)
    return ref, ours


@pytest.fixture(scope="module")
def pair21(threads):
    """SAM 2.1 with apply_postprocessing=True (what users get)."""
    return _pair("sam2.1_hiera_tiny", True)


@pytest.fixture(scope="module")
def pair20(threads):
    """SAM 2.0 with apply_postprocessing=False."""
    return _pair("sam2_hiera_tiny", False)


def _shared_modules(ref, ours):
    """Ours with the reference's submodules: isolates the tracking logic."""
    twin = copy.deepcopy(ours)
    for name in SUBMODULES:
        setattr(twin, name, getattr(ref, name))
    return twin


def _run(pair, predictor, clip_dir, steps, fp32_bank):
    undo = V.float32_memory_bank(*pair) if fp32_bank else None
    try:
        return V.run_script(predictor, clip_dir, steps)
    finally:
        if undo is not None:
            undo()


@pytest.fixture(scope="module")
def ref_runs(pair21, pair20, clip, clip_dir):
    """Reference recordings, computed on first use: (script name, fp32 bank) -> records."""
    scripts = {"one_click": (pair21, ONE_CLICK), "many": (pair21, MANY), "mutation": (pair21, MUTATION),
               "mask_reverse": (pair20, _with_mask(MASK_REVERSE, clip))}
    cache = {}

    def get(name, fp32_bank):
        key = (name, fp32_bank)
        if key not in cache:
            pair, steps = scripts[name]
            cache[key] = (pair, steps, _run(pair, pair[0], clip_dir, steps, fp32_bank))
        return cache[key]

    return get


def _check_presence(records):
    present, absent = V.presence(records)
    assert present > absent > 0, f"weights must keep objects mostly present: {present} present, {absent} absent"


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("script", ["one_click", "many", "mask_reverse"])
def test_network_parity_fp32_memory_bank(ref_runs, clip_dir, script):
    """Our whole model against the reference (clicks, box, mask, corrections, reverse, add,
    remove, max_frame_num_to_track; SAM 2.1 + postprocessing and SAM 2.0 without)."""
    pair, steps, expect = ref_runs(script, True)
    _check_presence(expect)
    worst = V.compare_records(_run(pair, pair[1], clip_dir, steps, True), expect, TOL)
    print(f"{script}: worst rel err {worst:.2e}")


@pytest.mark.parametrize("script", ["many", "mask_reverse"])
def test_tracking_rules_exact_with_bf16_memories(ref_runs, clip_dir, script, monkeypatch):
    """With the reference's submodules our predictor reproduces the reference to rounding.

    Objects are tracked one at a time here (``TRACK_PER_OBJECT``, the reference's own
    loop): batched, the memory encoder's convolutions at batch 2-3 round differently from
    batch 1 on this CPU (up to 2.4e-6 absolute, measured), which bf16 memory storage turns
    into 4e-3 steps (1.2e-5 after two frames). Both paths share the memory plan and the
    bank builder; batched vs per-object is checked in fp32 in test_batched_objects.py.
    """
    import sam2_fast.video.propagate as T

    monkeypatch.setattr(T, "TRACK_PER_OBJECT", True)
    pair, steps, expect = ref_runs(script, False)
    _check_presence(expect)
    twin = _shared_modules(*pair)
    worst = V.compare_records(V.run_script(twin, clip_dir, steps), expect, 1e-6)
    print(f"{script}: worst rel err {worst:.2e}")


def test_drop_in_end_to_end_bf16(ref_runs, clip_dir):
    """The plain comparison a user makes (both predictors as shipped, bf16 memories)."""
    pair, steps, expect = ref_runs("many", False)
    worst = V.compare_records(V.run_script(pair[1], clip_dir, steps), expect, BF16_E2E_TOL)
    print(f"many (bf16 end to end): worst rel err {worst:.2e}")


# ------------------------------------------------------------------------------ memory stride
# ``memory_temporal_stride_for_eval`` > 1 (``++model.memory_temporal_stride_for_eval=k``): the
# 6 non-conditioning memories are the previous frame and then every k-th frame before it.
# ONE_CLICK over 18 frames: the oldest slot (floor_k(t - 2) - 4k) exists from frame 10 (k=2) /
# 14 (k=3) on, so both strides run with a partly and a completely filled bank.
@pytest.fixture(scope="module")
def stride_runs(threads, clip_dir):
    cache = {}

    def get(stride):
        if stride not in cache:
            over = [f"++model.memory_temporal_stride_for_eval={stride}"]
            ref = V.build_reference("sam2.1_hiera_tiny", S, SEED, BIAS["sam2.1_hiera_tiny"], overrides=over)
            ours = V.build_ours_from(ref, "sam2.1_hiera_tiny", S, overrides=over)
            assert ours.memory_temporal_stride_for_eval == ref.memory_temporal_stride_for_eval == stride
            cache[stride] = ((ref, ours), _run((ref, ours), ref, clip_dir, ONE_CLICK, True))
        return cache[stride]

    return get


def check_stride_parity(stride_runs, clip_dir, stride) -> float:
    pair, expect = stride_runs(stride)
    _check_presence(expect)
    return V.compare_records(_run(pair, pair[1], clip_dir, ONE_CLICK, True), expect, TOL)


@pytest.mark.parametrize("stride", [2, 3])
def test_network_parity_memory_stride(stride_runs, clip_dir, stride):
    print(f"stride {stride}: worst rel err {check_stride_parity(stride_runs, clip_dir, stride):.2e}")


def test_mutation_memory_stride_ignored(monkeypatch, stride_runs, clip_dir):
    """Product mutation: the memory plan ignores the temporal stride (uses 1)."""
    import sam2_fast.modeling.sam2_base as base

    real = base.memory_slot_frames
    monkeypatch.setattr(base, "memory_slot_frames",
                        lambda frame_idx, num_maskmem, stride, reverse: real(frame_idx, num_maskmem, 1, reverse))
    with pytest.raises(AssertionError, match="rel err") as info:
        check_stride_parity(stride_runs, clip_dir, 2)
    print(info.value)


# ------------------------------------------------------------------------------ mutations
def _mutated_error(monkeypatch, ref_runs, clip_dir, target, name, replacement):
    pair, steps, expect = ref_runs("mutation", True)
    monkeypatch.setattr(target, name, replacement)
    try:
        got = _run(pair, pair[1], clip_dir, steps, True)
    finally:
        monkeypatch.undo()
    err = max(rel_err(a[3], b[3]) for a, b in zip(got, expect))
    print(f"mutation {name}: worst rel err {err:.2e}")
    return err


def test_mutation_baseline_matches(ref_runs, clip_dir):
    pair, steps, expect = ref_runs("mutation", True)
    V.compare_records(_run(pair, pair[1], clip_dir, steps, True), expect, TOL)


def test_mutation_temporal_slot_order(monkeypatch, ref_runs, clip_dir):
    import sam2_fast.modeling.sam2_base as base

    real = base.memory_slot_frames

    def reversed_slots(frame_idx, num_maskmem, stride, reverse):
        plan = real(frame_idx, num_maskmem, stride, reverse)
        return [(num_maskmem - t_pos, t) for t_pos, t in plan]  # newest frame gets the oldest slot

    err = _mutated_error(monkeypatch, ref_runs, clip_dir, base, "memory_slot_frames", reversed_slots)
    assert err >= 10 * TOL, f"reversed temporal slots moved the output by only {err:.2e}"


def test_mutation_pointer_count(monkeypatch, ref_runs, clip_dir):
    import sam2_fast.modeling.sam2_base as base

    real = base.pointer_sources

    def fewer(frame_idx, attended, left_out, non_cond, num_frames, max_ptrs, *args, **kwargs):
        return real(frame_idx, attended, left_out, non_cond, num_frames, max_ptrs // 2, *args, **kwargs)

    err = _mutated_error(monkeypatch, ref_runs, clip_dir, base, "pointer_sources", fewer)
    assert err >= 10 * TOL, f"halving the pointer count moved the output by only {err:.2e}"


def test_mutation_pointer_selection(monkeypatch, ref_runs, clip_dir):
    import sam2_fast.modeling.sam2_base as base

    real = base.pointer_sources

    def future_too(frame_idx, attended, left_out, non_cond, num_frames, max_ptrs, reverse, past_only, signed):
        # also attend to pointers of conditioning frames ahead of the current frame
        return real(frame_idx, attended, left_out, non_cond, num_frames, max_ptrs, reverse, False, signed)

    err = _mutated_error(monkeypatch, ref_runs, clip_dir, base, "pointer_sources", future_too)
    assert err >= 10 * TOL, f"attending to future pointers moved the output by only {err:.2e}"


def test_mutation_rope_on_pointer_tokens(monkeypatch, ref_runs, clip_dir):
    import sam2_fast.modeling.rope as rope

    real = rope.apply_axial_rope

    def rotate_everything(q, k, cos, sin, repeat_k=False, num_k_exclude=0):
        q_out, k_out = real(q, k, cos, sin, repeat_k=repeat_k, num_k_exclude=num_k_exclude)
        if num_k_exclude == 0:
            return q_out, k_out
        n_grid = k.shape[-2] - num_k_exclude
        reps = -(-num_k_exclude // cos.shape[0])
        tail = rope.rotate_pairs(k[..., n_grid:, :], cos.repeat(reps, 1)[:num_k_exclude],
                                 sin.repeat(reps, 1)[:num_k_exclude])
        return q_out, torch.cat([k_out[..., :n_grid, :], tail], dim=-2)

    err = _mutated_error(monkeypatch, ref_runs, clip_dir, rope, "apply_axial_rope", rotate_everything)
    assert err >= 10 * TOL, f"rotating pointer tokens moved the output by only {err:.2e}"


def test_mutation_conditioning_frame_selection(monkeypatch, ref_runs, clip_dir):
    import sam2_fast.modeling.sam2_base as base

    real = base.select_closest_cond_frames

    def nearest_only(frame_idx, cond_outputs, max_cond_frames):
        if len(cond_outputs) < 2:
            return real(frame_idx, cond_outputs, max_cond_frames)
        nearest = min(cond_outputs, key=lambda t: abs(t - frame_idx))
        return {nearest: cond_outputs[nearest]}, {t: o for t, o in cond_outputs.items() if t != nearest}

    err = _mutated_error(monkeypatch, ref_runs, clip_dir, base, "select_closest_cond_frames", nearest_only)
    assert err >= 10 * TOL, f"attending to one conditioning frame moved the output by only {err:.2e}"


# ------------------------------------------------------------------------------ real video
BIKES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "bikes.mp4")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(BIKES), reason="../shared/data/bikes.mp4 is not present")
def test_bikes_at_1024(tmp_path, threads):
    """Full resolution on real footage: 3 frames of bikes.mp4 (as JPEGs for the reference)."""
    import av

    frames = []
    with av.open(BIKES) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == 3:
                break
    folder = V.write_jpeg_folder(np.stack(frames), str(tmp_path / "bikes"))
    ref = V.build_reference("sam2.1_hiera_tiny", 1024, SEED, 0.0)
    ours = V.build_ours_from(ref, "sam2.1_hiera_tiny", 1024)
    steps = [("points", dict(frame_idx=0, obj_id=1, box=[300, 100, 420, 250])),
             ("propagate", {})]
    undo = V.float32_memory_bank(ref, ours)
    try:
        expect = V.run_script(ref, folder, steps)
        worst = V.compare_records(V.run_script(ours, folder, steps), expect, TOL)
    finally:
        undo()
    print(f"bikes 1024: worst rel err {worst:.2e}, presence {V.presence(expect)}")
    # ours reads the .mp4 itself (PyAV): same video size and frame count
    state = ours.init_state(BIKES)
    assert (state["video_height"], state["video_width"]) == frames[0].shape[:2]
    assert state["num_frames"] > 3
