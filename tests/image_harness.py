"""Build the reference and our image models with identical sensitive random weights."""

from __future__ import annotations

import functools

import numpy as np
import torch

from support import sensitize_

SMALL = 128  # image_size of the fast parity tests (a multiple of 32; windows become ragged)


def overrides(image_size: int) -> list:
    return [f"++model.image_size={image_size}"]


def build_pair(config: str, image_size: int = SMALL, seed: int = 0, apply_postprocessing: bool = True):
    """(reference model, our model) in fp32 on the CPU with the same weights."""
    from sam2.build_sam import build_sam2 as ref_build

    from sam2_fast.build_sam import build_sam2
    from sam2_fast.checkpoint import load_checkpoint

    torch.manual_seed(seed)
    ref = ref_build(config, None, device="cpu", hydra_overrides_extra=overrides(image_size),
                    apply_postprocessing=apply_postprocessing)
    sensitize_(ref, seed=seed)
    ours = build_sam2(config, None, device="cpu", hydra_overrides_extra=overrides(image_size),
                      apply_postprocessing=apply_postprocessing)
    load_checkpoint(ours, ref.state_dict())
    return ref.eval(), ours.eval()


@functools.lru_cache(maxsize=4)
def cached_pair(config: str, image_size: int = SMALL, seed: int = 0):
    return build_pair(config, image_size, seed)


def ref_image_predictor(model, **kwargs):
    from sam2.sam2_image_predictor import SAM2ImagePredictor as RefPredictor

    pred = RefPredictor(model, **kwargs)
    s = model.image_size
    # the reference hard-codes the backbone sizes of a 1024 input
    pred._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return pred


def random_image(h: int, w: int, seed: int) -> np.ndarray:
    """A textured RGB image (smooth blobs plus noise) so features are not degenerate."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.float64)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.4) * min(h, w)
        color = rng.uniform(0, 255, 3)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * color
    img += rng.normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)
