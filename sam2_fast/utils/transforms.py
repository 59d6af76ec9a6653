"""The image predictor's input and output transforms, without torchvision.

Numerics follow the reference's ``SAM2Transforms`` step for step (it chains torchvision's
``ToTensor``, tensor ``Resize`` and ``Normalize``):

1. uint8 HWC -> float32 CHW, ``/ 255`` (a float32 division, as ``ToTensor`` does); a float
   HWC image is taken as already in [0, 1] (``ToTensor`` passes floats through), so
   ``u8 / 255`` as float32 or float64 gives bitwise the uint8 result;
2. ``F.interpolate(..., (S, S), mode="bilinear", align_corners=False, antialias=True)``:
   exactly the call torchvision's tensor ``Resize`` makes (its default antialias is True);
3. ``(x - mean) / std`` per channel in float32.

Inputs the reference rejects or mangles are converted instead: grayscale is replicated to
RGB and alpha is dropped (PIL images of any mode go through ``convert("RGB")``), float64 and
float16 images are cast to float32 (the reference's float64 tensor fails in the network).
Float values outside [0, 1] are rejected: the reference would embed a 0..255 float image
as if it were 255 times brighter than white.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sam2_fast.modeling import kernel_gate
from sam2_fast.utils.masks import postprocess_low_res_masks

__all__ = [
    "ImageTransforms",
    "SAM2Transforms",
    "image_hw",
    "image_to_rgb_hwc",
    "image_to_uint8_chw",
    "image_to_unit_chw",
    "image_to_tensor",
    "transform_coords",
    "transform_boxes",
    "upsample_masks",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_hwc_uint8(shape: tuple[int, ...], dtype: Any, what: str = "image",
                    error: type[Exception] = ValueError) -> None:
    """Reject what cannot be an HWC uint8 picture (image or video frame), naming ``what``.

    Grayscale (H, W) / (H, W, 1) and RGBA (H, W, 4) pass: callers convert them to RGB.
    """
    name = str(dtype).replace("torch.", "")
    if name != "uint8":
        raise error(f"{what} has dtype {name}; it must be uint8 (0..255)")
    if len(shape) not in (2, 3):
        raise error(f"{what} has shape {shape}; expected (H, W, 3) (or (H, W))")
    if len(shape) == 3 and shape[2] not in (1, 3, 4):
        raise error(f"{what} has {shape[2]} channels (shape {shape}); expected 3 channels "
                    "(1 = grayscale and 4 = RGBA are converted to RGB)")
    if shape[0] == 0 or shape[1] == 0:
        raise error(f"{what} is empty (shape {shape})")


_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def check_hwc_image(shape: tuple[int, ...], dtype: Any, what: str = "image") -> None:
    """An image for the image predictor: HWC uint8 (0..255) or float (0.0..1.0)."""
    name = str(dtype).replace("torch.", "")
    if name not in _FLOAT_DTYPES + ("uint8",):
        raise ValueError(f"{what} has dtype {name}; it must be uint8 (0..255) or float (0.0..1.0)")
    check_hwc_uint8(shape, "uint8", what)  # the layout rules are the same for both


def _check_unit_range(x: torch.Tensor, what: str = "image") -> None:
    """Float pixels must be finite and in [0, 1] (one min/max pass)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        hint = " (a 0..255 image: divide by 255 or pass uint8)" if hi > 1.0 else ""
        raise ValueError(f"float {what} values span [{lo:g}, {hi:g}]; float images must be in "
                         f"[0, 1]{hint}")


def image_hw(image: Any) -> tuple[int, int]:
    """(H, W) of a PIL image or an HWC array / tensor."""
    if isinstance(image, Image.Image):
        return image.size[1], image.size[0]
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) < 2:
        raise ValueError(f"image must be a PIL image or an HWC array, got {type(image).__name__}")
    return int(shape[0]), int(shape[1])


