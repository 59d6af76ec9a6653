"""Track objects in a live stream: a camera, an RTSP feed, frames handed over by a program.

    tracker = build_sam2_camera_predictor("sam2.1_hiera_tiny", "checkpoints/sam2.1_hiera_tiny.pt")
    tracker.load_first_frame(frame)
    tracker.add_new_prompt(frame_idx=0, obj_id=1, points=[[210, 350]], labels=[1])
    while ok:
        obj_ids, mask_logits = tracker.track(next_frame)   # (num_objects, 1, H, W) logits

or, with decoding and resizing of the next frame overlapping the model's work:

    for frame_idx, obj_ids, mask_logits in tracker.stream(cv2_or_pyav_or_array_frames):
        if frame_idx == 1500:
            tracker.add_new_prompt(1500, obj_id=2, bbox=[x0, y0, x1, y1])

The calls are those of the widely used real-time fork (``load_first_frame``,
``add_new_prompt``, ``track``). Under them sits the video predictor itself: a stream is a
:class:`~sam2_fast.video.state.VideoSession` whose frames arrive one at a time; prompts go
through the predictor's own prompt path and every frame through its per-frame step
(:func:`sam2_fast.video.propagate.track_frame`), with the same model and runtime. So a
stream's masks are the video predictor's on the same frames and prompts (propagating up to
each prompted frame, prompting, propagating on), bit for bit on the CPU.

Memory is bounded on unbounded streams: only the current frame is held, and of each
object's outputs only what the model can still select (conditioning frames, the last
``num_maskmem`` frames, the object pointers within ``max_obj_ptrs_in_encoder`` frames):
the video predictor's ``keep_outputs="reachable"`` policy, applied after every frame.

Choices where the fork is silent or differs:
* prompts go on the current frame only (earlier frames are gone; later ones have not
  arrived): anything else is an error naming the stream's current frame;
* ``track`` with no objects yet just advances the stream (a camera runs before anyone
  clicks) and returns no masks;
* numpy frames are taken as RGB, like the video predictor's arrays; ``cv2`` frames are BGR,
  so pass ``color="bgr"`` (the fork feeds them to the model unconverted);
* the stream's length is unknown, so the model is told so (``num_frames=None``): for a video
  of at least ``max_obj_ptrs_in_encoder`` (16) frames that changes nothing, on a shorter one
  the video predictor caps the pointer window at the video length.
"""

from __future__ import annotations

import numbers
from typing import Any, Hashable, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from sam2_fast.sam2_video_predictor import SAM2VideoPredictor
from sam2_fast.video import outputs as O
from sam2_fast.video import propagate as T
from sam2_fast.video.frames_stream import (
    COLOR_ORDERS,
    FramePrefetcher,
    PreparedFrame,
    StreamFrameError,
    StreamFrames,
    prepare_frame,
)
from sam2_fast.video.state import VideoSession

PREPROCESS_MODES = ("auto", "host", "device")

__all__ = ["StreamingTracker", "StreamNotStartedError", "StreamFrameError", "StreamFrameIndexError"]


class StreamNotStartedError(RuntimeError):
    """A call that needs a stream before ``load_first_frame`` gave it its first frame."""


class StreamFrameIndexError(IndexError):
    """A prompt on a frame that is not the stream's current one."""


