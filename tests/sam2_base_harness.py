"""Shared pieces of the SAM2Base parity tests (test_sam2_base.py, test_sam2_base_tracking.py):
the official model and ours with the same sensitive random weights, and random inputs."""

from __future__ import annotations

import copy
from typing import Dict, Sequence

import torch

import sam2  # noqa: F401  (initialises Hydra's config module)
from hydra import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf
from support import sensitize_

from sam2_fast.config import apply_overrides, resolve_config
from sam2_fast.modeling.sam2_base import SAM2Base

TOL = 1e-4
SIZE = 128  # image side: 8x8 memory tokens, 32x32 low-res masks
_LETTER = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}


def _yaml(preset: str) -> str:
    ver, size = preset.split("_hiera_")
    return f"configs/{ver}/{ver}_hiera_{_LETTER[size]}.yaml"


def build_reference(preset: str, overrides: Sequence[str]):
    c = compose(config_name=_yaml(preset), overrides=list(overrides))
    OmegaConf.resolve(c)
    return instantiate(c.model, _recursive_=True)


def _fp32_memory(ref) -> None:
    """The official model concatenates bf16 memories as they are and fails in fp32 when no
    object pointer promotes them; feed its memory attention fp32 (exact upcast) instead."""
    inner = ref.memory_attention.forward

    def forward(*args, **kwargs):
        kwargs["memory"] = kwargs["memory"].float()
        return inner(*args, **kwargs)

    ref.memory_attention.forward = forward


def build_models(preset: str = "sam2.1_hiera_tiny", extra: Sequence[str] = (), seed: int = 0,
                 obj_score_bias: float = 1.0):
    """(reference, ours, hybrid): ours is built from our config and modules alone; hybrid is
    our SAM2Base around (unpatched copies of) the reference submodules, which isolates the
    tracking logic of this file from the numerics of the submodules."""
    overrides = [f"++model.image_size={SIZE}", *extra]
    torch.manual_seed(seed)  # buffers such as the prompt encoder's random Fourier matrix
    ref = build_reference(preset, overrides).eval()
    sensitize_(ref, seed, obj_score_bias=obj_score_bias)
    cfg = apply_overrides(resolve_config(preset), overrides)
    ours = SAM2Base(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    parts = {name: copy.deepcopy(getattr(ref, name)) for name in
             ("image_encoder", "memory_attention", "memory_encoder", "sam_prompt_encoder", "sam_mask_decoder")}
    hybrid = SAM2Base(cfg, **parts).eval()
    hybrid.load_state_dict(ref.state_dict(), strict=True)
    _fp32_memory(ref)
    return ref, ours, hybrid


# ----------------------------------------------------------------------------- inputs
def random_frame(gen: torch.Generator, batch: int):
    """Backbone outputs as _prepare_backbone_features gives them (after conv_s0 / conv_s1)."""
    sides, chans = (SIZE // 4, SIZE // 8, SIZE // 16), (32, 64, 256)
    feats = [torch.randn(s * s, batch, c, generator=gen) for s, c in zip(sides, chans)]
    pos = [torch.randn(s * s, batch, 256, generator=gen) for s in sides]
    return feats, pos, [(s, s) for s in sides]


def random_points(gen: torch.Generator, batch: int, n: int) -> Dict[str, torch.Tensor]:
    coords = torch.rand(batch, n, 2, generator=gen) * (SIZE - 1)
    labels = torch.randint(0, 2, (batch, n), generator=gen, dtype=torch.int32)
    labels[:, 0] = 1
    return {"point_coords": coords, "point_labels": labels}


def random_mask(gen: torch.Generator, batch: int) -> torch.Tensor:
    blob = torch.rand(batch, 1, SIZE // 16, SIZE // 16, generator=gen)
    return torch.nn.functional.interpolate(blob, size=(SIZE, SIZE), mode="bilinear") > 0.6