def _hwc_tensor(image: Any) -> torch.Tensor:
    """PIL image or HWC numpy / torch image -> HWC tensor (uint8 or float), layout checked."""
    if isinstance(image, Image.Image):
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return torch.from_numpy(np.array(rgb, dtype=np.uint8))
    if isinstance(image, np.ndarray):
        check_hwc_image(tuple(image.shape), image.dtype)
        # torch cannot wrap a read-only array without a warning (and a later in-place edit
        # would write into memory the caller froze): copy those; writable ones are wrapped
        arr = np.ascontiguousarray(image) if image.flags.writeable else np.array(image, order="C")
        return torch.from_numpy(arr)
    if isinstance(image, torch.Tensor):
        check_hwc_image(tuple(image.shape), image.dtype)
        return image.detach()
    raise ValueError(
        f"image must be a PIL image or an HWC uint8 / float numpy array or tensor, got "
        f"{type(image).__name__}"
    )


def _to_rgb_chw(t: torch.Tensor) -> torch.Tensor:
    """(H, W[, 1|3|4]) -> (3, H, W) view: grayscale replicated, alpha dropped."""
    if t.dim() == 2:
        t = t[:, :, None]
    if t.shape[2] == 1:
        t = t.expand(-1, -1, 3)
    return t[:, :, :3].permute(2, 0, 1)


def image_to_uint8_chw(image: Any) -> torch.Tensor:
    """PIL image, HWC uint8 numpy array or HWC uint8 torch tensor -> (3, H, W) uint8 tensor
    (on the tensor's device for torch input, else CPU)."""
    t = _hwc_tensor(image)
    if t.dtype != torch.uint8:
        raise ValueError(f"image has dtype {str(t.dtype).replace('torch.', '')}; expected uint8 here")
    return _to_rgb_chw(t)


def image_to_rgb_hwc(image: Any) -> torch.Tensor:
    """Any accepted image -> (H, W, 3) RGB tensor for code that crops before embedding (the
    mask generator): uint8 stays uint8; float is checked to lie in [0, 1] and cast to float32,
    so each crop embeds exactly as ``set_image`` would embed it."""
    t = _to_rgb_chw(_hwc_tensor(image))
    if t.dtype != torch.uint8:
        _check_unit_range(t)
        t = t.to(torch.float32)
    return t.permute(1, 2, 0)


