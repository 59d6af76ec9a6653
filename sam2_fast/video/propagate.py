"""Tracking: prompts on one object, the pre-tracking merge of prompts, the frame loop.

A tracked frame runs ONE batched step for all objects that need it (``track_objects``:
``SAM2Base.track_objects_step``); a prompt runs ``track_step`` for its object. Memory
selection itself (which past frames and pointers a frame attends to, and their temporal
encodings) lives in ``SAM2Base._memory_plan``; this module decides which outputs exist
and where they are stored.
"""

from __future__ import annotations

import numbers
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor
from tqdm import tqdm

from sam2_fast.video import outputs as O
from sam2_fast.video.prompts import check_frame_idx
from sam2_fast.video.state import COND, NON_COND, FrameOutput, ObjectTrack, PointPrompt, VideoSession


# Testing and benchmarks only: track each object on its own with the official
# ``track_step`` (batch 1, as the reference predictor does) instead of the batched step
# (prompted-frame memories encoded one object at a time too).
# The exactness tests compare the two; ``sam2-fast bench`` reports both.
TRACK_PER_OBJECT = False


def run_frame(model, session: VideoSession, obj: ObjectTrack, frame_idx: int, is_init_cond_frame: bool,
              point_inputs: Optional[PointPrompt], mask_inputs: Optional[Tensor], reverse: bool,
              run_mem_encoder: bool, prev_sam_mask_logits: Optional[Tensor] = None) -> Tuple[FrameOutput, Tensor]:
    """Segment one object on one frame from its prompts and memories.

    Returns the compact output to store and the (1, 1, S/4, S/4) mask logits on the
    compute device.
    """
    if point_inputs is not None and mask_inputs is not None:
        raise ValueError("a frame takes either clicks or a mask for one object, not both")
    _, _, feats, pos, sizes = O.frame_features(model, session, frame_idx, batch_size=1)
    num_frames = None if session.open_ended else session.num_frames
    # positional, in track_step's own order: frame, its role, features, prompts, memory bank
    out = model.track_step(frame_idx, is_init_cond_frame, feats, pos, sizes, point_inputs, mask_inputs,
                           obj.outputs, num_frames, reverse, run_mem_encoder, prev_sam_mask_logits)
    return O.compact_output(model, session, out)


def encode_memories(model, session: VideoSession, frame_idx: int, outs: List[FrameOutput]) -> None:
    """Memories of prompted frames, encoded from their final (possibly edited) masks: all
    objects prompted on ``frame_idx`` in one memory-encoder call, stored as row views of
    one tensor (so tracking copies this conditioning slot for all of them at once)."""
    from sam2_fast.modeling.batched_step import step_rows

    n = len(outs)
    # the tracking rows here too: the memory encoder's compiled code / graph of the
    # session's bucket is shared with tracking instead of one more shape per object count
    rows = step_rows(model, n, session.num_objects)
    _, _, feats, _, sizes = O.frame_features(model, session, frame_idx, batch_size=rows)
    image_hw = (model.image_size, model.image_size)
    low_res = [out["pred_masks"].to(session.device) for out in outs]
    scores = [out["object_score_logits"] for out in outs]
    if rows > n:  # padding rows: an empty mask, never stored
        low_res.append(low_res[0].new_full((rows - n,) + tuple(low_res[0].shape[1:]), -1024.0))
        scores.append(scores[0].new_full((rows - n,) + tuple(scores[0].shape[1:]), -1024.0))
    low_res = torch.cat(low_res) if len(low_res) > 1 else low_res[0]
    scores = torch.cat(scores) if len(scores) > 1 else scores[0]
    features, pos_enc = model._encode_new_memory(
        current_vision_feats=feats,
        feat_sizes=sizes,
        pred_masks_high_res=O.resize_logits(low_res, image_hw),
        object_score_logits=scores,
        is_mask_from_pts=True,  # prompted frames: the user vouched for this mask
        separate_objects=True,  # each row its own object, as when encoded one by one
    )
    stored = O.store_memory(session, features[:n])
    if rows > n and stored.data_ptr() == features.data_ptr():
        stored = stored.clone()  # a view would keep the padding rows alive
    O.shared_pos_enc(session, pos_enc)
    for out, row in zip(outs, stored.split(1) if n > 1 else (stored,)):
        out["maskmem_features"] = row
        out["maskmem_pos_enc"] = list(session.maskmem_pos_enc)


def clears_around_input(model, session: VideoSession) -> bool:
    # stale neighbours are only dropped for single-object sessions unless asked for all
    return bool(model.clear_non_cond_mem_around_input) and (
        bool(model.clear_non_cond_mem_for_multi_obj) or session.num_objects <= 1)


