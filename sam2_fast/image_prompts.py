"""Checking prompts (both predictors) and batching the prompts of the image predictor.

User prompts arrive as numpy arrays / lists / tensors in original-image pixels (or
normalised [0, 1] coordinates when ``normalize_coords=False``). What cannot be a prompt
(NaN / inf, strings, wrong shapes, unknown labels, swapped box corners) is caught here with
a message that names the problem, before any tensor reaches the network. The video
predictor's prompt checks (``sam2_fast.video.prompts``) call the same functions.

Coordinates outside the image are accepted, as the official package does: detector boxes
often end a fraction past the border, and the prompt encoder takes any coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch


class PromptError(ValueError):
    """A point, label, box or mask prompt that cannot be used."""


# label values SAM understands: -1 padding, 0 negative click, 1 positive click,
# 2 / 3 box corners (top-left / bottom-right)
VALID_LABELS = (-1, 0, 1, 2, 3)


@dataclass(frozen=True)
class Prompts:
    """Prompts in model-input pixels, batched over prompt sets (one set per mask request)."""

    coords: Optional[torch.Tensor]  # (B, N, 2) float, x/y in [0, image_size]
    labels: Optional[torch.Tensor]  # (B, N) int32
    boxes: Optional[torch.Tensor]  # (B, 2, 2) float corners
    mask: Optional[torch.Tensor]  # (B, 1, 4*E, 4*E) low-res logits

    def sparse_points(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Box corners (labels 2, 3) first, then clicks, as the SAM prompt encoder expects."""
        pts = None if self.coords is None else (self.coords, self.labels)
        if self.boxes is None:
            return pts
        n = self.boxes.shape[0]
        corner_labels = torch.tensor([2, 3], dtype=torch.int32, device=self.boxes.device).expand(n, 2)
        if pts is None:
            return self.boxes, corner_labels
        if pts[0].shape[0] != n:
            if n == 1:  # one box shared by every point set
                return (torch.cat([self.boxes.expand(pts[0].shape[0], 2, 2), pts[0]], 1),
                        torch.cat([corner_labels.expand(pts[0].shape[0], 2), pts[1]], 1))
            raise PromptError(f"{n} boxes but {pts[0].shape[0]} point sets: give one box per point set")
        return torch.cat([self.boxes, pts[0]], dim=1), torch.cat([corner_labels, pts[1]], dim=1)


def as_finite_array(x, name: str) -> np.ndarray:
    """``x`` (list, array or tensor) as float64 numbers; strings, objects, NaN and inf are
    rejected by name. Any finite coordinate is accepted, inside the image or not."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PromptError(f"{name} must be numbers, got {_preview(x)} ({exc})") from None
    if not np.all(np.isfinite(arr)):
        raise PromptError(f"{name} contains NaN or infinite values")
    return arr


def _preview(x) -> str:
    text = repr(x.tolist() if hasattr(x, "tolist") else x)
    return text if len(text) <= 60 else text[:57] + "..."


def check_labels(labels, name: str = "point_labels") -> np.ndarray:
    """Point labels as int32, after checking they are SAM labels.

    Shared by the image and the video predictor. ``labels=["yes"]`` or ``[0.5]`` is named
    here instead of failing inside ``torch.tensor`` or the prompt encoder's embedding lookup.
    """
    what = f"{name} must be integers (1 = foreground, 0 = background), got {_preview(labels)}"
    try:
        arr = as_finite_array(labels, name)
    except PromptError:
        raise PromptError(what) from None
    if not np.array_equal(arr, np.round(arr)):
        raise PromptError(what)
    bad = sorted(set(np.unique(arr).astype(np.int64).tolist()) - set(VALID_LABELS))
    if bad:
        raise PromptError(f"{name} must be 1 (foreground), 0 (background), 2/3 (box corners) or "
                          f"-1 (padding); got unknown labels {bad}")
    return arr.astype(np.int32)


def check_box_corners(corners: np.ndarray) -> None:
    """Boxes as (B, 2, 2) corners [[x0, y0], [x1, y1]]: reject swapped corners.

    The one box check of both predictors. SAM encodes a box as a top-left (label 2) and a
    bottom-right (label 3) corner; with x1 < x0 or y1 < y0 the corners carry the wrong
    labels and the mask is garbage, so it is an error (the official package takes it
    silently). Degenerate boxes (x0 == x1) and boxes reaching outside the image are fine.
    """
    swapped = (corners[:, 1] < corners[:, 0]).any(axis=-1)  # (B,)
    if swapped.any():
        box = corners[int(np.argmax(swapped))].reshape(4).tolist()
        raise PromptError(f"box {[round(v, 3) for v in box]} is not XYXY: need x0 <= x1 and y0 <= y1 "
                          "(corners swapped? boxes are [x_min, y_min, x_max, y_max])")


def check_points(point_coords, point_labels, allow_empty: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """(B, N, 2) coords and (B, N) int32 labels as arrays, after shape and label checks.

    Coordinates may lie outside the image, as with the official predictor (a click just
    past the border, a detector box ending at W + 0.5): the prompt encoder takes any value.
    ``allow_empty``: zero points (shape (0, 2) / (1, 0, 2)) pass, for a caller that has
    another prompt (a box); ``np.array([])`` counts as zero points too.
    """
    if point_labels is None:
        raise PromptError("point_labels must be given with point_coords (1 = foreground, 0 = background)")
    coords = as_finite_array(point_coords, "point_coords")
    labels = check_labels(point_labels)
    if allow_empty and coords.size == 0 and labels.size == 0:
        return np.zeros((1, 0, 2)), np.zeros((1, 0), np.int32)
    if coords.ndim == 2:
        coords = coords[None]
    if labels.ndim == 1:
        labels = labels[None]
    if coords.ndim != 3 or coords.shape[-1] != 2:
        raise PromptError(f"point_coords must have shape (N, 2) or (B, N, 2), got {tuple(np.shape(point_coords))}")
    if labels.ndim != 2 or labels.shape != coords.shape[:2]:
        raise PromptError(
            f"point_labels shape {tuple(np.shape(point_labels))} does not match point_coords shape "
            f"{tuple(np.shape(point_coords))}: need one label per point"
        )
    if coords.shape[1] == 0:
        raise PromptError("point_coords is empty: give at least one point, or pass None")
    return coords, labels


def check_box(box) -> np.ndarray:
    """(B, 2, 2) box corners as an array, after shape and corner-order checks."""
    arr = as_finite_array(box, "box")
    if arr.ndim >= 1 and arr.shape[-1] == 4:
        arr = arr.reshape(-1, 2, 2)
    elif arr.ndim >= 2 and arr.shape[-2:] == (2, 2):
        arr = arr.reshape(-1, 2, 2)
    else:
        raise PromptError(f"box must have shape (4,), (B, 4) or (B, 2, 2) in XYXY order, got {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise PromptError("box is empty: give at least one box, or pass None")
    check_box_corners(arr)
    return arr


def check_mask(mask_input, low_res: int) -> np.ndarray:
    """(B, 1, low_res, low_res) mask logits as an array."""
    arr = as_finite_array(mask_input, "mask_input")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] != 1 or arr.shape[-2:] != (low_res, low_res):
        raise PromptError(f"mask_input must have shape (1, {low_res}, {low_res}) or (B, 1, {low_res}, {low_res}) "
                          f"(low-res logits, e.g. from a previous predict), got {tuple(arr.shape)}")
    return arr
