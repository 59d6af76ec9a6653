"""Raw frame decoders behind :mod:`sam2_fast.video.frames`.

A decoder knows how many frames a source has and hands out *raw* frames (a JPEG path, an
array, a PyAV frame) that :meth:`Decoder.to_pil` turns into an RGB PIL image. Resizing and
normalisation happen one level up, so every source shares exactly the same numerics.

``Decoder.walk_to(idx)`` yields ``(index, raw)`` pairs ending with ``idx``. Random-access
sources yield just the one frame; a video yields every frame it had to decode on the way
(from the keyframe it seeked to), so the caller can keep the ones it wants (reverse
tracking walks a GOP backwards and would otherwise re-decode it once per frame).
"""

from __future__ import annotations

import bisect
import io
import os
import warnings
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from sam2_fast.utils.transforms import check_hwc_uint8
from sam2_fast.video.frames_errors import FrameSourceError, VideoNotFoundError

JPEG_EXTS = (".jpg", ".jpeg")
VIDEO_EXTS = (".mp4", ".mov", ".avi", ".webm", ".mkv")


class Decoder:
    """Interface: frame count, native size of frame 0, raw frames and their PIL form."""

    num_frames: int
    height: int
    width: int
    thread_safe: bool = False  # may several threads call walk_to / to_pil at once?

    def walk_to(self, idx: int) -> Iterator[tuple[int, Any]]:
        raise NotImplementedError

    def to_pil(self, idx: int, raw: Any) -> Image.Image:
        raise NotImplementedError

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- JPEG folder
def _frame_number(folder: str, name: str) -> int:
    stem = os.path.splitext(name)[0]
    try:
        return int(stem)
    except ValueError:
        raise FrameSourceError(
            f"JPEG frame {name!r} in {folder!r} has no integer file name; frames must be "
            "named by their index, e.g. 00000.jpg, 00001.jpg, ..."
        ) from None


class JpegFolderDecoder(Decoder):
    """A folder of ``<index>.jpg`` files, ordered by the integer in the stem."""

    thread_safe = True

    def __init__(self, folder: str) -> None:
        names = [n for n in os.listdir(folder) if os.path.splitext(n)[1].lower() in JPEG_EXTS]
        if not names:
            others = sorted(os.listdir(folder))[:5]
            hint = f" (it holds e.g. {others})" if others else " (it is empty)"
            raise FrameSourceError(f"no JPEG frames (.jpg/.jpeg) in folder {folder!r}{hint}")
        numbered = sorted((_frame_number(folder, n), n) for n in names)
        self.paths = [os.path.join(folder, n) for _, n in numbered]
        self.num_frames = len(self.paths)
        with self._open(0) as first:
            self.width, self.height = first.size

    def _open(self, idx: int) -> Image.Image:
        path = self.paths[idx]
        try:
            return Image.open(path)
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, ...
            raise FrameSourceError(f"cannot read JPEG frame {idx} ({path!r}): {e}") from e

    def walk_to(self, idx: int) -> Iterator[tuple[int, Any]]:
        yield idx, self.paths[idx]

    def to_pil(self, idx: int, raw: Any) -> Image.Image:
        img = self._open(idx)
        if img.size != (self.width, self.height):
            raise FrameSourceError(
                f"JPEG frame {idx} ({raw!r}) is {img.size[0]}x{img.size[1]} but frame 0 is "
                f"{self.width}x{self.height}; all frames of a video must have the same size"
            )
        try:
            return img.convert("RGB")
        except Exception as e:  # truncated / corrupt data shows up on decode
            raise FrameSourceError(f"cannot decode JPEG frame {idx} ({raw!r}): {e}") from e


# --------------------------------------------------------------------------- arrays
def _frame_layout(idx: int, frame: Any) -> tuple[int, ...]:
    """Shape of one in-memory frame after checking dtype, rank and channels."""
    if not hasattr(frame, "shape") or not hasattr(frame, "dtype"):
        raise FrameSourceError(
            f"frame {idx} is a {type(frame).__name__}, not an array; frames must be HWC uint8 "
            "numpy arrays or torch tensors"
        )
    shape = tuple(int(s) for s in frame.shape)
    check_hwc_uint8(shape, frame.dtype, what=f"frame {idx}", error=FrameSourceError)
    return shape


