"""``sam2.utils.misc`` for code that imports it: same names, signatures and results.

Differences, each because the official one cannot run or costs more here:

* ``get_connected_components`` runs our vectorised torch labelling (CPU and CUDA alike)
  instead of the official compiled CUDA extension. Areas are identical; labels are equal
  up to renumbering (a component's id is its first pixel's flat index + 1; the official
  kernel numbers by 2x2 blocks), so compare partitions, not ids.
* ``fill_holes_in_mask_scores`` therefore always fills holes (the official one skips the
  step with a warning when its extension is missing, e.g. on CPU).
* ``load_video_frames`` reads JPEG folders bitwise like the official one. Video files are
  decoded with PyAV (any container, not only .mp4) instead of decord, and resized like a
  JPEG frame (PIL), so they match our predictor rather than decord's resize. In-memory
  frames (an (N, H, W, 3) uint8 array or a list of frames) are accepted too. With
  ``async_loading_frames=True`` the frames come as a lazy, tensor-like view (``len``,
  ``[t]``, ``.shape``) instead of the official loader object.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from sam2_fast.utils.masks import connected_components
from sam2_fast.utils.transforms import IMAGENET_MEAN, IMAGENET_STD
from sam2_fast.utils.masks import fill_holes_in_mask_scores as _fill_holes

__all__ = [
    "get_sdpa_settings",
    "get_connected_components",
    "mask_to_box",
    "load_video_frames",
    "load_video_frames_from_jpg_images",
    "load_video_frames_from_video_file",
    "fill_holes_in_mask_scores",
    "concat_points",
]

IMG_MEAN, IMG_STD = IMAGENET_MEAN, IMAGENET_STD  # the official module's names


def get_sdpa_settings() -> Tuple[bool, bool, bool]:
    """(old_gpu, use_flash_attn, math_kernel_on), decided as the official function does."""
    if torch.cuda.is_available():
        major = torch.cuda.get_device_properties(0).major
        old_gpu = major < 7
        use_flash_attn = major >= 8  # Flash Attention needs Ampere (8.0) or newer
        if not use_flash_attn:
            warnings.warn("Flash Attention is disabled as it requires a GPU with Ampere (8.0) CUDA capability.",
                          category=UserWarning, stacklevel=2)
        pytorch_version = tuple(int(v) for v in torch.__version__.split(".")[:2])
        if pytorch_version < (2, 2):
            warnings.warn(f"You are using PyTorch {torch.__version__} without Flash Attention v2 support. "
                          "Consider upgrading to PyTorch 2.2+ for Flash Attention v2 (which could be faster).",
                          category=UserWarning, stacklevel=2)
        math_kernel_on = pytorch_version < (2, 2) or not use_flash_attn
    else:
        old_gpu, use_flash_attn, math_kernel_on = True, False, True
    return old_gpu, use_flash_attn, math_kernel_on


def get_connected_components(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """8-connected components of binary masks (N, 1, H, W) -> (labels, counts), int32.

    ``labels``: 0 on background, a positive id per component; ``counts``: the area of the
    pixel's component (0 on background). See the module docstring for label numbering.
    """
    return connected_components(mask.to(torch.uint8))


def mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """Bounding boxes of masks (B, 1, H, W) bool -> (B, 1, 4) int [x_min, y_min, x_max, y_max].

    An empty mask gives [W, H, -1, -1], as the official function does.
    """
    b, _, h, w = masks.shape
    device = masks.device
    xs = torch.arange(w, device=device, dtype=torch.int32)
    ys = torch.arange(h, device=device, dtype=torch.int32)
    grid_xs, grid_ys = torch.meshgrid(xs, ys, indexing="xy")  # (H, W) each
    grid_xs = grid_xs[None, None].expand(b, 1, h, w)
    grid_ys = grid_ys[None, None].expand(b, 1, h, w)
    min_xs = torch.where(masks, grid_xs, w).flatten(-2).min(dim=-1).values
    max_xs = torch.where(masks, grid_xs, -1).flatten(-2).max(dim=-1).values
    min_ys = torch.where(masks, grid_ys, h).flatten(-2).min(dim=-1).values
    max_ys = torch.where(masks, grid_ys, -1).flatten(-2).max(dim=-1).values
    return torch.stack((min_xs, min_ys, max_xs, max_ys), dim=-1)


def load_video_frames(video_path: Any, image_size: int, offload_video_to_cpu: bool,
                      img_mean: Sequence[float] = IMG_MEAN, img_std: Sequence[float] = IMG_STD,
                      async_loading_frames: bool = False,
                      compute_device: torch.device | str = torch.device("cuda"),
                      ) -> Tuple[Any, int, int]:
    """(frames, video_height, video_width) of a JPEG folder, a video file or its bytes.

    ``frames`` is the (N, 3, S, S) float32 tensor, ImageNet-normalised, on ``compute_device``
    (on the CPU with ``offload_video_to_cpu``): every frame is loaded, as the official
    function does (the predictor itself decodes lazily instead). With
    ``async_loading_frames`` a lazy view of the frames is returned at once.
    """
    from sam2_fast.video.frames import open_frames
    from sam2_fast.video.frames_view import FramesView

    src = open_frames(video_path, image_size, compute_device, offload_video_to_cpu=offload_video_to_cpu,
                      img_mean=img_mean, img_std=img_std)
    height, width = src.video_height, src.video_width
    if async_loading_frames:
        return FramesView(src), height, width
    with src:
        return FramesView(src)[:], height, width


def load_video_frames_from_jpg_images(video_path: Any, image_size: int, offload_video_to_cpu: bool,
                                      img_mean: Sequence[float] = IMG_MEAN, img_std: Sequence[float] = IMG_STD,
                                      async_loading_frames: bool = False,
                                      compute_device: torch.device | str = torch.device("cuda"),
                                      ) -> Tuple[Any, int, int]:
    """``load_video_frames`` for a folder of ``<index>.jpg`` frames."""
    return load_video_frames(video_path, image_size, offload_video_to_cpu, img_mean, img_std,
                             async_loading_frames, compute_device)


def load_video_frames_from_video_file(video_path: Any, image_size: int, offload_video_to_cpu: bool,
                                      img_mean: Sequence[float] = IMG_MEAN, img_std: Sequence[float] = IMG_STD,
                                      compute_device: torch.device | str = torch.device("cuda"),
                                      ) -> Tuple[Any, int, int]:
    """``load_video_frames`` for a video file (or its bytes), decoded with PyAV."""
    return load_video_frames(video_path, image_size, offload_video_to_cpu, img_mean, img_std,
                             False, compute_device)


def fill_holes_in_mask_scores(mask: torch.Tensor, max_area: float) -> torch.Tensor:
    """Background regions (scores <= 0) of area <= ``max_area`` become 0.1 (foreground)."""
    return _fill_holes(mask, max_area)


def concat_points(old_point_inputs: Optional[Dict[str, torch.Tensor]], new_points: torch.Tensor,
                  new_labels: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Add new points and labels (B, N, 2) / (B, N) after the previous ones."""
    if old_point_inputs is None:
        points, labels = new_points, new_labels
    else:
        points = torch.cat([old_point_inputs["point_coords"], new_points], dim=1)
        labels = torch.cat([old_point_inputs["point_labels"], new_labels], dim=1)
    return {"point_coords": points, "point_labels": labels}
