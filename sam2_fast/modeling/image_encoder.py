"""SAM 2 image encoder: Hiera trunk + FPN neck, with sine position encodings per level.

``ImageEncoder.forward`` returns the dictionary the SAM2Base code reads:
``vision_features`` (lowest kept resolution, (B, d_model, S/16, S/16)), ``vision_pos_enc`` and
``backbone_fpn`` (lists, highest resolution first, ``scalp`` lowest levels removed).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SAM2Config
from .hiera import Hiera
from .position_encoding import PositionEmbeddingSine


class _Lateral(nn.Module):
    """One 1x1 lateral convolution; the wrapper only exists for the ``convs.N.conv`` key."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FpnNeck(nn.Module):
    """Feature pyramid without output convs.

    ``backbone_channel_list`` lists the trunk channels lowest resolution first, and
    ``convs[j]`` belongs to that j-th entry. Levels are numbered highest resolution first
    (level i uses ``convs[n - i]``). Only levels in ``fpn_top_down_levels`` receive the
    upsampled (x2) coarser result; the others keep their lateral features.
    """

    def __init__(self, position_encoding: nn.Module, d_model: int, backbone_channel_list: Sequence[int],
                 fpn_interp_model: str = "bilinear", fuse_type: str = "sum",
                 fpn_top_down_levels: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"FpnNeck: fuse_type must be 'sum' or 'avg', got {fuse_type!r}")
        self.position_encoding = position_encoding
        self.d_model = d_model
        self.backbone_channel_list = list(backbone_channel_list)
        self.convs = nn.ModuleList(_Lateral(c, d_model) for c in self.backbone_channel_list)
        self.fpn_interp_model = fpn_interp_model
        self.fuse_type = fuse_type
        levels = range(len(self.convs)) if fpn_top_down_levels is None else fpn_top_down_levels
        self.fpn_top_down_levels = list(levels)

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        # float32 like the official neck, so a bf16 trunk still fuses levels in fp32
        corners = None if self.fpn_interp_model == "nearest" else False
        return F.interpolate(x.float(), scale_factor=2.0, mode=self.fpn_interp_model,
                             align_corners=corners, antialias=False)

    def forward(self, xs: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Trunk maps (highest resolution first) -> (features, position encodings), same order."""
        n = len(self.convs)
        if len(xs) != n:
            raise ValueError(f"FpnNeck expects {n} trunk levels, got {len(xs)}")
        feats: List[Optional[torch.Tensor]] = [None] * n
        coarser: Optional[torch.Tensor] = None
        for level in reversed(range(n)):  # coarse to fine
            lateral = self.convs[n - 1 - level](xs[level])  # (B, d_model, H_l, W_l)
            if coarser is not None and level in self.fpn_top_down_levels:
                fused = lateral + self._upsample(coarser)
                coarser = fused / 2 if self.fuse_type == "avg" else fused
            else:
                coarser = lateral
            feats[level] = coarser
        pos = [self.position_encoding(f).to(f.dtype) for f in feats]
        return feats, pos


class ImageEncoder(nn.Module):
    """Trunk + neck; drops the ``scalp`` lowest-resolution levels from the outputs."""

    def __init__(self, trunk: nn.Module, neck: FpnNeck, scalp: int = 0) -> None:
        super().__init__()
        trunk_channels = list(trunk.channel_list)
        if trunk_channels != list(neck.backbone_channel_list):
            raise ValueError(
                f"ImageEncoder: trunk channels {trunk_channels} do not match the neck's "
                f"backbone_channel_list {list(neck.backbone_channel_list)}"
            )
        if not 0 <= scalp < len(trunk_channels):
            raise ValueError(f"ImageEncoder: scalp={scalp} must be in [0, {len(trunk_channels) - 1}]")
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    def forward(self, sample: torch.Tensor) -> Dict[str, object]:
        feats, pos = self.neck(self.trunk(sample))
        if self.scalp > 0:
            feats, pos = feats[: -self.scalp], pos[: -self.scalp]
        return {"vision_features": feats[-1], "vision_pos_enc": pos, "backbone_fpn": feats}


def build_image_encoder(cfg: SAM2Config) -> ImageEncoder:
    """The image encoder described by ``cfg`` (state-dict compatible with ``image_encoder.*``)."""
    neck = FpnNeck(
        position_encoding=PositionEmbeddingSine(cfg.d_model),
        d_model=cfg.d_model,
        backbone_channel_list=cfg.backbone_channel_list,
        fpn_interp_model=cfg.fpn_interp_model,
        fpn_top_down_levels=cfg.fpn_top_down_levels,
    )
    return ImageEncoder(Hiera(cfg.trunk), neck, scalp=cfg.scalp)
