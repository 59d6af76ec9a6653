"""Per-frame outputs: compact storage, merging objects on a frame, video-resolution masks.

Functions here take the predictor (a ``SAM2Base``) as ``model`` and the
:class:`~sam2_fast.video.state.VideoSession` as ``session``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sam2_fast.modeling import kernel_gate
from sam2_fast.modeling.sam2_heads import NO_OBJ_SCORE  # score of a missing / absent object
from sam2_fast.profiling import stage
from sam2_fast.utils.masks import fill_holes_in_mask_scores
from sam2_fast.video.state import COND, NON_COND, FrameOutput, VideoSession


def resize_to_video(masks: Tensor, height: int, width: int) -> Tensor:
    """Bilinear resize of mask logits (N, 1, h, w) -> (N, 1, height, width).

    The one place video-resolution masks are produced. Where the mask-upsampling Triton
    kernel is enabled it goes through the ``upsample_masks`` dispatcher (the API returns
    logits, so the kernel writes them too); elsewhere ``F.interpolate`` as before.
    """
    if masks.shape[-2:] == (height, width):
        return masks
    if kernel_gate.kernel_enabled("mask_upsample", masks.device.type):
        _, logits = kernel_gate.dispatch().upsample_masks(masks, (height, width), want_logits=True,
                                                          want_mask=False)  # logits only: no mask bytes
        return logits
    return F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)


def resize_logits(masks: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinear resize between the internal mask resolutions (low-res <-> model input)."""
    return F.interpolate(masks, size=size, mode="bilinear", align_corners=False)


def fill_holes(masks: Tensor, max_area: int) -> Tensor:
    """Turn small background islands (area <= max_area, 8-connected) into weak foreground."""
    return fill_holes_in_mask_scores(masks, max_area)


# ---------------------------------------------------------------------- image features
def frame_features(model, session: VideoSession, frame_idx: int, batch_size: int) -> Tuple[Any, ...]:
    """(image, backbone_out, vision_feats, vision_pos_embeds, feat_sizes) for one frame.

    Only the last visited frame is cached: clicks on one frame reuse its backbone pass, and
    tracking visits every frame once, so a bigger cache would only hold memory.
    """
    hit = session.cached_frame
    if hit is not None and hit[0] == frame_idx:
        image, backbone_out = hit[1], hit[2]
    else:
        image = session.images[frame_idx].to(session.device).float().unsqueeze(0)  # (1, 3, S, S)
        backbone_out = model.forward_image(image)
        session.cached_frame = (frame_idx, image, backbone_out)
    # all objects of the frame share one backbone pass: broadcast along the batch
    widened = {
        "backbone_fpn": [f.expand(batch_size, -1, -1, -1) for f in backbone_out["backbone_fpn"]],
        "vision_pos_enc": [p.expand(batch_size, -1, -1, -1) for p in backbone_out["vision_pos_enc"]],
    }
    prepared = model._prepare_backbone_features(widened)
    return (image.expand(batch_size, -1, -1, -1),) + tuple(prepared)


# ---------------------------------------------------------------------- compact outputs
def shared_pos_enc(session: VideoSession, pos_enc: Optional[List[Tensor]]) -> Optional[List[Tensor]]:
    """The memory position encoding, stored once per session and expanded to the batch."""
    if pos_enc is None:
        return None
    if session.maskmem_pos_enc is None:
        session.maskmem_pos_enc = [p[:1].clone() for p in pos_enc]
    batch = pos_enc[0].shape[0]
    return [p.expand(batch, -1, -1, -1) for p in session.maskmem_pos_enc]


def store_memory(session: VideoSession, features: Tensor) -> Tensor:
    """Memories are kept in bfloat16 (as the official predictor does; parity needs the rounding)."""
    return features.to(torch.bfloat16).to(session.storage_device, non_blocking=True)


def compact_output(model, session: VideoSession, out: Dict[str, Any], rows: Optional[int] = None
                   ) -> Tuple[FrameOutput, Tensor]:
    """Keep what later frames need from ``track_step``'s output; also return the shown masks.

    ``rows``: keep only the first rows (the rest is batch padding, never stored)."""
    feats = out["maskmem_features"]
    if feats is not None:
        kept_feats = store_memory(session, feats if rows is None else feats[:rows])
        if rows is not None and rows != feats.shape[0] and kept_feats.data_ptr() == feats.data_ptr():
            kept_feats = kept_feats.clone()  # a view would keep the padding rows' memory alive
        feats = kept_feats
    masks = out["pred_masks"] if rows is None else out["pred_masks"][:rows]  # (B, 1, S/4, S/4) on the compute device
    if model.fill_hole_area > 0:
        masks = fill_holes(masks, model.fill_hole_area)
    ptr, score = out["obj_ptr"], out["object_score_logits"]
    kept: FrameOutput = {
        "maskmem_features": feats,
        "maskmem_pos_enc": shared_pos_enc(session, out["maskmem_pos_enc"]),
        "pred_masks": masks.to(session.storage_device, non_blocking=True),
        "obj_ptr": ptr if rows is None else ptr[:rows],  # small: stays on the compute device
        "object_score_logits": score if rows is None else score[:rows],
    }
    return kept, masks


