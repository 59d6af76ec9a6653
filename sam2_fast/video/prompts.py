"""Checking and converting user prompts (clicks, boxes, masks) before they touch the session.

Everything is validated before the session is modified, so a rejected prompt leaves the
session exactly as it was. Numbers, labels and box corners go through the same checks as
the image predictor's (``sam2_fast.image_prompts``); coordinates outside the frame are
accepted, as the official predictor does.
"""

from __future__ import annotations

import numbers
from typing import Any, Hashable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sam2_fast import image_prompts as IP  # the checks both predictors share
from sam2_fast.video.state import PointPrompt, VideoSession

def check_frame_idx(session: VideoSession, frame_idx: Any) -> int:
    if isinstance(frame_idx, bool) or not isinstance(frame_idx, numbers.Integral):
        if isinstance(frame_idx, Tensor) and frame_idx.numel() == 1 and not frame_idx.is_floating_point():
            frame_idx = int(frame_idx.item())
        else:
            raise TypeError(f"frame_idx must be an integer, got {type(frame_idx).__name__} {frame_idx!r}")
    frame_idx = int(frame_idx)
    if not 0 <= frame_idx < session.num_frames:
        raise IndexError(f"frame_idx {frame_idx} is out of range: the video has {session.num_frames} "
                         f"frames (valid indices 0..{session.num_frames - 1})")
    return frame_idx


def check_obj_id(obj_id: Any) -> Hashable:
    if obj_id is None:
        raise ValueError("obj_id must not be None")
    try:
        hash(obj_id)
    except TypeError:
        raise TypeError(f"obj_id must be hashable (an int or a str), got {type(obj_id).__name__}") from None
    return obj_id


def _as_float_tensor(value: Any, what: str) -> Tensor:
    """Finite float32 numbers (checked by the image predictor's rules), kept on their device."""
    if isinstance(value, Tensor) and value.is_floating_point():
        if not torch.isfinite(value).all():
            IP.as_finite_array(value, what)  # raises, naming the problem
        return value.float()
    return torch.from_numpy(IP.as_finite_array(value, what)).float()


def _as_label_tensor(labels: Any) -> Tensor:
    device = labels.device if isinstance(labels, Tensor) else None
    return torch.from_numpy(IP.check_labels(labels, "labels")).to(device)


def build_point_prompt(session: VideoSession, image_size: int, points: Any, labels: Any, box: Any,
                       normalize_coords: bool, clear_old_points: bool) -> PointPrompt:
    """Clicks and/or a box as SAM point inputs in model-input pixels, shape (1, P, 2) / (1, P)."""
    if (points is None) != (labels is None):
        given, missing = ("points", "labels") if labels is None else ("labels", "points")
        raise ValueError(f"{given} were given without {missing}: points and labels must be provided together")
    if points is None and box is None:
        raise ValueError("empty prompt: give points with labels, a box, or both")

    if points is None:
        points = torch.zeros(0, 2, dtype=torch.float32)
        labels = torch.zeros(0, dtype=torch.int32)
    else:
        points = _as_float_tensor(points, "points")
        labels = _as_label_tensor(labels)
    if points.dim() == 2:
        points = points.unsqueeze(0)  # (1, P, 2)
    if labels.dim() == 1:
        labels = labels.unsqueeze(0)  # (1, P)
    if points.dim() != 3 or points.shape[0] != 1 or points.shape[-1] != 2:
        raise ValueError(f"points must have shape (P, 2) or (1, P, 2) as (x, y) pairs, got {tuple(points.shape)}")
    if labels.dim() != 2 or labels.shape != points.shape[:2]:
        raise ValueError(f"labels must give one label per point: points {tuple(points.shape)} vs labels "
                         f"{tuple(labels.shape)}")
    if box is None and points.shape[1] == 0:
        raise ValueError("empty prompt: points and labels hold no entries and no box was given")

    if box is not None:
        if not clear_old_points:
            raise ValueError("a box must come first among the prompts of a frame: add it with "
                             "clear_old_points=True (the default)")
        box = _as_float_tensor(box, "box").to(points.device)
        if box.numel() != 4:
            raise ValueError(f"box must hold 4 numbers (x0, y0, x1, y1), got shape {tuple(box.shape)}")
        corners = box.reshape(1, 2, 2)  # two corner "points"
        IP.check_box_corners(corners.detach().cpu().numpy())
        corner_labels = torch.tensor([[2, 3]], dtype=torch.int32, device=labels.device)
        points = torch.cat([corners, points.to(corners.dtype)], dim=1)
        labels = torch.cat([corner_labels, labels.to(torch.int32)], dim=1)

    if normalize_coords:
        frame_wh = torch.tensor([session.video_width, session.video_height])
        points = points / frame_wh.to(points.device)
    points = points * image_size  # normalized [0, 1] -> model-input pixels
    return {"point_coords": points.to(session.device), "point_labels": labels.to(session.device)}


def append_points(old: Optional[PointPrompt], new: PointPrompt) -> PointPrompt:
    """New clicks go after the earlier ones of the same frame."""
    from sam2_fast.utils.misc import concat_points

    return concat_points(old, new["point_coords"], new["point_labels"])


def build_mask_prompt(session: VideoSession, image_size: int, mask: Any) -> Tensor:
    """A 2-D mask (any size) as a binary (1, 1, S, S) float32 model-input mask."""
    if mask is None:
        raise ValueError("empty prompt: mask is None")
    if not isinstance(mask, Tensor):
        # arrays and lists: any non-zero value is foreground (tensors are used as given)
        try:
            mask = torch.tensor(mask, dtype=torch.bool)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"mask must be a 2-D array, got {type(mask).__name__}: {err}") from None
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {tuple(mask.shape)}")
    if mask.numel() == 0:
        raise ValueError(f"empty prompt: mask has shape {tuple(mask.shape)}")
    full = mask[None, None].float().to(session.device)  # (1, 1, H, W)
    if not torch.isfinite(full).all():
        raise ValueError("mask contains NaN or infinite values")
    if full.shape[-2:] == (image_size, image_size):
        return full
    # antialiased downsampling, then re-binarised
    scaled = F.interpolate(full, size=(image_size, image_size), mode="bilinear", align_corners=False,
                           antialias=True)
    return (scaled >= 0.5).float()
