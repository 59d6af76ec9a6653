"""Synthetic clips and the reference harness for the video predictor tests.

* :func:`make_clip` draws a small video of moving shapes on a textured background;
  :func:`write_jpeg_folder` stores it the way the official predictor reads videos.
* :func:`build_reference` builds the official ``SAM2VideoPredictor`` on CPU with the
  sensitive weight recipe, patched so it runs in float32 without CUDA (see below);
  :func:`build_ours_from` builds ours with the same weights.
* :func:`run_script` plays one scripted interaction on a predictor and records every mask
  it returns; :func:`compare_records` checks two recordings against each other.

Reference patches (both exact, see issue 3):
* the official memory attention receives bfloat16 memories when a frame has no object
  pointer to concatenate, which fails against float32 weights without CUDA autocast; we
  cast ``memory`` to float32 on the way in (bf16 -> fp32 is lossless);
* hole filling needs the official compiled extension; on CPU it is skipped with a warning.
  :func:`scipy_components` is an 8-connected stand-in so ``apply_postprocessing=True`` is
  compared too.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from support import rel_err, sensitize_

REF_CONFIGS = {
    "sam2.1_hiera_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2_hiera_tiny": "configs/sam2/sam2_hiera_t.yaml",
}


@contextlib.contextmanager
def single_thread():
    """CPU time is shared: run the predictors on one thread, then restore the setting."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------- clips