def image_to_unit_chw(image: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """Any accepted image -> (3, H, W) float32 in [0, 1] (on ``device``, else where it is).

    uint8 is divided by 255 in float32 (after the upload: 4x less traffic than floats);
    float input is checked to lie in [0, 1] and cast to float32.
    """
    t = _to_rgb_chw(_hwc_tensor(image))
    if device is not None:
        t = t.to(device, non_blocking=True)
    if t.dtype == torch.uint8:
        return t.contiguous().to(torch.float32).div(255)
    _check_unit_range(t)
    return t.contiguous().to(torch.float32)


def image_to_tensor(image: Any, resolution: int, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """One image -> normalised (3, S, S) float32 model input.

    uint8 pixels mean 0..255, float pixels 0.0..1.0 (``u8 / 255`` gives bitwise the uint8
    result). ``device=None`` computes where the pixels are (CPU for PIL / numpy): bitwise
    the reference. A CUDA device uploads the pixels first; GPU interpolation rounds
    differently, within ~1e-6.
    """
    x = image_to_unit_chw(image, device)  # (3, H, W)
    x = F.interpolate(x[None], size=(resolution, resolution), mode="bilinear",
                      align_corners=False, antialias=True)[0]  # (3, S, S)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32, device=x.device)[:, None, None]
    return x.sub_(m).div_(s)


def transform_coords(coords: torch.Tensor, resolution: int, normalize: bool = False,
                     orig_hw: Sequence[int] | None = None) -> torch.Tensor:
    """Point coordinates (..., 2) as (x, y) -> model input frame [0, S].

    With ``normalize`` the coordinates are in pixels of an (H, W) = ``orig_hw`` image and
    are first divided by (W, H); otherwise they are taken as already in [0, 1].
    """
    if coords.shape[-1] != 2:
        raise ValueError(f"coords must end in a dimension of 2 (x, y), got shape {tuple(coords.shape)}")
    if normalize:
        if orig_hw is None:
            raise ValueError("orig_hw (H, W) is needed to normalise pixel coordinates")
        h, w = orig_hw
        x = coords[..., 0] / w  # same two float ops as the reference, in the same order
        y = coords[..., 1] / h
        coords = torch.stack((x, y), dim=-1)
    return coords * resolution


def transform_boxes(boxes: torch.Tensor, resolution: int, normalize: bool = False,
                    orig_hw: Sequence[int] | None = None) -> torch.Tensor:
    """Boxes (..., 4) as (x0, y0, x1, y1) -> (B, 2, 2) corner points in the model frame."""
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must end in a dimension of 4 (x0, y0, x1, y1), got shape {tuple(boxes.shape)}")
    return transform_coords(boxes.reshape(-1, 2, 2), resolution, normalize, orig_hw)


def upsample_masks(masks: torch.Tensor, orig_hw: Sequence[int]) -> torch.Tensor:
    """(B, C, h, w) mask logits -> (B, C, H, W) by bilinear interpolation.

    Where the mask-upsampling Triton kernel is enabled (CUDA, or forced in tests) this goes
    through its dispatcher, which samples exactly like ``F.interpolate`` below.
    """
    h, w = int(orig_hw[0]), int(orig_hw[1])
    if kernel_gate.kernel_enabled("mask_upsample", masks.device.type):
        _, logits = kernel_gate.dispatch().upsample_masks(masks, (h, w), want_logits=True, want_mask=False)
        return logits
    return F.interpolate(masks, (h, w), mode="bilinear", align_corners=False)


class ImageTransforms:
    """Drop-in for the reference's ``SAM2Transforms`` (same method names and results)."""

    def __init__(self, resolution: int, mask_threshold: float = 0.0, max_hole_area: float = 0.0,
                 max_sprinkle_area: float = 0.0, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD,
                 device: torch.device | str | None = None) -> None:
        self.resolution = int(resolution)
        self.mask_threshold = float(mask_threshold)
        self.max_hole_area = float(max_hole_area)
        self.max_sprinkle_area = float(max_sprinkle_area)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.device = device  # where image preprocessing runs (None: where the pixels are)

    # argument names are the official ones (``x``, ``img_list``), for keyword callers
    def __call__(self, x: Any) -> torch.Tensor:
        """(3, S, S) float32 model input."""
        return image_to_tensor(x, self.resolution, self.mean, self.std, self.device)

    def forward_batch(self, img_list: Sequence[Any]) -> torch.Tensor:
        """(B, 3, S, S) from images of any sizes."""
        if len(img_list) == 0:
            raise ValueError("forward_batch needs at least one image")
        return torch.stack([self(img) for img in img_list], dim=0)

    def transform_coords(self, coords: torch.Tensor, normalize: bool = False,
                         orig_hw: Sequence[int] | None = None) -> torch.Tensor:
        return transform_coords(coords, self.resolution, normalize, orig_hw)

    def transform_boxes(self, boxes: torch.Tensor, normalize: bool = False,
                        orig_hw: Sequence[int] | None = None) -> torch.Tensor:
        return transform_boxes(boxes, self.resolution, normalize, orig_hw)

    def postprocess_masks(self, masks: torch.Tensor, orig_hw: Sequence[int]) -> torch.Tensor:
        """Low-res logits (B, C, h, w) -> (B, C, H, W): small holes / specks cleaned at low
        resolution (when enabled), then bilinear upsampling."""
        cleaned = postprocess_low_res_masks(masks, self.mask_threshold, self.max_hole_area,
                                            self.max_sprinkle_area)
        return upsample_masks(cleaned, orig_hw)


SAM2Transforms = ImageTransforms
