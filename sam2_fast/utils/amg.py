"""Mask-data helpers of the automatic mask generator, a drop-in for ``sam2.utils.amg``.

Same names, signatures and results as the official module, so ``from sam2.utils.amg
import ...`` can be swapped for ``from sam2_fast.utils.amg import ...``. What differs is
how the per-mask work is done:

* ``mask_to_rle_pytorch`` encodes a whole batch on the mask's device and moves the run
  lengths to the host in one transfer; the official loop filters the change list once per
  mask (O(masks x changes), and one device sync per mask).
* ``rle_to_mask`` expands the runs with one ``np.repeat`` instead of a Python loop.
* ``remove_small_regions`` uses our 8-connected components (``sam2_fast.utils.masks``,
  plain torch) instead of OpenCV, which is not a dependency here; it labels exactly like
  ``cv2.connectedComponentsWithStats(mask, 8)`` for what the function uses (component
  sizes; the first-labelled component among equally large ones).

RLE layout (COCO "uncompressed RLE"): ``{"size": [H, W], "counts": [...]}``, runs over the
mask in column-major (Fortran) order, starting with a run of zeros (0 when the first pixel
is set).
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any, Dict, Generator, ItemsView, List, Tuple

import numpy as np
import torch

from sam2_fast.utils.masks import connected_components

__all__ = [
    "MaskData", "is_box_near_crop_edge", "box_xyxy_to_xywh", "batch_iterator",
    "mask_to_rle_pytorch", "rle_to_mask", "area_from_rle", "calculate_stability_score",
    "build_point_grid", "build_all_layer_point_grids", "generate_crop_boxes",
    "uncrop_boxes_xyxy", "uncrop_points", "uncrop_masks", "remove_small_regions",
    "coco_encode_rle", "batched_mask_to_box", "require_pycocotools",
]

_STORABLE = (list, np.ndarray, torch.Tensor)


class MaskData:
    """Masks and their per-mask data in batched form: filtered and concatenated together."""

    def __init__(self, **kwargs: Any) -> None:
        for k, v in kwargs.items():
            self._check(k, v)
        self._stats: Dict[str, Any] = dict(**kwargs)

    @staticmethod
    def _check(key: str, item: Any) -> None:
        if not isinstance(item, _STORABLE):
            raise TypeError(f"MaskData only supports list, numpy arrays, and torch tensors; "
                            f"{key!r} is {type(item).__name__}")

    def __setitem__(self, key: str, item: Any) -> None:
        self._check(key, item)
        self._stats[key] = item

    def __delitem__(self, key: str) -> None:
        del self._stats[key]

    def __getitem__(self, key: str) -> Any:
        return self._stats[key]

    def __contains__(self, key: str) -> bool:
        return key in self._stats

    def items(self) -> ItemsView[str, Any]:
        return self._stats.items()

    def filter(self, keep: torch.Tensor) -> None:
        """Keep the entries selected by ``keep`` (a bool mask or indices) in every field."""
        keep = torch.as_tensor(keep)
        for k, v in self._stats.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                self._stats[k] = v[keep.to(v.device)]
            elif isinstance(v, np.ndarray):
                self._stats[k] = v[keep.detach().cpu().numpy()]
            elif isinstance(v, list):
                idx = keep.nonzero().flatten() if keep.dtype == torch.bool else keep.flatten()
                self._stats[k] = [v[i] for i in idx.tolist()]
            else:
                raise TypeError(f"MaskData key {k} has an unsupported type {type(v)}.")

    def cat(self, new_stats: "MaskData") -> None:
        """Append another MaskData's entries (same keys) after this one's."""
        for k, v in new_stats.items():
            if k not in self._stats or self._stats[k] is None:
                # copy so that later in-place edits of one do not show in the other
                self._stats[k] = v.clone() if isinstance(v, torch.Tensor) else \
                    v.copy() if isinstance(v, (np.ndarray, list)) else v
            elif isinstance(v, torch.Tensor):
                self._stats[k] = torch.cat([self._stats[k], v.to(self._stats[k].device)], dim=0)
            elif isinstance(v, np.ndarray):
                self._stats[k] = np.concatenate([self._stats[k], v], axis=0)
            elif isinstance(v, list):
                self._stats[k] = self._stats[k] + list(v)
            else:
                raise TypeError(f"MaskData key {k} has an unsupported type {type(v)}.")

    def to_numpy(self) -> None:
        for k, v in self._stats.items():
            if isinstance(v, torch.Tensor):
                self._stats[k] = v.float().detach().cpu().numpy()


# ----------------------------------------------------------------------------- boxes, points
def is_box_near_crop_edge(boxes: torch.Tensor, crop_box: List[int], orig_box: List[int],
                          atol: float = 20.0) -> torch.Tensor:
    """(N,) bool: boxes (N, 4) XYXY in crop pixels that touch the crop's edge but not the
    image's (masks cut off by the crop)."""
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = torch.isclose(boxes, crop[None, :], atol=atol, rtol=0)
    near_image = torch.isclose(boxes, orig[None, :], atol=atol, rtol=0)
    return torch.any(near_crop & ~near_image, dim=1)