def make_clip(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8: a drifting ellipse and a bouncing square on a smooth texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.zeros((height, width, 3), np.float32)
    for c in range(3):  # a few random low-frequency waves per channel
        for _ in range(3):
            fx, fy, ph = rng.uniform(0.01, 0.08), rng.uniform(0.01, 0.08), rng.uniform(0, 6.28)
            base[..., c] += 25 * np.sin(fx * xx + fy * yy + ph)
    base += 110 + rng.normal(0, 6, size=base.shape)
    colour_a = rng.uniform(150, 255, 3)
    colour_b = rng.uniform(0, 90, 3)
    frames = []
    for t in range(num_frames):
        img = base.copy()
        cx = width * (0.25 + 0.5 * t / max(num_frames - 1, 1))
        cy = height * (0.45 + 0.15 * np.sin(t / 3.0))
        ellipse = ((xx - cx) / (0.16 * width)) ** 2 + ((yy - cy) / (0.22 * height)) ** 2 <= 1.0
        img[ellipse] = colour_a
        sx = int(width * (0.7 - 0.4 * abs(np.sin(t / 5.0))))
        sy = int(height * 0.15)
        side = max(4, int(0.2 * min(height, width)))
        img[sy : sy + side, sx : sx + side] = colour_b
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(frames)


def write_jpeg_folder(frames: np.ndarray, folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(os.path.join(folder, f"{i:05d}.jpg"), quality=95)
    return folder


# ---------------------------------------------------------------------------- reference
def scipy_components(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """8-connected (labels, areas) of (N, 1, H, W) binary masks, like the official kernel."""
    from scipy import ndimage

    binary = mask.detach().to("cpu").numpy().astype(bool)
    labels = np.zeros(binary.shape, np.int32)
    areas = np.zeros(binary.shape, np.int32)
    for n in range(binary.shape[0]):
        lab, _ = ndimage.label(binary[n, 0], structure=np.ones((3, 3), bool))
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0  # background of the binary mask has no component
        labels[n, 0] = lab
        areas[n, 0] = sizes[lab]
    return torch.from_numpy(labels).to(mask.device), torch.from_numpy(areas).to(mask.device)


def install_scipy_components() -> Callable[[], None]:
    """Point the reference's connected components at scipy; returns the undo function."""
    import sam2.utils.misc as misc

    saved = misc.get_connected_components
    misc.get_connected_components = scipy_components
    return lambda: setattr(misc, "get_connected_components", saved)


def _float32_memory(module: torch.nn.Module) -> None:
    inner = module.forward

    def forward(*args, **kwargs):
        if "memory" in kwargs:
            kwargs["memory"] = kwargs["memory"].float()
        return inner(*args, **kwargs)

    module.forward = forward


def build_reference(config: str, image_size: int, seed: int, obj_score_bias: float,
                    apply_postprocessing: bool = True, overrides: Sequence[str] = ()):
    from sam2.build_sam import build_sam2_video_predictor

    # buffers the recipe does not redraw (the prompt encoder's random Fourier matrix) come
    # from the global generator at construction: seed it so every run sees the same model
    torch.manual_seed(seed)
    ref = build_sam2_video_predictor(REF_CONFIGS[config], device="cpu",
                                     hydra_overrides_extra=[f"++model.image_size={image_size}", *overrides],
                                     apply_postprocessing=apply_postprocessing)
    sensitize_(ref, seed, obj_score_bias=obj_score_bias)
    _float32_memory(ref.memory_attention)
    return ref.eval()


def build_ours_from(ref, config: str, image_size: int, apply_postprocessing: bool = True,
                    overrides: Sequence[str] = ()):
    from sam2_fast.build_sam import build_sam2_video_predictor

    ours = build_sam2_video_predictor(config, device="cpu",
                                      hydra_overrides_extra=[f"++model.image_size={image_size}", *overrides],
                                      apply_postprocessing=apply_postprocessing)
    ours.load_state_dict(ref.state_dict())
    return ours.eval()


# ---------------------------------------------------------------------------- scripts
Step = Tuple[str, Dict[str, Any]]
Record = Tuple[str, int, Tuple, torch.Tensor]


def run_script(predictor, video, steps: Sequence[Step]) -> List[Record]:
    """Play ``steps`` on a fresh session; record (step, frame_idx, obj_ids, masks) per output.

    Steps: ("points", kwargs of add_new_points_or_box without the state), ("mask", ...),
    ("propagate", kwargs), ("remove", kwargs of remove_object), ("clear", kwargs of
    clear_all_prompts_in_frame), ("reset", {}).
    """
    state = predictor.init_state(video)
    records: List[Record] = []
    for name, kwargs in steps:
        if name == "points":
            f, ids, masks = predictor.add_new_points_or_box(state, **kwargs)
            records.append((name, f, tuple(ids), masks.clone()))
        elif name == "mask":
            f, ids, masks = predictor.add_new_mask(state, **kwargs)
            records.append((name, f, tuple(ids), masks.clone()))
        elif name == "propagate":
            for f, ids, masks in predictor.propagate_in_video(state, **kwargs):
                records.append((name, f, tuple(ids), masks.clone()))
        elif name == "remove":
            ids, updated = predictor.remove_object(state, **kwargs)
            for f, masks in updated:
                records.append((name, f, tuple(ids), masks.clone()))
        elif name == "clear":
            f, ids, masks = predictor.clear_all_prompts_in_frame(state, **kwargs)
            records.append((name, f, tuple(ids), masks.clone()))
        elif name == "reset":
            predictor.reset_state(state)
        else:
            raise ValueError(f"unknown step {name!r}")
    return records


def compare_records(ours: List[Record], ref: List[Record], tol: float = 1e-4) -> float:
    """Same outputs in the same order; per frame and object rel. error <= tol; same masks.

    Binary masks may differ only where the reference logit is within rounding of 0.
    Returns the worst relative error.
    """
    assert len(ours) == len(ref), f"ours gave {len(ours)} outputs, the reference {len(ref)}"
    worst = 0.0
    for k, (a, b) in enumerate(zip(ours, ref)):
        assert a[:3] == b[:3], f"output {k}: ours {a[:3]} vs reference {b[:3]}"
        ma, mb = a[3].detach().double(), b[3].detach().double()
        assert ma.shape == mb.shape, f"output {k} {a[:3]}: shape {tuple(ma.shape)} vs {tuple(mb.shape)}"
        for obj in range(mb.shape[0]):
            err = rel_err(ma[obj], mb[obj])
            worst = max(worst, err)
            assert err <= tol, f"output {k} {a[:3]} object {obj}: rel err {err:.2e} > {tol:.0e}"
        differ = (ma > 0) != (mb > 0)
        near_zero = mb.abs() <= 1e-3
        assert not (differ & ~near_zero).any(), (
            f"output {k} {a[:3]}: {(differ & ~near_zero).sum().item()} mask pixels differ away from 0")
    return worst


def presence(records: List[Record], no_obj_score: float = -1024.0) -> Tuple[int, int]:
    """(# present, # absent) object-frames among propagation outputs."""
    present = absent = 0
    for name, _, _, masks in records:
        if name != "propagate":
            continue
        for obj in range(masks.shape[0]):
            if bool((masks[obj] == no_obj_score).all()):
                absent += 1
            else:
                present += 1
    return present, absent


# ---------------------------------------------------------------------------- fp32 memory bank
class _Float32Memory(torch.Tensor):
    """A memory tensor that ignores casts to bfloat16 (so the reference keeps fp32 memories)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            wanted = kwargs.get("dtype", next((a for a in args[1:] if isinstance(a, torch.dtype)), None))
            if wanted is torch.bfloat16:
                return args[0]
        out = super().__torch_function__(func, types, args, kwargs)
        if func is torch.Tensor.to and isinstance(out, torch.Tensor):
            return out  # keep the subclass so later casts are ignored too
        # anything computed from a memory is an ordinary tensor again
        return _plain(out)


def _plain(value):
    if isinstance(value, _Float32Memory):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def float32_memory_bank(ref, ours) -> Callable[[], None]:
    """Store memories in float32 in both predictors (instead of bfloat16); returns the undo.

    bfloat16 storage rounds: two fp32 computations that differ by 1e-7 (operation order)
    land on different bf16 values now and then, and tracking compounds those 4e-3 steps.
    With fp32 banks on both sides the comparison measures the network's own numerics.
    """
    import sam2_fast.video.outputs as outputs

    inner = ref._encode_new_memory

    def encode(*args, **kwargs):
        feats, pos = inner(*args, **kwargs)
        return feats.as_subclass(_Float32Memory), pos

    ref._encode_new_memory = encode
    saved_store = outputs.store_memory

    def store(session, features):
        return features.to(session.storage_device, non_blocking=True)

    outputs.store_memory = store

    def undo():
        del ref._encode_new_memory
        outputs.store_memory = saved_store

    return undo