class StreamingTracker:
    """Segment and track objects on frames that arrive one at a time (see the module doc).

    ``predictor``: a :class:`SAM2VideoPredictor` (with or without the fast runtime); the
    tracker adds no model of its own. ``color``: channel order of numpy / tensor frames
    ("rgb", or "bgr" for cv2). ``prefetch``: frames :meth:`stream` prepares ahead.
    ``offload_state_to_cpu``: keep memories on the CPU, as in ``init_state``.
    ``preprocess``: "host" (PIL resize on the CPU, as the video predictor) or "device" (the
    native frame is copied once and resized on the model's device by an exact replay of
    PIL's resize: the same model input, bitwise, with the host spared the resize); "auto"
    (default) picks "device" on CUDA and "host" elsewhere (on a CPU the replay, two float64
    matrix products, is slower than PIL).
    """

    def __init__(self, predictor: SAM2VideoPredictor, *, color: str = "rgb", prefetch: int = 2,
                 offload_state_to_cpu: bool = False, preprocess: str = "auto") -> None:
        if not isinstance(predictor, SAM2VideoPredictor):
            raise TypeError(f"StreamingTracker needs a SAM2VideoPredictor (build_sam2_video_predictor), "
                            f"got {type(predictor).__name__}")
        if color not in COLOR_ORDERS:
            raise ValueError(f"color must be one of {COLOR_ORDERS}, got {color!r}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"prefetch must be an int >= 1, got {prefetch!r}")
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
        if preprocess == "auto":
            preprocess = "device" if predictor.device.type == "cuda" else "host"
        self.predictor = predictor
        self.color = color
        self.prefetch = prefetch
        self.offload_state_to_cpu = bool(offload_state_to_cpu)
        self.preprocess = preprocess
        self._session: Optional[VideoSession] = None
        self._frames: Optional[StreamFrames] = None

    @classmethod
    def from_pretrained(cls, model_id: str, *, color: str = "rgb", prefetch: int = 2,
                        preprocess: str = "auto", **kwargs: Any) -> "StreamingTracker":
        """A tracker with the official weights of ``model_id`` (e.g. facebook/sam2.1-hiera-tiny)."""
        return cls(SAM2VideoPredictor.from_pretrained(model_id, **kwargs), color=color, prefetch=prefetch,
                   preprocess=preprocess)

    # ------------------------------------------------------------------ state
    @property
    def session(self) -> Optional[VideoSession]:
        """The stream's video session (None before ``load_first_frame``)."""
        return self._session

    @property
    def frame_idx(self) -> int:
        """Index of the current frame (-1 before ``load_first_frame``)."""
        return -1 if self._frames is None else self._frames.current

    @property
    def obj_ids(self) -> List[Hashable]:
        return [] if self._session is None else self._session.obj_ids

    @property
    def image_size(self) -> int:
        return int(self.predictor.image_size)

    def tensor_bytes(self) -> int:
        """Bytes of the tensors the stream holds (memories, outputs, prompts, current frame)."""
        return 0 if self._session is None else self._session.tensor_bytes()

    def _require(self) -> VideoSession:
        if self._session is None:
            raise StreamNotStartedError("the stream has no frame yet: call load_first_frame(frame) first "
                                        "(or iterate tracker.stream(frames))")
        return self._session

    def _check_current(self, frame_idx: Any) -> int:
        self._require()
        if isinstance(frame_idx, Tensor) and frame_idx.numel() == 1 and not frame_idx.is_floating_point():
            frame_idx = int(frame_idx.item())
        if isinstance(frame_idx, bool) or not isinstance(frame_idx, numbers.Integral):
            raise TypeError(f"frame_idx must be an integer, got {type(frame_idx).__name__} {frame_idx!r}")
        current = self.frame_idx
        if frame_idx < current:
            raise StreamFrameIndexError(
                f"frame {frame_idx} has already passed: a stream keeps only its current frame "
                f"({current}); add prompts on the current frame")
        if frame_idx > current:
            raise StreamFrameIndexError(f"frame {frame_idx} has not arrived yet: the stream is at frame {current}")
        return int(frame_idx)

    # ------------------------------------------------------------------ frames
    @torch.inference_mode()
    def load_first_frame(self, frame: Any) -> None:
        """Start a new stream on ``frame`` (frame 0). Objects of a previous stream are forgotten."""
        self._start(self._prepare(frame))

    def _prepare(self, frame: Any) -> PreparedFrame:
        return prepare_frame(frame, self.image_size, self.color, on_device=self.preprocess == "device")

    def _start(self, first: PreparedFrame) -> None:
        model = self.predictor
        frames = StreamFrames(self.image_size, first.height, first.width, model.device)
        frames.put(0, first)
        session = VideoSession(
            images=frames, num_frames=1, video_height=first.height, video_width=first.width,
            device=model.device,
            storage_device=torch.device("cpu") if self.offload_state_to_cpu else model.device,
            offload_state_to_cpu=self.offload_state_to_cpu, keep_outputs="reachable", open_ended=True)
        # the backbone runs now, so a first click answers at once (as init_state does)
        O.frame_features(model, session, 0, batch_size=1)
        self._session, self._frames = session, frames

    @torch.inference_mode()
    def track(self, frame: Any) -> Tuple[List[Hashable], Tensor]:
        """Take the next frame; returns (obj_ids, mask logits (num_objects, 1, H, W)) on it."""
        self._require()
        idx = self.frame_idx + 1
        try:
            prepared = self._prepare(frame)
        except StreamFrameError as e:
            raise StreamFrameError(f"frame {idx} rejected: {e}") from e
        return self._advance(prepared)

    def _advance(self, frame: PreparedFrame) -> Tuple[List[Hashable], Tensor]:
        session, frames, model = self._require(), self._frames, self.predictor
        idx = frames.current + 1
        frames.check(frame, idx)  # before anything changes: a rejected frame leaves no trace
        if session.num_objects:
            T.preflight(model, session)  # memories of the prompts given on the frame just passed
        frames.put(idx, frame)
        session.num_frames = idx + 1
        if not session.num_objects:
            empty = torch.empty(0, 1, session.video_height, session.video_width, device=session.device)
            return [], empty
        low_res = T.track_frame(model, session, idx, reverse=False, clear=T.clears_around_input(model, session))
        masks = O.video_res_output(model, session, low_res)
        T.drop_unreachable(model, session, idx + 1)
        return session.obj_ids, masks

    @torch.inference_mode()
    def stream(self, frames: Iterable[Any], prefetch: Optional[int] = None
               ) -> Iterator[Tuple[int, List[Hashable], Tensor]]:
        """Track every frame of ``frames`` (any iterable, or a video path / URL for PyAV),
        yielding (frame_idx, obj_ids, mask logits) per frame.

        A background thread decodes and resizes up to ``prefetch`` frames ahead while the
        model works. Without a stream yet, the first frame starts one (yielded with no
        objects: prompt it in the loop body). Prompts given between iterations apply to the
        frame just yielded. A bad frame raises at its position, the tracker stays at the
        frame before it, and reading stopped there: ``stream(same_iterator)`` resumes after
        it. Leaving the loop early drops the (at most ``prefetch + 1``) frames read ahead.
        """
        depth = self.prefetch if prefetch is None else prefetch
        if isinstance(frames, (str, bytes)) or hasattr(frames, "__fspath__"):
            frames = _pyav_frames(frames)
        pin = self.predictor.device.type == "cuda"
        reader = FramePrefetcher(frames, self.image_size, self.color, depth=depth, pin=pin,
                                 on_device=self.preprocess == "device")
        try:
            for item in reader:
                idx = self.frame_idx + 1
                if isinstance(item, StreamFrameError):
                    raise StreamFrameError(f"frame {idx} rejected: {item}") from item
                if self._session is None:
                    self._start(item)
                    yield 0, [], torch.empty(0, 1, item.height, item.width, device=self.predictor.device)
                else:
                    obj_ids, masks = self._advance(item)
                    yield idx, obj_ids, masks
        finally:
            reader.close()

    # ------------------------------------------------------------------ prompts
    def add_new_prompt(self, frame_idx: int, obj_id: Hashable, points=None, labels=None, bbox=None,
                       clear_old_points: bool = True, normalize_coords: bool = True
                       ) -> Tuple[int, List[Hashable], Tensor]:
        """Clicks and/or a box for one object on the current frame -> (frame_idx, obj_ids, masks).

        A new ``obj_id`` starts a new object here; a known one gets a new conditioning frame
        (if not tracked on this frame yet) or a correction. ``bbox``: (x0, y0, x1, y1), also
        as [[x0, y0], [x1, y1]].
        """
        frame_idx = self._check_current(frame_idx)
        return self.predictor.add_new_points_or_box(
            self._session, frame_idx, obj_id, points=points, labels=labels, clear_old_points=clear_old_points,
            normalize_coords=normalize_coords, box=bbox)

    def add_new_points_or_box(self, frame_idx: int, obj_id: Hashable, points=None, labels=None,
                              clear_old_points: bool = True, normalize_coords: bool = True, box=None
                              ) -> Tuple[int, List[Hashable], Tensor]:
        """The video predictor's name and keywords for :meth:`add_new_prompt`."""
        return self.add_new_prompt(frame_idx, obj_id, points, labels, box, clear_old_points, normalize_coords)

    def add_new_mask(self, frame_idx: int, obj_id: Hashable, mask) -> Tuple[int, List[Hashable], Tensor]:
        """A mask (2-D, any size) for one object on the current frame."""
        frame_idx = self._check_current(frame_idx)
        return self.predictor.add_new_mask(self._session, frame_idx, obj_id, mask)

    @torch.inference_mode()
    def remove_object(self, obj_id: Hashable, strict: bool = True) -> Tuple[List[Hashable], Tensor]:
        """Stop tracking ``obj_id`` -> (remaining obj_ids, their masks on the current frame).

        Unknown ids raise (``strict=False``: ignored), as a typo would otherwise go unseen.
        """
        session = self._require()
        self.predictor.remove_object(session, obj_id, strict=strict, need_output=False)
        return session.obj_ids, self.current_masks()

    @torch.inference_mode()
    def current_masks(self) -> Tensor:
        """Mask logits (num_objects, 1, H, W) of every object on the current frame."""
        session = self._require()
        if not session.num_objects:
            return torch.empty(0, 1, session.video_height, session.video_width, device=session.device)
        is_cond = O.frame_has_pending_cond(session, self.frame_idx)
        return self.predictor._frame_masks(session, self.frame_idx, is_cond)

    def reset_state(self) -> None:
        """Forget every object and prompt; the stream goes on at its current frame."""
        if self._session is not None:
            self.predictor.reset_state(self._session)

    def close(self) -> None:
        """End the stream (memories and the current frame are released)."""
        if self._frames is not None:
            self._frames.close()
        self._session, self._frames = None, None

    def __repr__(self) -> str:
        where = "not started" if self._session is None else (
            f"frame {self.frame_idx}, {self._session.video_width}x{self._session.video_height}, "
            f"objects {self.obj_ids}")
        return f"StreamingTracker({where})"


def _pyav_frames(path: Any) -> Iterator[Any]:
    """Frames of a video file or URL (RTSP, HTTP, ...) decoded in order with PyAV. The
    container is opened here, so a bad path fails at once with its own message."""
    import io

    import av

    source = io.BytesIO(path) if isinstance(path, bytes) else path
    label = "<bytes>" if isinstance(path, bytes) else repr(str(path))
    try:
        container = av.open(source)
    except Exception as e:
        raise StreamFrameError(f"cannot open video {label}: {type(e).__name__}: {e}") from e
    if not container.streams.video:
        container.close()
        raise StreamFrameError(f"video {label} has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"

    def decode() -> Iterator[Any]:
        try:
            yield from container.decode(stream)
        finally:
            container.close()

    return decode()