def clear_non_cond_around(model, obj: ObjectTrack, frame_idx: int) -> None:
    """Forget tracked (non-conditioning) memories within reach of a newly prompted frame."""
    reach = model.memory_temporal_stride_for_eval * model.num_maskmem
    table = obj.outputs[NON_COND]
    for t in range(frame_idx - reach, frame_idx + reach + 1):
        table.pop(t, None)


def preflight(model, session: VideoSession) -> None:
    """Encode memories of newly prompted frames and move them into the tracked outputs."""
    if session.num_objects == 0:
        raise RuntimeError("No input points or masks are provided for any object; please add inputs "
                           "first (add_new_points_or_box or add_new_mask).")
    # check before changing anything so a failure leaves the session as it was
    for obj in session.objects:
        if not obj.outputs[COND] and not obj.pending[COND]:
            raise RuntimeError(f"No input points or masks are provided for object id {obj.obj_id}; "
                               f"please add inputs first.")
    to_encode: Dict[int, List[FrameOutput]] = {}
    for obj in session.objects:
        for key in (NON_COND, COND):
            for frame_idx, out in obj.pending[key].items():
                if out["maskmem_features"] is None:
                    to_encode.setdefault(frame_idx, []).append(out)
    for frame_idx in sorted(to_encode):  # one memory-encoder call per prompted frame
        outs = to_encode[frame_idx]
        for group in ([[o] for o in outs] if TRACK_PER_OBJECT else [outs]):
            encode_memories(model, session, frame_idx, group)
    clear = clears_around_input(model, session)
    for obj in session.objects:
        for key in (NON_COND, COND):
            for frame_idx, out in obj.pending[key].items():
                obj.outputs[key][frame_idx] = out
                if clear:
                    clear_non_cond_around(model, obj, frame_idx)
            obj.pending[key].clear()
        # a frame that became conditioning must not also count as a tracked memory
        for frame_idx in obj.outputs[COND]:
            obj.outputs[NON_COND].pop(frame_idx, None)


def frame_order(session: VideoSession, start_frame_idx: Optional[int], max_frame_num_to_track: Optional[int],
                reverse: bool) -> range:
    """Frames visited by one propagation call, in visiting order."""
    n = session.num_frames
    if start_frame_idx is None:
        # the earliest prompted frame of any object
        start_frame_idx = min(t for obj in session.objects for t in obj.outputs[COND])
    if max_frame_num_to_track is None:
        max_frame_num_to_track = n
    if reverse:
        stop = max(start_frame_idx - max_frame_num_to_track, 0)
        # starting on frame 0 there is nothing before it to track
        return range(start_frame_idx, stop - 1, -1) if start_frame_idx > 0 else range(0)
    stop = min(start_frame_idx + max_frame_num_to_track, n - 1)
    return range(start_frame_idx, stop + 1)


def reach_window(model) -> int:
    """How many frames back forward tracking can still read memories or pointers from."""
    spatial = model.memory_temporal_stride_for_eval * model.num_maskmem + 1
    pointers = model.max_obj_ptrs_in_encoder if model.use_obj_ptrs_in_encoder else 0
    return max(spatial, pointers)


def drop_unreachable(model, session: VideoSession, frame_idx: int) -> None:
    """keep_outputs="reachable": forget tracked outputs forward tracking can no longer use.

    Only non-conditioning outputs older than the memory / pointer windows go; prompted
    frames are kept (every later frame attends to them).
    """
    horizon = frame_idx - reach_window(model)
    for obj in session.objects:
        table = obj.outputs[NON_COND]
        stale = [t for t in table if t < horizon]
        for t in stale:
            del table[t]
        forgotten = [t for t in obj.tracked if t < horizon and t not in obj.outputs[COND]]
        for t in forgotten:
            del obj.tracked[t]
        if forgotten:
            obj.mark_dropped(forgotten)  # a later prompt there is warned about


def _check_objects_kept(session: VideoSession, objects: List[ObjectTrack]) -> None:
    """Objects may be added while a propagation loop runs, not removed."""
    live = session.objects
    if len(live) < len(objects) or any(a is not b for a, b in zip(live, objects)):
        gone = [o.obj_id for o in objects if not any(o is x for x in live)]
        raise RuntimeError(
            f"object(s) {gone} were removed (remove_object / reset_state) while propagate_in_video was "
            "running, so this loop stopped; call propagate_in_video again to track the remaining objects")