class ArrayDecoder(Decoder):
    """An (N, H, W, C) uint8 array or a sequence of (H, W, C) uint8 frames (numpy or torch)."""

    thread_safe = True

    def __init__(self, frames: Any) -> None:
        if hasattr(frames, "shape"):  # one stacked array: frames share one layout
            shape = tuple(int(s) for s in frames.shape)
            if len(shape) != 4:
                hint = " (a single image? wrap it in a list)" if len(shape) == 3 else ""
                raise FrameSourceError(
                    f"a frame array must be (N, H, W, C) uint8; got shape {shape}{hint}"
                )
            if shape[0] == 0:
                raise FrameSourceError("the frame array is empty (0 frames)")
            first = _frame_layout(0, frames[0])
        else:
            if len(frames) == 0:
                raise FrameSourceError("the frame sequence is empty (0 frames)")
            first = _frame_layout(0, frames[0])
            for i in range(1, len(frames)):
                shape = _frame_layout(i, frames[i])
                if shape != first:
                    raise FrameSourceError(
                        f"frame {i} has shape {shape} but frame 0 has shape {first}; all "
                        "frames of a video must have the same size"
                    )
        self.frames: Sequence[Any] = frames
        self.num_frames = len(frames)
        self.height, self.width = first[0], first[1]

    def walk_to(self, idx: int) -> Iterator[tuple[int, Any]]:
        yield idx, self.frames[idx]

    def to_pil(self, idx: int, raw: Any) -> Image.Image:
        return array_to_pil(raw)


def array_to_pil(raw: Any) -> Image.Image:
    """A checked HWC (or HW) uint8 numpy array / torch tensor -> RGB PIL image."""
    if hasattr(raw, "detach"):  # torch tensor
        raw = raw.detach().cpu().numpy()
    arr = np.ascontiguousarray(raw)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    mode = "L" if arr.ndim == 2 else ("RGB" if arr.shape[2] == 3 else "RGBA")
    # Same route as a JPEG frame: a PIL image converted to RGB (L replicates, RGBA drops alpha).
    return Image.fromarray(arr, mode=mode).convert("RGB")


# --------------------------------------------------------------------------- video file
def _av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is a hard dependency
        raise FrameSourceError("reading video files needs PyAV (pip install av)") from e
    return av