def box_xyxy_to_xywh(box_xyxy: torch.Tensor) -> torch.Tensor:
    """One box (4,) XYXY -> XYWH (a copy; tensor or numpy array)."""
    box = box_xyxy.clone() if isinstance(box_xyxy, torch.Tensor) else np.array(box_xyxy, copy=True)
    box[2] = box[2] - box[0]
    box[3] = box[3] - box[1]
    return box


def batch_iterator(batch_size: int, *args) -> Generator[List[Any], None, None]:
    """Slices of ``batch_size`` entries of each argument (all of the same length)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not args or any(len(a) != len(args[0]) for a in args):
        raise ValueError("Batched iteration must have inputs of all the same size.")
    n = len(args[0])
    for start in range(0, n, batch_size):
        yield [arg[start:start + batch_size] for arg in args]


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: List[int]) -> torch.Tensor:
    x0, y0, _, _ = crop_box
    offset = torch.tensor([[x0, y0, x0, y0]], device=boxes.device)
    if boxes.dim() == 3:  # (B, N, 4)
        offset = offset.unsqueeze(1)
    return boxes + offset


def uncrop_points(points: torch.Tensor, crop_box: List[int]) -> torch.Tensor:
    x0, y0, _, _ = crop_box
    offset = torch.tensor([[x0, y0]], device=points.device)
    if points.dim() == 3:
        offset = offset.unsqueeze(1)
    return points + offset


def uncrop_masks(masks: torch.Tensor, crop_box: List[int], orig_h: int, orig_w: int) -> torch.Tensor:
    """(N, h, w) masks of a crop -> (N, orig_h, orig_w), zero outside the crop."""
    x0, y0, x1, y1 = crop_box
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    pad_x, pad_y = orig_w - (x1 - x0), orig_h - (y1 - y0)
    return torch.nn.functional.pad(masks, (x0, pad_x - x0, y0, pad_y - y0), value=0)


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """(..., H, W) bool masks -> (..., 4) XYXY boxes (inclusive pixel edges); [0, 0, 0, 0]
    for an empty mask. Integer output, as the official function."""
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, device=masks.device)
    shape = masks.shape
    h, w = shape[-2:]
    m = masks.reshape(-1, h, w)  # (N, H, W)

    def edges(occupied: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        # occupied: (N, n) bool -> first and last occupied index (last < first when empty)
        coords = occupied * torch.arange(n, device=m.device)[None, :]
        last = coords.max(dim=-1).values
        first = (coords + n * (~occupied)).min(dim=-1).values
        return first, last

    top, bottom = edges(m.amax(dim=-1), h)
    left, right = edges(m.amax(dim=-2), w)
    empty = (right < left) | (bottom < top)
    out = torch.stack([left, top, right, bottom], dim=-1) * (~empty).unsqueeze(-1)
    return out.reshape(*shape[:-2], 4)


# ----------------------------------------------------------------------------- grids, crops
def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) points evenly spaced in [0, 1]^2, x varying fastest."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> List[np.ndarray]:
    """One grid per crop layer; layer i has ``n_per_side / scale_per_layer**i`` per side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer ** i))) for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: Tuple[int, ...], n_layers: int, overlap_ratio: float
                        ) -> Tuple[List[List[int]], List[int]]:
    """XYXY crop boxes (the whole image first, then (2**i)**2 per layer i) and their layers."""
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes, layer_idxs = [[0, 0, im_w, im_h]], [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n_per_side = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_per_side))
        crop_w = crop_len(im_w, n_per_side, overlap)
        crop_h = crop_len(im_h, n_per_side, overlap)
        xs = [int((crop_w - overlap) * i) for i in range(n_per_side)]
        ys = [int((crop_h - overlap) * i) for i in range(n_per_side)]
        for x0, y0 in product(xs, ys):
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


# ----------------------------------------------------------------------------- scores
def calculate_stability_score(masks: torch.Tensor, mask_threshold: float,
                              threshold_offset: float) -> torch.Tensor:
    """IoU of the masks binarised at ``threshold +- offset`` (one contains the other, so it
    is a ratio of pixel counts). (..., H, W) logits -> (...) float."""
    # int16 row sums then int32 totals, as the official code: exact, and the bool -> int
    # cast never materialises an int64 copy of the logits
    inter = (masks > (mask_threshold + threshold_offset)).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    union = (masks > (mask_threshold - threshold_offset)).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    return inter / union


