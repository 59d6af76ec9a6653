"""One tracking step for many objects at once (``SAM2Base.track_objects_step``).

Per tracked frame the video predictor and the streaming tracker run ONE memory attention,
one mask decoder and one memory encoder call for all objects that need tracking, stacked
on the batch dimension (the official predictor runs them once per object at batch 1). The
frame's image features are computed once and expanded (views, no copies). Each object
keeps its own memories: its :class:`~sam2_fast.modeling.memory_gather.MemoryPlan` lands in
its own row of a padded bank with its own valid counts (``memory_gather``).

The memory attention is reached in one of three ways, all on the same row layout:

* the fast runtime's static bank (``_fast_runtime_bank``): the bucket's fixed capacity, its
  persistent buffers and its compiled / CUDA-graphed core, per-row ``key_ok`` (B, Nk);
* sam2_fast's own :class:`MemoryAttention` with rows of different layouts: the same padded
  computation (``static_bank.padded_attention``) on a tight bank, eager;
* every row with the same layout and nothing padded (one object, or objects tracked
  together: the common case): the module's official call, so a stand-in module (tests run
  the reference's) sees exactly the per-object inputs, batched.

Rows of a foreign memory-attention module with different layouts are attended one row at
a time (counted in ``batched_step.COUNTERS``).
"""

from __future__ import annotations

import collections
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from sam2_fast.modeling.common import seq_to_map
from sam2_fast.modeling.memory_gather import MemoryPlan, PaddedMemory, build_memory
from sam2_fast.profiling import stage

COUNTERS: collections.Counter = collections.Counter()

# Object batches are padded to these sizes (then multiples of 16) when the runtime wants
# static shapes (static bank / compile / CUDA graphs): a few shapes instead of one per count.
_BUCKETS = (1, 2, 4, 8, 16)