def propagate(model, session: VideoSession, start_frame_idx: Optional[int] = None,
              max_frame_num_to_track: Optional[int] = None, reverse: bool = False,
              progress: bool = True) -> Iterator[Tuple[int, List, Tensor]]:
    """Track every object through the video, yielding (frame_idx, obj_ids, video_res_masks)."""
    # arguments first: a rejected call must not have merged the pending prompts
    if start_frame_idx is not None:
        start_frame_idx = check_frame_idx(session, start_frame_idx)
    if max_frame_num_to_track is not None:
        if isinstance(max_frame_num_to_track, bool) or not isinstance(max_frame_num_to_track, numbers.Integral):
            raise TypeError(f"max_frame_num_to_track must be an integer, got {max_frame_num_to_track!r}")
        if max_frame_num_to_track < 0:
            raise ValueError(f"max_frame_num_to_track must be >= 0, got {max_frame_num_to_track}")
    preflight(model, session)
    # the objects of this call: one added while the loop runs joins from the next call, as
    # with the official predictor (its prompts wait in ``pending`` until the next preflight)
    objects = list(session.objects)
    obj_ids = session.obj_ids
    order = frame_order(session, start_frame_idx, max_frame_num_to_track, reverse)
    prune = session.keep_outputs == "reachable" and not reverse
    clear = clears_around_input(model, session)
    for frame_idx in tqdm(order, desc="propagate in video", disable=not progress):
        _check_objects_kept(session, objects)
        stacked = track_frame(model, session, frame_idx, reverse, clear, objects)
        video_masks = O.video_res_output(model, session, stacked)
        if prune:
            drop_unreachable(model, session, frame_idx + 1)
        yield frame_idx, obj_ids, video_masks


def track_frame(model, session: VideoSession, frame_idx: int, reverse: bool, clear: bool,
                objects: Optional[List] = None) -> Tensor:
    """The per-frame step of every front end (video predictor, streaming tracker).

    Tracks every object on ``frame_idx`` from its memories (objects prompted on this frame
    keep their stored output), stores the outputs and marks the frame tracked. ``clear``:
    forget tracked memories around prompted frames (see :func:`clears_around_input`).
    ``objects``: the objects of this propagation (default: the session's current ones).
    Returns the low-res mask logits of all objects, (num_objects, 1, S/4, S/4).
    """
    objects = session.objects if objects is None else objects
    per_obj: List[Optional[Tensor]] = [None] * len(objects)
    todo: List[int] = []
    for i, obj in enumerate(objects):
        prompted = obj.outputs[COND].get(frame_idx)
        if prompted is not None:
            # prompted frames already hold their final output (objects may differ in
            # their number of clicks, so they are not re-run)
            per_obj[i] = prompted["pred_masks"].to(session.device, non_blocking=True)
            if clear:
                clear_non_cond_around(model, obj, frame_idx)
        else:
            todo.append(i)
    if todo and TRACK_PER_OBJECT:
        for i in todo:
            out, per_obj[i] = run_frame(model, session, objects[i], frame_idx, is_init_cond_frame=False,
                                        point_inputs=None, mask_inputs=None, reverse=reverse,
                                        run_mem_encoder=True)
            objects[i].outputs[NON_COND][frame_idx] = out
        todo = []
    stacked = track_objects(model, session, frame_idx, [objects[i] for i in todo], reverse) if todo else None
    for obj in objects:
        obj.tracked[frame_idx] = {"reverse": reverse}
    if stacked is not None and len(todo) == len(objects):
        return stacked  # every object tracked: already one (num_obj, 1, h, w) tensor
    if stacked is not None:
        for row, i in enumerate(todo):
            per_obj[i] = stacked[row:row + 1]
    return per_obj[0] if len(per_obj) == 1 else torch.cat(per_obj, dim=0)  # (num_obj, 1, h, w)


def track_objects(model, session: VideoSession, frame_idx: int, objects: List[ObjectTrack],
                  reverse: bool) -> Tensor:
    """Track ``objects`` on an unprompted frame in ONE batched step; stores their outputs.

    Returns their low-res mask logits (len(objects), 1, S/4, S/4) on the compute device.
    """
    from sam2_fast.modeling.batched_step import step_rows

    n = len(objects)
    rows = step_rows(model, n, session.num_objects)
    num_frames = None if session.open_ended else session.num_frames
    # per object: which stored memories / pointers it reads (Python only, validated first)
    plans = [model._memory_plan(frame_idx, obj.outputs, num_frames, reverse) for obj in objects]
    _, _, feats, pos, sizes = O.frame_features(model, session, frame_idx, batch_size=rows)
    out = model.track_objects_step(frame_idx, feats, pos, sizes, plans, rows)
    kept, masks = O.compact_output(model, session, out, rows=n)  # padding rows are never stored
    for obj, row in zip(objects, O.split_rows(session, kept, n)):
        obj.outputs[NON_COND][frame_idx] = row
    return masks
