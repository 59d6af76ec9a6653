"""Which past frames a tracking step reads: conditioning frames, memory slots, object pointers.

Everything here is plain Python over frame indices (no tensors except the sine table), so
the per-frame bookkeeping stays cheap and can be unit-tested on its own. ``SAM2Base``
turns the chosen frames into memory tokens.

Vocabulary used below:

* *conditioning frames* carry user prompts; they sit at temporal position 0;
* *memory slots* ``t_pos = 1 .. num_maskmem - 1`` hold the most recent tracked frames,
  ``t_pos = num_maskmem - 1`` being the frame right before the current one (in the
  tracking direction);
* *object pointers* are one vector per frame, tagged with the (signed) frame distance.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch

from sam2_fast.modeling.common import to_device_async

FrameOutputs = Mapping[int, dict]


def select_closest_cond_frames(
    frame_idx: int, cond_frame_outputs: FrameOutputs, max_cond_frame_num: int
) -> Tuple[FrameOutputs, Dict[int, dict]]:
    """Split conditioning outputs into (attended, left out) for the frame ``frame_idx``.

    With ``max_cond_frame_num == -1`` (or few enough conditioning frames) every one is attended.
    Otherwise we keep the nearest one strictly before the frame, the nearest one at or after
    it, and then the remaining ones by temporal distance until the budget is spent.
    Parameter names are the official ones (``sam2.modeling.sam2_utils``): callers pass them
    by keyword too.
    """
    if max_cond_frame_num == -1 or len(cond_frame_outputs) <= max_cond_frame_num:
        return cond_frame_outputs, {}  # common case: no copy of the dict
    if max_cond_frame_num < 2:
        raise ValueError(
            f"max_cond_frames_in_attn must be -1 or >= 2 (one frame on each side), got {max_cond_frame_num}"
        )
    earlier = [t for t in cond_frame_outputs if t < frame_idx]
    later = [t for t in cond_frame_outputs if t >= frame_idx]
    keep: List[int] = []
    if earlier:
        keep.append(max(earlier))
    if later:
        keep.append(min(later))
    # stable sort: ties keep the dict's insertion order
    by_distance = sorted((t for t in cond_frame_outputs if t not in keep), key=lambda t: abs(t - frame_idx))
    keep.extend(by_distance[: max_cond_frame_num - len(keep)])
    chosen = {t: cond_frame_outputs[t] for t in keep}
    rest = {t: out for t, out in cond_frame_outputs.items() if t not in chosen}
    return chosen, rest


def _floor_to(x: int, step: int) -> int:
    return (x // step) * step


def _ceil_to(x: int, step: int) -> int:
    return -((-x) // step) * step


def memory_slot_frames(frame_idx: int, num_maskmem: int, stride: int, reverse: bool) -> List[Tuple[int, int]]:
    """``(t_pos, frame index)`` for the non-conditioning memory slots, oldest slot first.

    The newest slot (``t_pos = num_maskmem - 1``) is always the adjacent frame. The older
    ones are taken on the grid of multiples of ``stride``, starting from the grid point
    at least two frames away and stepping further into the past (the future when
    tracking in reverse). With ``stride == 1`` this is simply the previous frames.
    """
    plan = []
    for t_pos in range(1, num_maskmem):
        steps_back = num_maskmem - t_pos
        if steps_back == 1:
            idx = frame_idx + 1 if reverse else frame_idx - 1
        elif reverse:
            idx = _ceil_to(frame_idx + 2, stride) + (steps_back - 2) * stride
        else:
            idx = _floor_to(frame_idx - 2, stride) - (steps_back - 2) * stride
        plan.append((t_pos, idx))
    return plan


def pointer_sources(
    frame_idx: int,
    cond_attended: FrameOutputs,
    cond_left_out: Mapping[int, dict],
    non_cond: Mapping[int, dict],
    num_frames: Optional[int],
    max_ptrs: int,
    reverse: bool,
    past_only: bool,
    signed: bool,
) -> List[Tuple[int, dict]]:
    """``(temporal offset, frame output)`` of every object pointer the frame attends to.

    First the attended conditioning frames (only those not in the future when
    ``past_only``), tagged with their distance (signed along the tracking direction, or
    absolute); then up to ``max_ptrs - 1`` frames walking back from the current one, tagged
    with the number of steps. A walked frame comes from the tracked (non-conditioning)
    outputs, or from a conditioning frame that was left out of attention.
    """
    direction = -1 if reverse else 1
    sources: List[Tuple[int, dict]] = []
    for t, out in cond_attended.items():
        if past_only and (t < frame_idx if reverse else t > frame_idx):
            continue
        offset = (frame_idx - t) * direction if signed else abs(frame_idx - t)
        sources.append((offset, out))
    for steps in range(1, max_ptrs):
        t = frame_idx - steps * direction
        if t < 0 or (num_frames is not None and t >= num_frames):
            break  # walked off the video
        out = non_cond.get(t)
        if out is None:
            out = cond_left_out.get(t)
        if out is not None:
            sources.append((steps, out))
    return sources


def sine_pe_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Transformer sine/cosine encoding of scalar positions: (...,) -> (..., dim).

    The first half of the channels holds the sines, the second half the cosines; channel
    pairs (2i, 2i+1) share a frequency.
    """
    half = dim // 2
    expo = torch.arange(half, dtype=torch.float32, device=positions.device)
    freqs = temperature ** (2 * (expo // 2) / half)  # (half,)
    angles = positions.unsqueeze(-1) / freqs  # (..., half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def non_overlapping_logits(masks: torch.Tensor) -> torch.Tensor:
    """Keep each pixel only for the object with the highest logit: (B, 1, H, W) -> same.

    Losing objects are clamped to at most -10 (sigmoid ~ 4.5e-5) so their masks vanish
    without discarding how confident they were.
    """
    num_obj = masks.size(0)
    if num_obj == 1:
        return masks
    winner = masks.argmax(dim=0, keepdim=True)  # (1, 1, H, W)
    ids = torch.arange(num_obj, device=masks.device).view(num_obj, 1, 1, 1)
    return torch.where(winner == ids, masks, masks.clamp(max=-10.0))


def offset_sines(offsets: Tuple[int, ...], span: int, width: int, device: torch.device) -> torch.Tensor:
    """sine_pe_1d(offsets / span): (N, width) float32, no weights involved (pointer offsets).

    On CUDA the table is computed on the host and uploaded from pinned memory without
    blocking: ``torch.tensor(offsets, device=cuda)`` (the reference's way) is a pageable
    host->device copy that waits for the stream, i.e. a sync per tracked frame, plus ~8
    tiny kernels. Not cached: a conditioning frame's offset grows with every frame, so
    a cache keyed on the offsets missed on every frame of a stream (and its evictions
    made live memory oscillate, caught by tests/test_stream_memory.py).
    """
    def build(on: torch.device) -> torch.Tensor:
        return sine_pe_1d(torch.tensor(list(offsets), device=on) / span, width)

    if (device.type != "cuda" or torch.compiler.is_compiling()
            or torch.cuda.is_current_stream_capturing()):
        return build(device)
    return to_device_async(build(torch.device("cpu")), device)