def batch_bucket(num_objects: int) -> int:
    """Rows for ``num_objects``: 1, 2, 4, 8, 16, then the next multiple of 16."""
    if num_objects < 1:
        raise ValueError(f"need at least one object, got {num_objects}")
    for b in _BUCKETS:
        if num_objects <= b:
            return b
    return -(-num_objects // 16) * 16


def wants_static_shapes(model) -> bool:
    """Pad object batches to buckets: only when the fast runtime's static bank is installed
    (compiled code and CUDA graphs are keyed on shapes). Eager runs use the exact count:
    padding rows there would be pure extra work (a 9th object would double the step)."""
    return model.__dict__.get("_fast_runtime_bank") is not None


def step_rows(model, n: int, session_objects: int) -> int:
    """Rows of a batched call on ``n`` of a session's ``session_objects`` objects.

    Eager: ``n``. Under static shapes: the bucket of the whole session, not of ``n``, so a
    frame where some objects are prompted (their stored output is kept, the rest tracked)
    or a correction's memory reuses the session's compiled code and CUDA graph instead of
    compiling one more bucket (3 objects, one corrected: 3 graphs more, minutes each under
    max-autotune; tests/test_compile_census.py). The padding rows cost work only on such
    frames."""
    if not wants_static_shapes(model):
        return n
    return batch_bucket(max(n, session_objects))


def _bank_layout(model, plans: Sequence[MemoryPlan]) -> Tuple[Optional[Any], Optional[int], Optional[int]]:
    """(static bank, frames, pointer tokens) of the bucket that holds the plans, or Nones
    (tight layout) when no bank is installed or the plans exceed its largest bucket."""
    bank = model.__dict__.get("_fast_runtime_bank")
    if bank is None or bank.inner.training:
        return None, None, None
    per_ptr = model.hidden_dim // model.mem_dim if model.use_obj_ptrs_in_encoder else 1
    need_f = max(len(p.slots) for p in plans)
    need_p = max(len(p.pointers) for p in plans) * per_ptr
    frames = next((f for f in bank.frame_buckets if f >= need_f), None)
    reason = None
    if frames is None:
        reason = "more memory frames than the largest bucket"
    elif need_p > bank.pointer_tokens:
        reason = "more pointer tokens than the pointer capacity"
    if reason is not None:
        bank.counters["bank_fallbacks"] += 1
        bank.counters[f"bank_fallback: {reason}"] += 1
        return None, None, None
    spatial, total = bank.layout(frames, 1)
    return bank, frames, total - spatial


def conditioned_features(model, frame_idx: int, feats: Tensor, pos: Tensor, size: Tuple[int, int],
                         plans: Sequence[MemoryPlan], rows: int) -> Tensor:
    """Lowest-level features (HW, rows, C) fused with each row's memories -> (rows, C, H, W)."""
    if model.num_maskmem == 0:
        return seq_to_map(feats, size)
    hw = feats.shape[0]
    dtype = torch.promote_types(feats.dtype, model.maskmem_tpos_enc.dtype)
    bank, frames, ptr_tokens = _bank_layout(model, plans)
    if bank is not None:
        spatial, total = bank.layout(frames, hw)
        bufs = bank.buffers(frames, hw, rows, model.mem_dim, dtype, feats.device)
        mem = build_memory(model, plans, rows, hw, dtype, feats.device, frames=frames,
                           ptr_tokens=total - spatial, buffers=bufs, want_mask=True)
        fused = bank.run_rows(feats, pos, mem.memory, mem.memory_pos, mem.key_ok, frames)
        return seq_to_map(fused, size)
    mem = build_memory(model, plans, rows, hw, dtype, feats.device)
    return seq_to_map(_attend(model, feats, pos, mem), size)


def _attend(model, feats: Tensor, pos: Tensor, mem: PaddedMemory) -> Tensor:
    attention = model.memory_attention
    if mem.key_ok is None:  # one layout, nothing padded: the module's own (official) call
        return attention(curr=[feats], curr_pos=[pos], memory=mem.memory.transpose(0, 1),
                         memory_pos=mem.memory_pos.transpose(0, 1), num_obj_ptr_tokens=mem.num_ptr_tokens)
    from sam2_fast.runtime.static_bank import check_supported, padded_attention

    if check_supported(attention) is None:
        return padded_attention(attention, feats, pos, mem.memory, mem.memory_pos, mem.key_ok, mem.num_spatial)
    # a stand-in module without key masks: each row on its own valid keys
    COUNTERS["rows attended one at a time (foreign memory attention)"] += 1
    out = []
    for r, (n_sp, n_ptr) in enumerate(mem.counts):
        keep = torch.cat([torch.arange(n_sp), mem.num_spatial + torch.arange(n_ptr)]).to(feats.device)
        m, mp = mem.memory[r:r + 1, keep], mem.memory_pos[r:r + 1, keep]
        out.append(attention(curr=[feats[:, r:r + 1]], curr_pos=[pos[:, r:r + 1]], memory=m.transpose(0, 1),
                             memory_pos=mp.transpose(0, 1), num_obj_ptr_tokens=n_ptr))
    return torch.cat(out, dim=1)


def track_objects_step(model, frame_idx: int, vision_feats: List[Tensor], vision_pos: List[Tensor],
                       feat_sizes: List[Tuple[int, int]], plans: Sequence[MemoryPlan], rows: int,
                       run_mem_encoder: bool = True) -> Dict[str, Any]:
    """Track the plans' objects on one frame (no prompts; ``is_init_cond_frame=False``).

    vision_feats / vision_pos: the frame's levels as (HW, rows, C) (one backbone pass,
    expanded); plans: one per object, stacked in order; rows >= the plans' rows (the
    rest is padding: it attends to one zero memory frame, its outputs are never used).
    Returns the batched outputs ``track_step`` would give per object: pred_masks (rows, 1,
    S/4, S/4), pred_masks_high_res, obj_ptr (rows, C), object_score_logits (rows, 1),
    maskmem_features (rows, mem_dim, S/16, S/16) and maskmem_pos_enc (or None).
    """
    high_res = None
    if len(vision_feats) > 1:
        high_res = [seq_to_map(x, s) for x, s in zip(vision_feats[:-1], feat_sizes[:-1])]
    with stage("memory_attention"):  # gather + attention, as the reference's stage holds both
        pix = conditioned_features(model, frame_idx, vision_feats[-1], vision_pos[-1], feat_sizes[-1], plans, rows)
    sam = model._forward_sam_heads(backbone_features=pix, point_inputs=None, mask_inputs=None,
                                   high_res_features=high_res, multimask_output=model._use_multimask(False, None))
    low_res, high_res_masks, obj_ptr, score_logits = sam[3:]
    out: Dict[str, Any] = {"pred_masks": low_res, "pred_masks_high_res": high_res_masks, "obj_ptr": obj_ptr,
                           "object_score_logits": score_logits, "maskmem_features": None, "maskmem_pos_enc": None}
    if run_mem_encoder and model.num_maskmem > 0:
        # each row is its own object: no non-overlap constraint across the batch (per-object
        # tracking sees a batch of one, where the constraint does nothing)
        feats, pos = model._encode_new_memory(vision_feats, feat_sizes, high_res_masks, score_logits,
                                              is_mask_from_pts=False, separate_objects=True)
        out["maskmem_features"], out["maskmem_pos_enc"] = feats, pos
    return out
