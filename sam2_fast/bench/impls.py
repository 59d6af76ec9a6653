"""The two implementations the runner compares, behind one small interface.

Both expose the official builder ``build_sam2_video_predictor(config_file, ckpt_path,
device, mode, hydra_overrides_extra, apply_postprocessing, vos_optimized)`` and the
official predictor API. They differ only in how a clip of uint8 frames reaches
``init_state``: ours takes the frames directly; the reference reads a JPEG folder or an
mp4 (through decord), so its frame loader is replaced, for the duration of the call, by
one returning the same tensor it would build (PIL resize, /255, ImageNet normalisation)
without a lossy JPEG round trip.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple
from unittest import mock

import numpy as np
import torch

# Short model names -> official config names (both builders accept these).
MODEL_CONFIGS = {
    "tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "large": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "2.0-tiny": "configs/sam2/sam2_hiera_t.yaml",
    "2.0-small": "configs/sam2/sam2_hiera_s.yaml",
    "2.0-base_plus": "configs/sam2/sam2_hiera_b+.yaml",
    "2.0-large": "configs/sam2/sam2_hiera_l.yaml",
}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def config_for(model: str) -> str:
    if model in MODEL_CONFIGS:
        return MODEL_CONFIGS[model]
    if model.endswith(".yaml"):
        return model
    raise ValueError(f"unknown model {model!r}: use one of {sorted(MODEL_CONFIGS)} or an official config path")


@dataclass
class Impl:
    name: str  # "ours" or "reference"
    label: str  # what the report prints
    builder: Optional[Callable[..., torch.nn.Module]]
    takes_frames: bool  # init_state accepts a list of HWC uint8 frames
    missing: Optional[str] = None  # why it cannot run here

    @property
    def available(self) -> bool:
        return self.builder is not None and self.missing is None


def reference_impl() -> Impl:
    try:
        from sam2.build_sam import build_sam2_video_predictor
    except Exception as exc:  # noqa: BLE001 - any import failure means "not installed here"
        return Impl("reference", "sam2==1.1.0", None, False, f"reference sam2 not importable ({exc.__class__.__name__}: {exc})")
    return Impl("reference", "sam2==1.1.0", build_sam2_video_predictor, False)


def ours_impl(stand_in: bool = False) -> Impl:
    """Our predictor; ``stand_in=True`` puts the reference in its place (harness self-check)."""
    if stand_in:
        ref = reference_impl()
        return Impl("ours", "reference as ours (self-check)", ref.builder, False, ref.missing)
    try:
        from sam2_fast.build_sam import build_sam2_video_predictor
    except Exception as exc:  # noqa: BLE001
        return Impl("ours", "sam2_fast", None, True, f"sam2_fast.build_sam not importable yet ({exc.__class__.__name__}: {exc})")
    return Impl("ours", "sam2_fast", build_sam2_video_predictor, True)


def build(impl: Impl, model: str, image_size: Optional[int], device: torch.device, vos_optimized: bool = False,
          ckpt_path: Optional[str] = None, **extra) -> torch.nn.Module:
    if not impl.available:
        raise RuntimeError(impl.missing or f"{impl.name} is not available")
    overrides: List[str] = []
    if image_size:
        overrides.append(f"++model.image_size={int(image_size)}")
    return impl.builder(config_for(model), ckpt_path, device=device, mode="eval",
                        hydra_overrides_extra=overrides, apply_postprocessing=True, vos_optimized=vos_optimized, **extra)


def preprocess(frames: Sequence[np.ndarray], image_size: int) -> torch.Tensor:
    """What the reference's JPEG loader builds: (T, 3, S, S) float32, normalised."""
    from PIL import Image

    out = torch.empty(len(frames), 3, image_size, image_size, dtype=torch.float32)
    for i, frame in enumerate(frames):
        resized = np.asarray(Image.fromarray(frame).convert("RGB").resize((image_size, image_size)))
        out[i] = torch.from_numpy(resized / 255.0).permute(2, 0, 1)
    mean = torch.tensor(_IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(_IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return (out - mean) / std


def init_state(impl: Impl, predictor, frames: Sequence[np.ndarray], device: torch.device,
               preprocessed: Optional[torch.Tensor] = None):
    if impl.takes_frames:
        return predictor.init_state(list(frames))
    images = preprocessed if preprocessed is not None else preprocess(frames, predictor.image_size)
    images = images.to(device)
    height, width = frames[0].shape[:2]

    def fake_loader(**kwargs):
        return images, height, width

    import sam2.sam2_video_predictor as ref_mod

    with mock.patch.object(ref_mod, "load_video_frames", fake_loader):
        return predictor.init_state("<preloaded frames>")


def add_clicks(predictor, state, clicks: Sequence[Tuple[float, float]]) -> None:
    """One positive click per object on frame 0 (object ids 1..N)."""
    for k, (x, y) in enumerate(clicks):
        predictor.add_new_points_or_box(
            inference_state=state, frame_idx=0, obj_id=k + 1,
            points=np.array([[x, y]], dtype=np.float32), labels=np.array([1], dtype=np.int32),
        )


def disable_hole_filling(predictor) -> bool:
    """Turn ``fill_hole_area`` post-processing off; returns whether the predictor had it.

    The reference's hole filling needs a CUDA extension that the pip build
    (``SAM2_BUILD_CUDA=0``) lacks, so it silently skips it while ours would do the work:
    the default benchmark turns it off on both sides so they compute the same thing.
    """
    if hasattr(predictor, "fill_hole_area"):
        predictor.fill_hole_area = 0
        return True
    return False


@contextlib.contextmanager
def quiet_reference():
    """Silence per-run progress bars (both implementations) and missing-extension warnings."""
    import sys
    import warnings

    patches = []
    try:
        from tqdm import tqdm as bar_class
    except Exception:  # noqa: BLE001 - no tqdm: nothing prints bars
        bar_class = None
    # tqdm reads TQDM_DISABLE only when it is imported, so swap the bar for a pass-through
    # in every predictor module that holds it.
    for name, mod in list(sys.modules.items()):
        if bar_class is not None and (name.startswith("sam2.") or name.startswith("sam2_fast.")) \
                and getattr(mod, "tqdm", None) is bar_class:
            patches.append(mock.patch.object(mod, "tqdm", _no_bar))
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        for p in patches:
            stack.enter_context(p)
        yield


def _no_bar(iterable, *args, **kwargs):
    return iterable