# ----------------------------------------------------------------------------- RLE
def mask_to_rle_pytorch(tensor: torch.Tensor) -> List[Dict[str, Any]]:
    """(B, H, W) bool masks -> uncompressed RLEs (column-major runs, as pycocotools wants).

    All masks are encoded at once on their device: the change points of every mask come
    from one ``nonzero``, the run lengths from one subtraction, and one transfer brings
    them to the host, where they are only split per mask.
    """
    if tensor.dim() != 3:
        raise ValueError(f"mask_to_rle_pytorch expects (B, H, W) masks, got shape {tuple(tensor.shape)}")
    b, h, w = tensor.shape
    if b == 0:
        return []
    n = h * w
    flat = tensor.permute(0, 2, 1).reshape(b, n).bool()  # (B, H*W), Fortran order
    rows, cols = (flat[:, 1:] ^ flat[:, :-1]).nonzero(as_tuple=True)  # (K,), row-major sorted
    pos = cols + 1  # start of the run that each change begins
    first_in_row = torch.ones_like(rows, dtype=torch.bool)
    first_in_row[1:] = rows[1:] != rows[:-1]
    prev = torch.zeros_like(pos)
    prev[1:] = pos[:-1]
    runs = pos - torch.where(first_in_row, torch.zeros_like(prev), prev)  # run ending at each change
    last_start = torch.zeros(b, dtype=pos.dtype, device=pos.device).scatter_reduce(
        0, rows, pos, reduce="amax", include_self=True)
    tail = n - last_start  # (B,) the final run
    per_row = torch.bincount(rows, minlength=b)
    # one transfer for everything the host needs
    host = torch.cat([runs, tail, per_row, flat[:, 0].long()]).cpu().numpy()
    k = runs.numel()
    runs_h, tail_h, per_row_h, starts_one = host[:k], host[k:k + b], host[k + b:k + 2 * b], host[k + 2 * b:]
    splits = np.split(runs_h, np.cumsum(per_row_h)[:-1])
    out = []
    for i in range(b):
        counts = [0] if starts_one[i] else []
        counts.extend(splits[i].tolist())
        counts.append(int(tail_h[i]))
        out.append({"size": [h, w], "counts": counts})
    return out


def rle_to_mask(rle: Dict[str, Any]) -> np.ndarray:
    """Uncompressed RLE -> (H, W) bool mask."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.size and (counts.min() < 0 or counts.sum() != h * w):
        raise ValueError(f"RLE counts sum to {int(counts.sum())} but the size {h}x{w} has {h * w} pixels")
    values = np.zeros(counts.size, dtype=bool)
    values[1::2] = True
    mask = np.repeat(values, counts).reshape(w, h)
    return mask.transpose()  # column-major runs -> (H, W)


def area_from_rle(rle: Dict[str, Any]) -> int:
    return sum(rle["counts"][1::2])


def require_pycocotools():
    """``pycocotools.mask``, or an ImportError that says how to get it."""
    try:
        from pycocotools import mask as mask_utils  # type: ignore
    except ImportError as exc:
        raise ImportError("COCO RLE output needs pycocotools: pip install pycocotools") from exc
    return mask_utils


def coco_encode_rle(uncompressed_rle: Dict[str, Any]) -> Dict[str, Any]:
    """Uncompressed RLE -> COCO compressed RLE with a ``str`` counts (JSON-serialisable)."""
    mask_utils = require_pycocotools()
    h, w = uncompressed_rle["size"]
    rle = mask_utils.frPyObjects(uncompressed_rle, h, w)
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


# ----------------------------------------------------------------------------- small regions
def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``"islands"``) smaller than
    ``area_thresh`` pixels (8-connected). Returns the mask and whether it changed; when every
    island is small the largest one is kept."""
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    m = torch.from_numpy(np.asarray(mask, dtype=bool))
    holes = mode == "holes"
    work = ~m if holes else m
    labels, areas = connected_components(work)  # per pixel: component id (0 = none), its size
    small = (labels > 0) & (areas < area_thresh)
    if not bool(small.any()):
        return mask, False
    if holes:
        return (m | small).numpy(), True
    keep = (labels > 0) & ~small
    if not bool(keep.any()):
        # cv2 numbers components in raster order of their first pixel and np.argmax keeps
        # the first of equal sizes; the raster-first pixel of the largest size is in it
        first = int(torch.argmax(areas.flatten()))
        keep = labels == labels.flatten()[first]
    return keep.numpy(), True
