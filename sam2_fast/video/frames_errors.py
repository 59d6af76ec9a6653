"""Errors raised by the frame sources (kept apart so that decoders and sources share them)."""

from __future__ import annotations


class FrameSourceError(ValueError):
    """A video source that cannot be read: bad path, bad file, bad frames or a bad index."""


class VideoNotFoundError(FrameSourceError, FileNotFoundError):
    """The video path (file or JPEG folder) does not exist."""


class FrameIndexError(FrameSourceError, IndexError):
    """A frame index outside ``[-len, len)``."""
