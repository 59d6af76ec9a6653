"""SAM2Base multi-frame tracking parity with the official model, and mutations it catches.

Tracking runs a short video of random backbone features through ``track_step`` with
prompts, feeding each model its own outputs (memories stored in bfloat16, as the video
predictor stores them), forward and in reverse. Models and inputs: ``sam2_base_harness``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch

from sam2_base_harness import TOL, build_models, random_frame, random_mask, random_points
from support import rel_err

from sam2_fast.modeling import sam2_base as base_mod


# ----------------------------------------------------------------------------- inputs
# A schedule entry: (frame, prompt kind: "points" | "mask" | None, is_init_cond_frame, reverse)
Step = Tuple[int, Optional[str], bool, bool]


def forward_schedule(n: int) -> List[Step]:
    """Clicks on frame 0 and a mask on a later frame, tracking forward through the rest, then
    a correction click on a tracked frame, re-tracking after it and one step backwards."""
    masked = (2 * n) // 3
    steps: List[Step] = [(0, "points", True, False), (masked, "mask", True, False)]
    steps += [(t, None, False, False) for t in range(1, n) if t != masked]
    steps += [(5, "points", False, False), (6, None, False, False), (3, None, False, True)]
    return steps


def reverse_schedule(n: int) -> List[Step]:
    last = n - 1
    steps: List[Step] = [(last, "points", True, True), (3, "mask", True, True)]
    steps += [(t, None, False, True) for t in range(last - 1, -1, -1) if t != 3]
    return steps


def future_prompt_schedule(n: int) -> List[Step]:
    # the only prompt lies ahead of the tracked frames: no object pointer is in the past,
    # so the memory holds only (bf16-stored) spatial memories
    return [(10, "points", True, False), (2, None, False, False), (3, "points", False, False),
            (4, None, False, False)]


def make_inputs(schedule: Sequence[Step], batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    frames = {t: random_frame(gen, batch) for t in sorted({s[0] for s in schedule})}
    prompts = {}
    for i, (t, kind, _, _) in enumerate(schedule):
        if kind == "points":
            prompts[i] = (random_points(gen, batch, 1 + i % 2), None)
        elif kind == "mask":
            prompts[i] = (None, random_mask(gen, batch))
    return frames, prompts


KEYS = ("pred_masks", "pred_masks_high_res", "obj_ptr", "object_score_logits", "maskmem_features")


@torch.no_grad()
def run_video(model, schedule, frames, prompts, num_frames: int, bf16_store: bool = True):
    """Run the schedule, each model reading back its own outputs (as the video predictor)."""
    output_dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    results = []
    for i, (t, kind, init, reverse) in enumerate(schedule):
        feats, pos, sizes = frames[t]
        points, mask = prompts.get(i, (None, None))
        out = model.track_step(frame_idx=t, is_init_cond_frame=init, current_vision_feats=feats,
                               current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=points,
                               mask_inputs=mask, output_dict=output_dict, num_frames=num_frames,
                               track_in_reverse=reverse)
        results.append({k: out[k].clone() for k in KEYS})
        stored = dict(out)
        if bf16_store:
            stored["maskmem_features"] = out["maskmem_features"].to(torch.bfloat16)
        bank = "cond_frame_outputs" if kind is not None else "non_cond_frame_outputs"
        output_dict[bank][t] = stored
        if kind is not None:
            output_dict["non_cond_frame_outputs"].pop(t, None)
    return results


def video_errors(ours, ref) -> Dict[str, float]:
    """Worst per-frame relative error of each output; object scores (one number per object
    and frame, some near zero) are compared over the whole video instead."""
    errs = {k: max(rel_err(o[k], r[k]) for o, r in zip(ours, ref)) for k in KEYS if k != "object_score_logits"}
    errs["object_score_logits"] = rel_err(torch.cat([o["object_score_logits"] for o in ours]),
                                          torch.cat([r["object_score_logits"] for r in ref]))
    return errs


def fmt(errs: Dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.1e}" for k, v in errs.items())


def presence(results) -> List[bool]:
    return [bool((r["object_score_logits"] > 0).any()) for r in results]


# ----------------------------------------------------------------------------- tracking
_POSTPROCESSING = ("++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
                   "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
                   "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98")
VARIANTS = {
    # name: (preset, extra overrides, schedule, frames, batch, obj_score_bias, check bf16 run)
    "forward": ("sam2.1_hiera_tiny", (), forward_schedule, 17, 1, 0.0, True),
    "reverse": ("sam2.1_hiera_tiny", (), reverse_schedule, 11, 1, 1.0, True),
    "no_past_pointers": ("sam2.1_hiera_tiny", (), future_prompt_schedule, 11, 1, 1.0, True),
    "sam2.0": ("sam2_hiera_tiny", (), forward_schedule, 11, 1, 1.0, True),
    # binarised click masks: the bf16 run's 1e-4 drift may flip a pixel of the 0/1 mask,
    # a legitimate jump, so only the exact and fp32 comparisons apply
    "closest_cond_stride2_batch2": (
        "sam2.1_hiera_tiny",
        ("++model.max_cond_frames_in_attn=2", "++model.memory_temporal_stride_for_eval=2",
         "++model.non_overlap_masks_for_mem_enc=true", "++model.binarize_mask_from_pts_for_mem_enc=true",
         *_POSTPROCESSING),
        forward_schedule, 11, 2, 1.0, False),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tracking_parity(variant):
    preset, extra, make_schedule, n, batch, bias, check_bf16 = VARIANTS[variant]
    ref, ours, hybrid = build_models(preset, extra, seed=len(variant), obj_score_bias=bias)
    schedule = make_schedule(n)
    frames, prompts = make_inputs(schedule, batch, seed=7)

    def run(model, bf16_store=True):
        return run_video(model, schedule, frames, prompts, n, bf16_store)

    r16 = run(ref)  # memories stored in bf16 as the video predictor stores them
    # 1) our tracking logic around the reference submodules: identical to the last bit
    #    (also shows the fp32 cast: the hybrid's reference attention is not patched, and
    #    frames without pointers would hand it a bf16 memory)
    pointer_tokens = []
    attend = hybrid.memory_attention.forward
    hybrid.memory_attention.forward = lambda **kw: pointer_tokens.append(kw["num_obj_ptr_tokens"]) or attend(**kw)
    errs = video_errors(run(hybrid), r16)
    if variant == "no_past_pointers":
        assert 0 in pointer_tokens, "no frame attended to spatial memories alone"
    assert max(errs.values()) <= 1e-6, "hybrid: " + fmt(errs)
    # 2) our whole model, fp32 memories: the 1e-4 parity bound
    errs32 = video_errors(run(ours, False), run(ref, False))
    assert max(errs32.values()) <= TOL, "ours, fp32 memories: " + fmt(errs32)
    # 3) our whole model, bf16 memories: a 1e-6 difference flips the bf16 rounding of a few
    #    memory elements by one ulp (2^-8 relative) and the video carries that along;
    #    measured 3e-5 .. 3.4e-4 (worst frame) across seeds, hence the looser bound
    errs16 = video_errors(run(ours), r16) if check_bf16 else {}
    assert max(errs16.values(), default=0.0) <= 2e-3, "ours, bf16 memories: " + fmt(errs16)

    seen = presence(r16)
    if variant in ("forward", "sam2.0"):
        assert any(seen) and not all(seen), "this variant must mix present and absent frames"
    print(f"{variant}: presence={''.join('P' if p else '.' for p in seen)}\n  fp32 {fmt(errs32)}"
          f"\n  bf16 {fmt(errs16)}\n  hybrid {fmt(errs)}")


# ----------------------------------------------------------------------------- mutations
MUTATION_FRAMES = 17  # frame 16 then attends to 16 pointers = 64 tokens = one 8x8 memory frame


@pytest.fixture(scope="module")
def mutation_setup():
    ref, ours, _ = build_models(seed=11, obj_score_bias=1.0)
    schedule = forward_schedule(MUTATION_FRAMES)
    frames, prompts = make_inputs(schedule, 1, seed=12)
    expected = run_video(ref, schedule, frames, prompts, MUTATION_FRAMES, bf16_store=False)
    return ours, schedule, frames, prompts, expected


def _mutated_error(setup) -> float:
    ours, schedule, frames, prompts, expected = setup
    got = run_video(ours, schedule, frames, prompts, MUTATION_FRAMES, bf16_store=False)
    return max(video_errors(got, expected).values())


def test_mutation_baseline(mutation_setup):
    assert _mutated_error(mutation_setup) <= TOL


def test_mutation_temporal_slot_order(mutation_setup):
    ours = mutation_setup[0]
    table = ours.maskmem_tpos_enc.data.clone()
    ours.maskmem_tpos_enc.data = table.flip(0)  # newest memory read with the oldest slot's code
    try:
        err = _mutated_error(mutation_setup)
    finally:
        ours.maskmem_tpos_enc.data = table
    print(f"reversed temporal slots: {err:.2e}")
    assert err >= 10 * TOL, f"reversed temporal slots moved the output by only {err:.2e}"


def test_mutation_pointer_count(mutation_setup, monkeypatch):
    honest = base_mod.pointer_sources
    monkeypatch.setattr(base_mod, "pointer_sources", lambda *a, **k: honest(*a, **k)[:-1])  # drop one
    err = _mutated_error(mutation_setup)
    print(f"one pointer fewer: {err:.2e}")
    assert err >= 10 * TOL, f"one pointer fewer moved the output by only {err:.2e}"


def test_mutation_rope_on_pointer_tokens(mutation_setup, monkeypatch):
    ours = mutation_setup[0]
    honest = ours.memory_attention.forward
    hits = []

    def rotate_pointers_too(*args, **kwargs):
        memory, grid = kwargs["memory"], kwargs["curr"][0].shape[0]
        if kwargs["num_obj_ptr_tokens"] and memory.shape[0] % grid == 0:
            hits.append(kwargs["num_obj_ptr_tokens"])
            kwargs["num_obj_ptr_tokens"] = 0  # pointer tokens get RoPE as if they were a frame
        return honest(*args, **kwargs)

    monkeypatch.setattr(ours.memory_attention, "forward", rotate_pointers_too)
    err = _mutated_error(mutation_setup)
    print(f"RoPE on pointer tokens ({len(hits)} frames): {err:.2e}")
    assert hits, "no frame had a pointer block the size of a memory frame"
    assert err >= 10 * TOL, f"RoPE on pointer tokens moved the output by only {err:.2e}"
