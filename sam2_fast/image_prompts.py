"""Checking and batching the prompts of the image predictor.

User prompts arrive as numpy arrays / lists in original-image pixels (or normalised
[0, 1] coordinates when ``normalize_coords=False`` ... see ``PromptChecker``). Everything
that can be wrong with them is caught here with a message that names the problem, before
any tensor reaches the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch


class PromptError(ValueError):
    """A point, label, box or mask prompt that cannot be used."""


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


def _as_float_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PromptError(f"{name} must be numeric, got {type(x).__name__}: {exc}") from exc
    if not np.all(np.isfinite(arr)):
        raise PromptError(f"{name} contains NaN or infinite values")
    return arr


def check_points(point_coords, point_labels, orig_hw: Tuple[int, int], normalize_coords: bool
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """(B, N, 2) coords and (B, N) labels as arrays, after shape/range checks."""
    if point_labels is None:
        raise PromptError("point_labels must be given with point_coords (1 = foreground, 0 = background)")
    coords = _as_float_array(point_coords, "point_coords")
    labels = _as_float_array(point_labels, "point_labels")
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
    if not np.all(np.isin(labels, (-1, 0, 1, 2, 3))):
        raise PromptError(f"point_labels must be 0 (background), 1 (foreground), 2/3 (box corners) "
                          f"or -1 (padding), got {np.unique(labels).tolist()}")
    real = labels >= 0  # padding points (label -1) may sit anywhere
    h, w = orig_hw
    limit_x, limit_y = (w, h) if normalize_coords else (1.0, 1.0)
    xs, ys = coords[..., 0][real], coords[..., 1][real]
    if xs.size and (xs.min() < 0 or ys.min() < 0 or xs.max() > limit_x or ys.max() > limit_y):
        space = f"the image ({w}x{h} pixels, x in [0, {w}], y in [0, {h}])" if normalize_coords else \
            "[0, 1] (normalize_coords=False expects coordinates already normalised)"
        bad = coords[real][(xs < 0) | (ys < 0) | (xs > limit_x) | (ys > limit_y)][0]
        raise PromptError(f"point ({bad[0]:g}, {bad[1]:g}) lies outside {space}")
    return coords, labels.astype(np.int32)


def check_box(box, orig_hw: Tuple[int, int], normalize_coords: bool) -> np.ndarray:
    """(B, 2, 2) box corners as an array, after shape/range checks."""
    arr = _as_float_array(box, "box")
    if arr.ndim >= 1 and arr.shape[-1] == 4:
        arr = arr.reshape(-1, 2, 2)
    elif arr.ndim >= 2 and arr.shape[-2:] == (2, 2):
        arr = arr.reshape(-1, 2, 2)
    else:
        raise PromptError(f"box must have shape (4,), (B, 4) or (B, 2, 2) in XYXY order, got {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise PromptError("box is empty: give at least one box, or pass None")
    if np.any(arr[:, 1] < arr[:, 0]):
        raise PromptError("box must be XYXY with x0 <= x1 and y0 <= y1")
    h, w = orig_hw
    limit = np.array([w, h] if normalize_coords else [1.0, 1.0])
    if np.any(arr < 0) or np.any(arr > limit):
        raise PromptError(f"box {arr.reshape(-1, 4)[0].tolist()} lies outside the image "
                          f"({w}x{h} pixels)" if normalize_coords else "box lies outside [0, 1]")
    return arr


def check_mask(mask_input, low_res: int) -> np.ndarray:
    """(B, 1, low_res, low_res) mask logits as an array."""
    arr = _as_float_array(mask_input, "mask_input")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] != 1 or arr.shape[-2:] != (low_res, low_res):
        raise PromptError(f"mask_input must have shape (1, {low_res}, {low_res}) or (B, 1, {low_res}, {low_res}) "
                          f"(low-res logits, e.g. from a previous predict), got {tuple(arr.shape)}")
    return arr
