"""Typed session state of the video predictor.

The official predictor keeps a session in one dict of dicts keyed by strings, where every
per-object table is indexed by a model-side object slot. Here a session is a
:class:`VideoSession` holding one :class:`ObjectTrack` per object, in slot order. Users who
poke at the official dict keep working for the common keys through ``session["..."]``
(read-only views built on demand; nested tables are the live ones).

Per-frame outputs stay plain dicts (:class:`FrameOutput`) because ``SAM2Base.track_step``
reads memories from ``{"cond_frame_outputs": {t: out}, "non_cond_frame_outputs": {t: out}}``.
"""

from __future__ import annotations

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

    def clear(self) -> None:
        self.points.clear()
        self.masks.clear()
        for table in (self.outputs, self.pending):
            table[COND].clear()
            table[NON_COND].clear()
        self.tracked.clear()

    def latest_output(self, frame_idx: int, prefer: str = COND) -> Optional[FrameOutput]:
        """The most recent output on a frame: pending first, then conditioning, then not."""
        out = self.pending[prefer].get(frame_idx)
        if out is None:
            out = self.outputs[COND].get(frame_idx)
        if out is None:
            out = self.outputs[NON_COND].get(frame_idx)
        return out


@dataclass
class VideoSession:
    """One video being segmented: its frames, its objects and their per-frame outputs."""

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

    # official key -> how to read it from this session (only the asked key is built)
    _KEYS: ClassVar[Dict[str, Callable[["VideoSession"], Any]]] = {
        "images": lambda s: s.images,
        "num_frames": lambda s: s.num_frames,
        "video_height": lambda s: s.video_height,
        "video_width": lambda s: s.video_width,
        "device": lambda s: s.device,
        "storage_device": lambda s: s.storage_device,
        "offload_video_to_cpu": lambda s: s.offload_video_to_cpu,
        "offload_state_to_cpu": lambda s: s.offload_state_to_cpu,
        "keep_outputs": lambda s: s.keep_outputs,
        "obj_ids": lambda s: s.obj_ids,
        "obj_id_to_idx": lambda s: {o.obj_id: i for i, o in enumerate(s.objects)},
        "obj_idx_to_id": lambda s: {i: o.obj_id for i, o in enumerate(s.objects)},
        "point_inputs_per_obj": lambda s: s._per_slot("points"),
        "mask_inputs_per_obj": lambda s: s._per_slot("masks"),
        "output_dict_per_obj": lambda s: s._per_slot("outputs"),
        "temp_output_dict_per_obj": lambda s: s._per_slot("pending"),
        "frames_tracked_per_obj": lambda s: s._per_slot("tracked"),
        "cached_features": lambda s: s._cached_features(),
        "constants": lambda s: s._constants(),
    }

    def __getitem__(self, key: str) -> Any:
        read = self._KEYS.get(key)
        if read is None:
            raise KeyError(f"inference_state has no key {key!r}; readable keys: {', '.join(sorted(self._KEYS))}")
        return read(self)

    def __contains__(self, key: object) -> bool:
        return key in self._KEYS

    def keys(self) -> List[str]:
        return list(self._KEYS)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self._KEYS else default

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


def _tensors_in(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)