def split_rows(session: VideoSession, batched: FrameOutput, n: int) -> List[FrameOutput]:
    """One FrameOutput per object: row views of the batched tensors.

    Objects tracked together keep each frame's memory in one tensor, so the next frames
    copy a memory slot for all of them in one op (``memory_gather``); every object still
    owns a plain ``FrameOutput`` dict (corrections, removal, offloading and keep_outputs
    replace or drop it as before).
    """
    keys = ("maskmem_features", "pred_masks", "obj_ptr", "object_score_logits")
    parts = {k: (batched[k].split(1) if batched[k] is not None else [None] * n) for k in keys}
    # the session's one copy of the memory position encoding, (1, ...) per level
    pos_rows = None if batched["maskmem_pos_enc"] is None else session.maskmem_pos_enc
    return [{"maskmem_features": parts["maskmem_features"][i],
             "maskmem_pos_enc": None if pos_rows is None else list(pos_rows),
             "pred_masks": parts["pred_masks"][i], "obj_ptr": parts["obj_ptr"][i],
             "object_score_logits": parts["object_score_logits"][i]} for i in range(n)]


def repack_rows(session: VideoSession) -> int:
    """One tensor per frame and output key holding exactly the live objects' rows.

    Objects tracked together keep a frame's outputs as row views of one tensor. After
    ``remove_object`` those tensors still hold the removed object's rows, and after
    ``pickle`` every view comes back with its own copy of the whole tensor (pickle does not
    keep views of one storage together): both are repacked here, in object order, so the
    memory is released and tracking again copies each slot for all objects in one op.
    Returns the number of tensors repacked.
    """
    from sam2_fast.modeling.memory_gather import row_storage

    frames: Dict[Tuple[str, int], List[FrameOutput]] = {}
    for obj in session.objects:
        for table_name, table in obj.outputs.items():
            for t, out in table.items():
                frames.setdefault((table_name, t), []).append(out)
    repacked = 0
    with torch.no_grad():
        for outs in frames.values():
            for key in ("maskmem_features", "pred_masks", "obj_ptr", "object_score_logits"):
                groups: Dict[Any, List[FrameOutput]] = {}
                for out in outs:
                    value = out.get(key)
                    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == 1:
                        like = (tuple(value.shape), value.dtype, value.device)
                        groups.setdefault(like, []).append(out)
                for members in groups.values():
                    rows = [m[key] for m in members]
                    used = sum(r.numel() * r.element_size() for r in rows)
                    if (len({row_storage(r) for r in rows}) == 1
                            and rows[0].untyped_storage().nbytes() == used):
                        continue  # already one tensor of exactly these rows
                    packed = torch.cat(rows) if len(rows) > 1 else rows[0].clone()
                    for m, row in zip(members, packed.split(1)):
                        m[key] = row
                    repacked += 1
    return repacked


# ---------------------------------------------------------------------- across objects
def merge_objects_on_frame(model, session: VideoSession, frame_idx: int, is_cond: bool,
                           at_video_res: bool = False) -> Tensor:
    """Stack every object's latest mask on a frame into (num_objects, 1, h, w).

    Objects without an output on this frame get the no-object score. Pending (just
    prompted) outputs win over stored ones.
    """
    prefer = COND if is_cond else NON_COND
    if at_video_res:
        size = (session.video_height, session.video_width)
    else:
        size = (model.image_size // 4, model.image_size // 4)
    merged = torch.full((session.num_objects, 1) + size, NO_OBJ_SCORE, dtype=torch.float32,
                        device=session.storage_device)
    for slot, obj in enumerate(session.objects):
        out = obj.latest_output(frame_idx, prefer)
        if out is None:
            continue
        masks = out["pred_masks"]
        if at_video_res:
            masks = resize_to_video(masks, *size)  # (1, 1, H, W): the upsampling path
        elif masks.shape[-2:] != size:
            masks = resize_logits(masks, size)
        merged[slot : slot + 1] = masks
    return merged


def video_res_output(model, session: VideoSession, masks: Tensor) -> Tensor:
    """Mask logits at the video's own resolution, optionally without overlaps between objects."""
    with stage("upsampling"):
        masks = masks.to(session.device, non_blocking=True)
        masks = resize_to_video(masks, session.video_height, session.video_width)
        if model.non_overlap_masks:
            masks = model._apply_non_overlapping_constraints(masks)
    return masks


def frame_has_pending_cond(session: VideoSession, frame_idx: int) -> bool:
    return any(frame_idx in obj.pending[COND] for obj in session.objects)