class VideoFileDecoder(Decoder):
    """A video file (or its bytes) read with PyAV.

    On open, the packets are demuxed once (no decoding) into a table of presentation
    timestamps, sorted: frame ``i`` is the frame whose pts is the ``i``-th smallest. Random
    access seeks to the last keyframe at or before the target and decodes forward; a request
    for a later frame in the same GOP (or just ahead) continues the running decoder instead.

    A cut file (an interrupted download or recording) can index more packets than decode:
    the last packet is partial and the frames that reference it are lost. When the last
    packet reaches the end of the data (as in a cut file; a complete file usually ends with
    its index), the last GOP is decoded once on open and ``num_frames`` becomes the count
    that decodes, with a warning (``dropped_tail`` says how many were cut).
    """

    def __init__(self, source: str | bytes, label: str) -> None:
        av = _av()
        self.label = label
        self._source_size = len(source) if isinstance(source, bytes) else os.path.getsize(source)
        try:
            self._container = av.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        except Exception as e:
            raise FrameSourceError(f"cannot open video {label}: {e}") from e
        try:
            self._index_packets()
        except FrameSourceError:
            self._container.close()
            raise
        except Exception as e:
            self._container.close()
            raise FrameSourceError(f"cannot read video {label}: {e}") from e
        self._frames: Iterator[Any] | None = None  # running decoder
        self._pos = -1  # index of the last frame the running decoder produced
        try:
            first = next(self._decode_from(0), None)
        except Exception as e:  # codec errors on a corrupt stream
            first, why = None, f": {type(e).__name__}: {e}"
        else:
            why = ""
        if first is None or first[0] != 0:
            self._container.close()
            raise FrameSourceError(f"cannot decode the first frame of video {label}{why}")
        self.width, self.height = first[1].width, first[1].height
        self.dropped_tail = 0
        if self._may_be_cut:
            self._trim_undecodable_tail()
        self._first = first[1]

    def _index_packets(self) -> None:
        if not self._container.streams.video:
            raise FrameSourceError(f"video {self.label} has no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"  # frame + slice threads; the output is unchanged
        pts: list[int] = []
        key_pts: list[int] = []
        data_end: Optional[int] = 0  # end offset of the last packet's bytes (None: unknown)
        for packet in self._container.demux(self._stream):
            if packet.size == 0 or packet.is_discard:
                continue  # end-of-stream flush; priming frames an edit list cuts (never shown)
            pos = packet.pos
            if pos is None or pos < 0:
                data_end = None
            elif data_end is not None:
                data_end = max(data_end, pos + packet.size)
            if packet.pts is None:
                raise FrameSourceError(
                    f"video {self.label} has packets without timestamps; re-mux it (e.g. to .mp4)"
                )
            pts.append(packet.pts)
            if packet.is_keyframe:
                key_pts.append(packet.pts)
        if not pts:
            raise FrameSourceError(f"video {self.label} has zero frames")
        pts.sort()
        if len(set(pts)) != len(pts):
            raise FrameSourceError(f"video {self.label} has duplicate frame timestamps")
        self._pts = pts
        self._index_of = {p: i for i, p in enumerate(pts)}
        # keyframe indices, ascending; frame 0 is always a valid place to start from
        keys = sorted({self._index_of[p] for p in key_pts} | {0})
        self._keys = keys
        self.num_frames = len(pts)
        self._may_be_cut = data_end is None or data_end >= self._source_size

    def _trim_undecodable_tail(self) -> None:
        """Decode from the last keyframe(s) to the end; drop the frames that never come out."""
        n = self.num_frames
        last = -1
        for key in reversed(self._keys):
            try:
                for i, _ in self._decode_from(key):
                    last = max(last, i)
            except Exception:  # the cut packet: frames after it (and waiting on it) are lost
                pass
            if last >= 0:
                break
        self._frames, self._pos = None, -1  # the next walk starts with a fresh seek
        m = last + 1
        if m <= 0 or m >= n:
            return
        self._pts = self._pts[:m]
        self._index_of = {p: i for i, p in enumerate(self._pts)}
        self._keys = [k for k in self._keys if k < m]
        self.num_frames, self.dropped_tail = m, n - m
        warnings.warn(f"video {self.label}: {n} frames are indexed but only the first {m} decode "
                      f"(a truncated file?); using {m} frames", stacklevel=2)

    def _keyframe_at_or_before(self, idx: int) -> int:
        return self._keys[bisect.bisect_right(self._keys, idx) - 1]

    def _decode_from(self, key: int) -> Iterator[tuple[int, Any]]:
        """Seek to keyframe index ``key`` and decode forward, yielding (index, frame)."""
        self._container.seek(self._pts[key], stream=self._stream, backward=True, any_frame=False)
        self._frames = self._container.decode(self._stream)
        self._pos = -1
        for frame in self._frames:
            i = self._index_of.get(frame.pts)
            # Frames before the keyframe (open-GOP leftovers) may reference data we skipped.
            if i is None or i < key:
                continue
            self._pos = i
            yield i, frame

    def walk_to(self, idx: int) -> Iterator[tuple[int, Any]]:
        if idx == 0 and self._first is not None:
            first, self._first = self._first, None
            yield 0, first  # decoded on open; spares a seek for init_state's frame 0
            return
        key = self._keyframe_at_or_before(idx)
        plans: list[Iterator[tuple[int, Any]]] = []
        if self._frames is not None and key <= self._pos < idx:
            plans.append(self._continue())  # cheaper than seeking back to `key`
        plans.append(self._decode_from(key))
        if key > 0:  # last resort when the container's seek index is off
            plans.append(self._decode_from(0))
        for frames in plans:  # generators: nothing seeks until a plan is iterated
            for i, frame in frames:
                if i > idx:
                    break  # overshot (seek landed past the target): try the next plan
                yield i, frame
                if i == idx:
                    return
        raise FrameSourceError(f"cannot decode frame {idx} of video {self.label}")

    def _continue(self) -> Iterator[tuple[int, Any]]:
        assert self._frames is not None
        for frame in self._frames:
            i = self._index_of.get(frame.pts)
            if i is None or i <= self._pos:
                continue
            self._pos = i
            yield i, frame

    def to_pil(self, idx: int, raw: Any) -> Image.Image:
        return raw.to_image()  # rgb24 via swscale, then the same PIL route as a JPEG frame

    def close(self) -> None:
        self._frames = None
        self._first = None
        self._container.close()


# --------------------------------------------------------------------------- dispatch
def open_decoder(video_path: Any) -> Decoder:
    """Pick the decoder for a JPEG folder, a video file / bytes, or in-memory frames."""
    if isinstance(video_path, bytes):
        return VideoFileDecoder(video_path, label="<bytes>")
    if isinstance(video_path, (str, os.PathLike)):
        path = os.fspath(video_path)
        if not os.path.exists(path):
            raise VideoNotFoundError(f"video path does not exist: {path!r}")
        if os.path.isdir(path):
            return JpegFolderDecoder(path)
        # Any other file goes to PyAV (VIDEO_EXTS are the tested ones); it says if it can't.
        if os.path.splitext(path)[1].lower() in JPEG_EXTS:
            raise FrameSourceError(
                f"{path!r} is a single image; pass the folder that holds the JPEG frames"
            )
        if os.path.getsize(path) == 0:
            raise FrameSourceError(f"video file {path!r} is empty (0 bytes)")
        return VideoFileDecoder(path, label=repr(path))
    if hasattr(video_path, "shape") or isinstance(video_path, Sequence):  # array / frame list
        return ArrayDecoder(video_path)
    raise FrameSourceError(
        f"unsupported video_path of type {type(video_path).__name__}: pass a JPEG folder, a "
        f"video file ({', '.join(VIDEO_EXTS)}), its bytes, or a sequence/array of HWC uint8 frames"
    )
