"""Drop-in ``SAM2VideoPredictor``: click an object once, track it through a video.

Same public methods, arguments and yields as ``sam2.sam2_video_predictor.SAM2VideoPredictor``
and the same tracking semantics; the differences are what a session costs:

* frames are decoded lazily (``sam2_fast.video.frames``) instead of all up front;
* the session is a typed :class:`~sam2_fast.video.state.VideoSession`, also a read-only
  ``Mapping`` over the official ``inference_state`` keys (deep-copyable and picklable);
* ``init_state(..., keep_outputs="reachable")`` drops per-frame outputs that forward tracking
  can no longer reach, so a long stream runs in bounded memory (off by default: reverse
  tracking and corrections need the old outputs; a prompt on a dropped frame warns);
* bad input gets a clear error and leaves the session usable; hole filling works without
  a compiled extension.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Hashable, List, Optional, Tuple

import torch
from torch import Tensor

from sam2_fast.config import SAM2Config
from sam2_fast.modeling.sam2_base import NO_OBJ_SCORE, SAM2Base  # noqa: F401  (NO_OBJ_SCORE: as in sam2)
from sam2_fast.utils.misc import (  # noqa: F401  (importable from here, as in sam2)
    concat_points,
    fill_holes_in_mask_scores,
    load_video_frames,
)
from sam2_fast.video import outputs as O
from sam2_fast.video import prompts as P
from sam2_fast.video import propagate as T
from sam2_fast.video.state import (
    COND,
    KEEP_OUTPUT_POLICIES,
    NON_COND,
    ObjectTrack,
    PointPrompt,
    VideoSession,
)

_VIDEO_FIELDS = ("fill_hole_area", "non_overlap_masks", "clear_non_cond_mem_around_input",
                 "clear_non_cond_mem_for_multi_obj", "add_all_frames_to_correct_as_cond")


class UnknownObjectError(LookupError, RuntimeError):
    """An object id the session has never seen (a RuntimeError too, as the official one)."""


class SAM2VideoPredictor(SAM2Base):
    """SAM 2 video segmentation with user interaction (clicks, boxes, masks) on any frame."""

    def __init__(self, cfg: SAM2Config, **kwargs: Any) -> None:
        # the official constructor takes the video options as keywords: accept them as
        # overrides of the config so both spellings work
        changes = {k: kwargs.pop(k) for k in _VIDEO_FIELDS if k in kwargs}
        if changes:
            cfg = dataclasses.replace(cfg, **changes)
        super().__init__(cfg, **kwargs)
        self.fill_hole_area = int(cfg.fill_hole_area)
        self.non_overlap_masks = bool(cfg.non_overlap_masks)
        self.clear_non_cond_mem_around_input = bool(cfg.clear_non_cond_mem_around_input)
        self.clear_non_cond_mem_for_multi_obj = bool(cfg.clear_non_cond_mem_for_multi_obj)
        self.add_all_frames_to_correct_as_cond = bool(cfg.add_all_frames_to_correct_as_cond)

    # ------------------------------------------------------------------ session
    @torch.inference_mode()
    def init_state(self, video_path, offload_video_to_cpu: bool = False, offload_state_to_cpu: bool = False,
                   async_loading_frames: bool = False, *, keep_outputs: str = "all") -> VideoSession:
        """Open a video (JPEG folder, video file, or frames array) and start a session.

        ``keep_outputs="reachable"`` keeps only the outputs forward tracking can still reach
        (bounded memory on long streams). A prompt on a frame whose outputs were dropped then
        cannot correct the tracked mask: it warns (``UserWarning``) and starts a new
        conditioning frame from the prompt alone; use the default ``"all"`` to correct
        frames tracked long ago or to track in reverse.
        """
        from sam2_fast.video.frames import open_frames

        if keep_outputs not in KEEP_OUTPUT_POLICIES:
            raise ValueError(f"keep_outputs must be one of {KEEP_OUTPUT_POLICIES}, got {keep_outputs!r}")
        device = self.device
        frames = open_frames(video_path, image_size=self.image_size, device=device,
                             offload_video_to_cpu=offload_video_to_cpu, async_loading=async_loading_frames)
        session = VideoSession(
            images=frames,
            num_frames=len(frames),
            video_height=int(frames.video_height),
            video_width=int(frames.video_width),
            device=device,
            storage_device=torch.device("cpu") if offload_state_to_cpu else device,
            offload_video_to_cpu=offload_video_to_cpu,
            offload_state_to_cpu=offload_state_to_cpu,
            keep_outputs=keep_outputs,
        )
        # run the backbone on frame 0 now: a first click then answers at once, and an
        # unreadable video fails here rather than at the first prompt
        try:
            O.frame_features(self, session, 0, batch_size=1)
        except BaseException:
            close = getattr(frames, "close", None)
            if callable(close):
                close()  # stop prefetch workers of a session nobody will hold
            raise
        return session

    @classmethod
    def from_pretrained(cls, model_id: str, **kwargs: Any) -> "SAM2VideoPredictor":
        """A predictor with the official weights of ``model_id`` (e.g. facebook/sam2.1-hiera-tiny)."""
        from sam2_fast.build_sam import build_sam2_video_predictor_hf

        return build_sam2_video_predictor_hf(model_id, **kwargs)

    @torch.inference_mode()
    def reset_state(self, inference_state: VideoSession) -> None:
        """Forget every object, prompt and tracking result (the video stays open)."""
        for obj in inference_state.objects:
            obj.clear()
        inference_state.objects.clear()

    # ------------------------------------------------------------------ object ids
    def _obj_id_to_idx(self, inference_state: VideoSession, obj_id: Hashable) -> int:
        """The model-side slot of ``obj_id``; a new id gets the next slot (also mid-tracking)."""
        slot = inference_state.slot_of(obj_id)
        if slot is None:
            inference_state.objects.append(ObjectTrack(obj_id=P.check_obj_id(obj_id)))
            slot = inference_state.num_objects - 1
        return slot

    def _obj_idx_to_id(self, inference_state: VideoSession, obj_idx: int) -> Hashable:
        return inference_state.objects[obj_idx].obj_id

    def _get_obj_num(self, inference_state: VideoSession) -> int:
        return inference_state.num_objects

    def _known_slot(self, inference_state: VideoSession, obj_id: Hashable) -> int:
        slot = inference_state.slot_of(obj_id)
        if slot is None:
            raise UnknownObjectError(f"unknown object id {obj_id!r}; the session's object ids are "
                                     f"{inference_state.obj_ids}")
        return slot

    # ------------------------------------------------------------------ prompts
    @torch.inference_mode()
    def add_new_points_or_box(self, inference_state: VideoSession, frame_idx: int, obj_id: Hashable,
                              points=None, labels=None, clear_old_points: bool = True,
                              normalize_coords: bool = True, box=None) -> Tuple[int, List, Tensor]:
        """Clicks and/or a box for one object on one frame -> (frame_idx, obj_ids, masks).

        ``masks`` are (num_objects, 1, H, W) logits at video resolution for every object
        on this frame. A frame not yet tracked for this object becomes a conditioning frame;
        a tracked one gets a correction (the previous logits are fed back to the decoder).
        """
        session = inference_state
        frame_idx = P.check_frame_idx(session, frame_idx)
        P.check_obj_id(obj_id)
        new_points = P.build_point_prompt(session, self.image_size, points, labels, box,
                                          normalize_coords, clear_old_points)
        return self._add_prompt(session, frame_idx, obj_id, new_points, None, clear_old_points)

    def add_new_points(self, *args: Any, **kwargs: Any) -> Tuple[int, List, Tensor]:
        """Older name of :meth:`add_new_points_or_box`."""
        return self.add_new_points_or_box(*args, **kwargs)

    @torch.inference_mode()
    def add_new_mask(self, inference_state: VideoSession, frame_idx: int, obj_id: Hashable,
                     mask) -> Tuple[int, List, Tensor]:
        """A mask (2-D, any size) for one object on one frame -> (frame_idx, obj_ids, masks)."""
        session = inference_state
        frame_idx = P.check_frame_idx(session, frame_idx)
        P.check_obj_id(obj_id)
        mask_inputs = P.build_mask_prompt(session, self.image_size, mask)  # (1, 1, S, S)
        return self._add_prompt(session, frame_idx, obj_id, None, mask_inputs, True)

    def _add_prompt(self, session: VideoSession, frame_idx: int, obj_id: Hashable,
                    new_points: Optional[PointPrompt], mask_inputs: Optional[Tensor],
                    clear_old_points: bool) -> Tuple[int, List, Tensor]:
        is_new = session.slot_of(obj_id) is None
        obj = session.objects[self._obj_id_to_idx(session, obj_id)]
        if (obj.was_dropped(frame_idx) and frame_idx not in obj.tracked
                and frame_idx not in obj.pending[COND] and frame_idx not in obj.outputs[COND]):
            warnings.warn(
                f"frame {frame_idx} of object {obj_id!r} was tracked, but its outputs were dropped "
                "(init_state(..., keep_outputs='reachable')): this prompt cannot correct the tracked "
                "mask and starts a new conditioning frame from the prompt alone; use "
                "keep_outputs='all' to correct frames tracked long ago", UserWarning, stacklevel=3)
        saved = (obj.points.get(frame_idx), obj.masks.get(frame_idx))
        try:
            return self._run_prompt(session, obj, frame_idx, new_points, mask_inputs, clear_old_points)
        except BaseException:
            # leave the session as it was before this call
            if is_new:
                session.objects.remove(obj)
            else:
                for table, old in zip((obj.points, obj.masks), saved):
                    table.pop(frame_idx, None)
                    if old is not None:
                        table[frame_idx] = old
            raise

    def _run_prompt(self, session: VideoSession, obj: ObjectTrack, frame_idx: int,
                    new_points: Optional[PointPrompt], mask_inputs: Optional[Tensor],
                    clear_old_points: bool) -> Tuple[int, List, Tensor]:
        point_inputs = None
        if new_points is not None:
            old = None if clear_old_points else obj.points.get(frame_idx)
            point_inputs = P.append_points(old, new_points)
            obj.points[frame_idx] = point_inputs
            obj.masks.pop(frame_idx, None)
        else:
            obj.masks[frame_idx] = mask_inputs
            obj.points.pop(frame_idx, None)

        # an untracked frame starts a new conditioning frame (SAM-like, no memory);
        # a tracked one is a correction in the direction it was tracked
        seen = obj.tracked.get(frame_idx)
        is_init_cond_frame = seen is None
        reverse = False if seen is None else bool(seen["reverse"])
        is_cond = is_init_cond_frame or self.add_all_frames_to_correct_as_cond
        key = COND if is_cond else NON_COND

        prev_logits = None
        if point_inputs is not None:
            prev = obj.latest_output(frame_idx, prefer=key)
            if prev is not None and prev["pred_masks"] is not None:
                # feed the current mask back with the new clicks; clamped for stability
                prev_logits = prev["pred_masks"].to(session.device, non_blocking=True).clamp(-32.0, 32.0)
        # memories are encoded only when tracking starts, once all objects are final
        out, _ = T.run_frame(self, session, obj, frame_idx, is_init_cond_frame, point_inputs, mask_inputs,
                             reverse, run_mem_encoder=False, prev_sam_mask_logits=prev_logits)
        obj.pending[key][frame_idx] = out
        return frame_idx, session.obj_ids, self._frame_masks(session, frame_idx, is_cond)

    def _frame_masks(self, session: VideoSession, frame_idx: int, is_cond: bool) -> Tensor:
        merged = O.merge_objects_on_frame(self, session, frame_idx, is_cond, at_video_res=True)
        return O.video_res_output(self, session, merged)

    @torch.inference_mode()
    def clear_all_prompts_in_frame(self, inference_state: VideoSession, frame_idx: int, obj_id: Hashable,
                                   need_output: bool = True):
        """Remove one object's clicks / mask on a frame (its output there becomes a tracked one)."""
        session = inference_state
        frame_idx = P.check_frame_idx(session, frame_idx)
        obj = session.objects[self._known_slot(session, obj_id)]
        obj.points.pop(frame_idx, None)
        obj.masks.pop(frame_idx, None)
        obj.pending[COND].pop(frame_idx, None)
        obj.pending[NON_COND].pop(frame_idx, None)
        demoted = obj.outputs[COND].pop(frame_idx, None)
        if demoted is not None:
            obj.outputs[NON_COND][frame_idx] = demoted
            obj.tracked.pop(frame_idx, None)
        if not need_output:
            return None
        is_cond = O.frame_has_pending_cond(session, frame_idx)
        return frame_idx, session.obj_ids, self._frame_masks(session, frame_idx, is_cond)

    @torch.inference_mode()
    def remove_object(self, inference_state: VideoSession, obj_id: Hashable, strict: bool = False,
                      need_output: bool = True):
        """Drop an object -> (remaining obj_ids, [(frame_idx, masks) of its prompted frames])."""
        session = inference_state
        slot = session.slot_of(obj_id)
        if slot is None:
            if strict:
                raise UnknownObjectError(f"cannot remove object id {obj_id!r}: it does not exist; the "
                                         f"session's object ids are {session.obj_ids}")
            return session.obj_ids, []
        if session.num_objects == 1:
            self.reset_state(session)
            return session.obj_ids, []
        obj = session.objects[slot]
        prompted = sorted(set(obj.points) | set(obj.masks))
        for frame_idx in prompted:
            self.clear_all_prompts_in_frame(session, frame_idx, obj_id, need_output=False)
        del session.objects[slot]  # later objects move down one slot
        # frames tracked together store all objects' rows in one tensor: free the removed one's
        O.repack_rows(session)
        updated = []
        if need_output:
            # other objects may show more of themselves where the removed one was prompted
            for frame_idx in prompted:
                is_cond = O.frame_has_pending_cond(session, frame_idx)
                updated.append((frame_idx, self._frame_masks(session, frame_idx, is_cond)))
        return session.obj_ids, updated

    # ------------------------------------------------------------------ tracking
    @torch.inference_mode()
    def propagate_in_video_preflight(self, inference_state: VideoSession) -> None:
        """Encode the memories of prompted frames before tracking (checks every object has a prompt)."""
        T.preflight(self, inference_state)

    @torch.inference_mode()
    def propagate_in_video(self, inference_state: VideoSession, start_frame_idx: Optional[int] = None,
                           max_frame_num_to_track: Optional[int] = None, reverse: bool = False):
        """Track all objects, yielding (frame_idx, obj_ids, video_res_masks) frame by frame."""
        yield from T.propagate(self, inference_state, start_frame_idx, max_frame_num_to_track, reverse)

    # ------------------------------------------------------------------ official internals
    def _get_image_feature(self, inference_state: VideoSession, frame_idx: int, batch_size: int):
        return O.frame_features(self, inference_state, frame_idx, batch_size)

    def _clear_non_cond_mem_around_input(self, inference_state: VideoSession, frame_idx: int) -> None:
        for obj in inference_state.objects:
            T.clear_non_cond_around(self, obj, frame_idx)


class SAM2VideoPredictorVOS(SAM2VideoPredictor):
    """The official name of the predictor built with ``vos_optimized=True``.

    ``build_sam2_video_predictor(..., vos_optimized=True)`` returns one, with our fast
    runtime enabled (``predictor.runtime_info`` says what). Built directly, it enables the
    runtime at its first ``init_state``, once the model is on its final device.
    """

    def enable_runtime_once(self) -> "SAM2VideoPredictorVOS":
        """Enable the fast runtime unless that was done (or undone on purpose) before."""
        if not self.__dict__.get("_vos_runtime_enabled", False):
            from sam2_fast.build_sam import _enable_fast_runtime

            self.__dict__["_vos_runtime_enabled"] = True
            _enable_fast_runtime(self)
        return self

    @torch.inference_mode()
    def init_state(self, *args: Any, **kwargs: Any) -> VideoSession:
        self.enable_runtime_once()
        return super().init_state(*args, **kwargs)
