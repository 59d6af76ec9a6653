"""Typed session state of the video predictor.

The official predictor keeps a session in one dict of dicts keyed by strings, where every
per-object table is indexed by a model-side object slot. Here a session is a
:class:`VideoSession` holding one :class:`ObjectTrack` per object, in slot order.

Code written for the official dict keeps working: a session is a read-only ``Mapping``
over the official keys (``len``, ``keys()``, ``items()``, iteration, ``in``, ``get``).
Values are built on demand: the per-slot tables are fresh dicts around the live per-object
tables, and ``session["images"]`` is a :class:`~sam2_fast.video.frames_view.FramesView`
(``.shape`` (N, 3, S, S), ``[t]``, slices) that decodes only the frames asked for. Writing
a key raises ``TypeError``: the predictor's methods change a session. A session can be
deep-copied and pickled; its frame source is reopened from the same video on load.

Per-frame outputs stay plain dicts (:class:`FrameOutput`) because ``SAM2Base.track_step``
reads memories from ``{"cond_frame_outputs": {t: out}, "non_cond_frame_outputs": {t: out}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Hashable, Iterator, List, Optional, Tuple, TypedDict

import torch
from torch import Tensor

COND = "cond_frame_outputs"
NON_COND = "non_cond_frame_outputs"

# keep_outputs policies: "all" keeps every frame's outputs (reverse tracking and corrections
# need them); "reachable" drops non-conditioning outputs forward tracking can no longer use.
KEEP_OUTPUT_POLICIES = ("all", "reachable")


class FrameOutput(TypedDict):
    """What one object keeps for one frame (a compact copy of ``track_step``'s output)."""

    maskmem_features: Optional[Tensor]  # (1, mem_dim, S/16, S/16) bfloat16, None until encoded
    maskmem_pos_enc: Optional[List[Tensor]]  # shared session constant, expanded views
    pred_masks: Tensor  # (1, 1, S/4, S/4) float32 low-res mask logits (holes filled)
    obj_ptr: Tensor  # (1, C)
    object_score_logits: Tensor  # (1, 1)


class PointPrompt(TypedDict):
    point_coords: Tensor  # (1, P, 2) float32, in model-input pixels
    point_labels: Tensor  # (1, P) int32


def empty_output_dict() -> Dict[str, Dict[int, FrameOutput]]:
    return {COND: {}, NON_COND: {}}


@dataclass
class ObjectTrack:
    """Everything the session knows about one object (one model-side slot)."""

    obj_id: Hashable
    points: Dict[int, PointPrompt] = field(default_factory=dict)  # frame -> clicks / box
    masks: Dict[int, Tensor] = field(default_factory=dict)  # frame -> (1, 1, S, S) float mask
    # consolidated outputs used as memory: {COND: {frame: out}, NON_COND: {frame: out}}
    outputs: Dict[str, Dict[int, FrameOutput]] = field(default_factory=empty_output_dict)
    # outputs of frames that just received prompts; merged into ``outputs`` by preflight
    pending: Dict[str, Dict[int, FrameOutput]] = field(default_factory=empty_output_dict)
    # frame -> {"reverse": bool}: frames this object has been tracked on, and in which direction
    tracked: Dict[int, Dict[str, bool]] = field(default_factory=dict)
    # keep_outputs="reachable": [start, stop) runs of tracked frames whose outputs were dropped
    dropped: List[List[int]] = field(default_factory=list)

    def clear(self) -> None:
        self.points.clear()
        self.masks.clear()
        for table in (self.outputs, self.pending):
            table[COND].clear()
            table[NON_COND].clear()
        self.tracked.clear()
        self.dropped.clear()

    def mark_dropped(self, frames: List[int]) -> None:
        """Remember frames whose tracked outputs were dropped, as merged [start, stop) runs
        (tracking drops contiguous frames, so a long stream keeps a handful of runs)."""
        runs = sorted(self.dropped + [[t, t + 1] for t in frames])
        merged: List[List[int]] = []
        for lo, hi in runs:
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.dropped[:] = merged

    def was_dropped(self, frame_idx: int) -> bool:
        return any(lo <= frame_idx < hi for lo, hi in self.dropped)

    def latest_output(self, frame_idx: int, prefer: str = COND) -> Optional[FrameOutput]:
        """The most recent output on a frame: pending first, then conditioning, then not."""
        out = self.pending[prefer].get(frame_idx)
        if out is None:
            out = self.outputs[COND].get(frame_idx)
        if out is None:
            out = self.outputs[NON_COND].get(frame_idx)
        return out


@dataclass(eq=False)
class VideoSession(Mapping):
    """One video being segmented: its frames, its objects and their per-frame outputs.

    Also the official ``inference_state`` dict, read-only (see the module docstring).
    """

    images: Any  # frame source: len(), [idx] -> (3, S, S) float32 normalised tensor
    num_frames: int
    video_height: int
    video_width: int
    device: torch.device
    storage_device: torch.device
    offload_video_to_cpu: bool = False
    offload_state_to_cpu: bool = False
    keep_outputs: str = "all"
    # a live stream: ``num_frames`` counts the frames seen so far and more will come, so the
    # model is told the length is unknown (``track_step(num_frames=None)``), which for forward
    # tracking is what a video of >= max_obj_ptrs_in_encoder frames gives
    open_ended: bool = False
    objects: List[ObjectTrack] = field(default_factory=list)  # index == model-side slot
    # backbone features of the most recently visited frame: (frame_idx, image, backbone_out)
    cached_frame: Optional[Tuple[int, Tensor, Dict[str, Any]]] = None
    # the memory position encoding is identical for every frame and object: keep one copy
    maskmem_pos_enc: Optional[List[Tensor]] = None

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # pickle restores each row view of a shared per-frame tensor with its own copy of
        # the whole tensor: pack them again (memory as before, one-op memory reads)
        self.__dict__.update(state)
        from sam2_fast.video.outputs import repack_rows

        repack_rows(self)

    # ------------------------------------------------------------------ object slots
    @property
    def obj_ids(self) -> List[Hashable]:
        return [o.obj_id for o in self.objects]

    @property
    def num_objects(self) -> int:
        return len(self.objects)

    def slot_of(self, obj_id: Hashable) -> Optional[int]:
        for idx, obj in enumerate(self.objects):
            if obj.obj_id == obj_id:
                return idx
        return None

    # ------------------------------------------------------------------ dict-style access
    def _per_slot(self, attr: str) -> Dict[int, Any]:
        return {i: getattr(o, attr) for i, o in enumerate(self.objects)}

    def _cached_features(self) -> Dict[int, Any]:
        return {} if self.cached_frame is None else {self.cached_frame[0]: self.cached_frame[1:]}

    def _constants(self) -> Dict[str, Any]:
        return {} if self.maskmem_pos_enc is None else {"maskmem_pos_enc": self.maskmem_pos_enc}

    # official key -> how to read it from this session (only the asked key is built);
    # in the official dict's order
    _KEYS: ClassVar[Dict[str, Callable[["VideoSession"], Any]]] = {
        "images": lambda s: _frames_view(s.images),
        "num_frames": lambda s: s.num_frames,
        "offload_video_to_cpu": lambda s: s.offload_video_to_cpu,
        "offload_state_to_cpu": lambda s: s.offload_state_to_cpu,
        "video_height": lambda s: s.video_height,
        "video_width": lambda s: s.video_width,
        "device": lambda s: s.device,
        "storage_device": lambda s: s.storage_device,
        "point_inputs_per_obj": lambda s: s._per_slot("points"),
        "mask_inputs_per_obj": lambda s: s._per_slot("masks"),
        "cached_features": lambda s: s._cached_features(),
        "constants": lambda s: s._constants(),
        "obj_id_to_idx": lambda s: {o.obj_id: i for i, o in enumerate(s.objects)},
        "obj_idx_to_id": lambda s: {i: o.obj_id for i, o in enumerate(s.objects)},
        "obj_ids": lambda s: s.obj_ids,
        "output_dict_per_obj": lambda s: s._per_slot("outputs"),
        "temp_output_dict_per_obj": lambda s: s._per_slot("pending"),
        "frames_tracked_per_obj": lambda s: s._per_slot("tracked"),
    }

    def __getitem__(self, key: str) -> Any:
        read = self._KEYS.get(key)
        if read is None:
            raise KeyError(f"inference_state has no key {key!r}; readable keys: {', '.join(sorted(self._KEYS))}")
        return read(self)

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)

    def __contains__(self, key: object) -> bool:
        return key in self._KEYS

    def __setitem__(self, key: str, value: Any) -> None:
        raise TypeError(f"inference_state is read-only in sam2_fast (cannot set {key!r}): change a session "
                        "with the predictor's methods (add_new_points_or_box, add_new_mask, remove_object, "
                        "clear_all_prompts_in_frame, reset_state)")

    def __delitem__(self, key: str) -> None:
        self.__setitem__(key, None)

    # a session is an object, not a value: identity comparison and hashing (the Mapping
    # mixin would compare every key, frames included)
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    # ------------------------------------------------------------------ accounting
    def iter_tensors(self) -> Iterator[Tensor]:
        """Every tensor the session holds (outputs, prompts, caches), duplicates included."""
        for obj in self.objects:
            for prompt in obj.points.values():
                yield from prompt.values()
            yield from obj.masks.values()
            for table in (obj.outputs, obj.pending):
                for per_frame in table.values():
                    for out in per_frame.values():
                        yield from _tensors_in(out)
        if self.cached_frame is not None:
            yield from _tensors_in(self.cached_frame[1:])
        if self.maskmem_pos_enc is not None:
            yield from self.maskmem_pos_enc
        extra = getattr(self.images, "iter_tensors", None)
        if callable(extra):
            yield from extra()

    def tensor_bytes(self) -> int:
        """Bytes of distinct tensor storages held by the session (views counted once)."""
        seen = set()
        total = 0
        for t in self.iter_tensors():
            storage = t.untyped_storage()
            key = (storage.data_ptr(), t.device.type, t.device.index)
            if key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
        return total


def _frames_view(source: Any) -> Any:
    from sam2_fast.video.frames_view import FramesView

    return source if isinstance(source, Tensor) else FramesView(source)


def _tensors_in(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)
