"""Memory encoder: fuses a frame's image features with its predicted mask into a memory.

pipeline (B = objects):
  mask logits (B, 1, S, S) -sigmoid-> MaskDownSampler -> (B, C, S/16, S/16)
  pix_feat (B, C, H, W) -pix_feat_proj(1x1)-> + mask features -> Fuser (ConvNeXt blocks)
  -> out_proj (1x1, C -> mem_dim) -> memory features, plus a sine position encoding.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sam2_fast.modeling.common import LayerNorm2d
from sam2_fast.modeling.position_encoding import PositionEmbeddingSine


class MaskDownSampler(nn.Module):
    """Strided conv -> LayerNorm2d -> activation, repeated until ``total_stride``; then 1x1 conv.

    Channels grow by ``stride**2`` per step (1 -> 4 -> 16 -> 64 -> 256 for 2x steps to 16x),
    so no information is thrown away by the downsampling. Keys: ``encoder.{i}``.
    """

    def __init__(self, embed_dim: int = 256, kernel_size: int = 4, stride: int = 4, padding: int = 0,
                 total_stride: int = 16, activation: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        steps = round(math.log(total_stride) / math.log(stride)) if stride > 1 else 0
        if stride < 2 or stride ** steps != total_stride:
            raise ValueError(f"total_stride {total_stride} is not a power of stride {stride}")
        mods: List[nn.Module] = []
        width = 1
        for _ in range(steps):
            wider = width * stride * stride
            mods += [nn.Conv2d(width, wider, kernel_size, stride=stride, padding=padding),
                     LayerNorm2d(wider), activation()]
            width = wider
        mods.append(nn.Conv2d(width, embed_dim, kernel_size=1))
        self.encoder = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)  # (B, 1, S, S) -> (B, embed_dim, S/total_stride, S/total_stride)


class CXBlock(nn.Module):
    """ConvNeXt block: depthwise conv, channel LayerNorm, 4x MLP, layer scale ``gamma``, residual.

    Keys: ``dwconv``, ``norm``, ``pwconv1``, ``pwconv2``, ``gamma`` (absent when the layer
    scale init value is 0).
    """

    def __init__(self, dim: int, kernel_size: int = 7, padding: int = 3, drop_path: float = 0.0,
                 layer_scale_init_value: float = 1e-6, use_dwconv: bool = True) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=kernel_size, padding=padding,
                                groups=dim if use_dwconv else 1)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        if layer_scale_init_value > 0:
            self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        else:
            self.gamma = None
        self.drop_path_rate = drop_path  # stochastic depth is training-only; identity here

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, H, W). Normalise and run the MLP channels-last: one permute each way.
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = F.layer_norm(y, self.norm.normalized_shape, self.norm.weight, self.norm.bias, self.norm.eps)
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = y * self.gamma
        return x + y.permute(0, 3, 1, 2)


class Fuser(nn.Module):
    """Optional 1x1 input projection (``proj``) then a stack of blocks (``layers.{i}``)."""

    def __init__(self, layer: Union[nn.Module, List[nn.Module]], num_layers: Optional[int] = None,
                 dim: Optional[int] = None, input_projection: bool = False) -> None:
        super().__init__()
        if isinstance(layer, nn.Module):
            if num_layers is None:
                raise ValueError("a prototype block needs num_layers")
            blocks = [copy.deepcopy(layer) for _ in range(num_layers)]
        else:
            blocks = list(layer)
        self.layers = nn.ModuleList(blocks)
        if input_projection:
            if dim is None:
                raise ValueError("input_projection needs dim")
            self.proj: nn.Module = nn.Conv2d(dim, dim, kernel_size=1)
        else:
            self.proj = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        for block in self.layers:
            x = block(x)
        return x


class MemoryEncoder(nn.Module):
    """Mask + image features -> memory features (B, out_dim, H, W) and their position encoding."""

    def __init__(self, out_dim: int, mask_downsampler: nn.Module, fuser: nn.Module,
                 position_encoding: nn.Module, in_dim: int = 256) -> None:
        super().__init__()
        self.mask_downsampler = mask_downsampler
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = fuser
        self.position_encoding = position_encoding
        self.out_proj: nn.Module = nn.Conv2d(in_dim, out_dim, kernel_size=1) if out_dim != in_dim else nn.Identity()
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, pix_feat: Tensor, masks: Tensor, skip_mask_sigmoid: bool = False) -> Dict[str, object]:
        """pix_feat: (B, in_dim, H, W); masks: (B, 1, 16H, 16W) logits (probabilities when
        ``skip_mask_sigmoid``). Returns {"vision_features": (B, out_dim, H, W),
        "vision_pos_enc": [(B, out_dim, H, W)]}."""
        if pix_feat.dim() != 4 or masks.dim() != 4:
            raise ValueError(f"pix_feat and masks must be 4-D (B, C, H, W); got {tuple(pix_feat.shape)} "
                             f"and {tuple(masks.shape)}")
        # mask probabilities rather than logits: closer to the binary masks seen in training
        mask_in = masks if skip_mask_sigmoid else torch.sigmoid(masks)
        mask_feat = self.mask_downsampler(mask_in)
        if mask_feat.shape[-2:] != pix_feat.shape[-2:]:
            raise ValueError(f"masks {tuple(masks.shape[-2:])} downsample to {tuple(mask_feat.shape[-2:])}, "
                             f"which does not match the image features {tuple(pix_feat.shape[-2:])}")
        pix_feat = pix_feat.to(mask_feat.device)
        if pix_feat.shape[0] > 1 and pix_feat.stride(0) == 0:
            # one frame's features expanded over objects (batched tracking): project them
            # once and broadcast, (B - 1) fewer 1x1 convolutions (0.54 GFLOP each at 1024 px),
            # and each row is exactly the batch-1 projection per-object tracking computes
            fused = self.pix_feat_proj(pix_feat[:1]) + mask_feat
        else:
            fused = self.pix_feat_proj(pix_feat) + mask_feat
        out = self.out_proj(self.fuser(fused))
        pos = self.position_encoding(out).to(out.dtype)
        return {"vision_features": out, "vision_pos_enc": [pos]}


def build_memory_encoder(cfg) -> MemoryEncoder:
    """The memory encoder of a :class:`~sam2_fast.config.SAM2Config` (official YAML values:
    3x3 stride-2 mask downsampling to the backbone stride, 7x7 depthwise CX blocks)."""
    dim = cfg.d_model
    downsampler = MaskDownSampler(embed_dim=dim, kernel_size=3, stride=2, padding=1,
                                  total_stride=cfg.backbone_stride)
    blocks = [CXBlock(dim, kernel_size=7, padding=3, layer_scale_init_value=1e-6, use_dwconv=True)
              for _ in range(cfg.fuser_layers)]
    return MemoryEncoder(out_dim=cfg.mem_dim, mask_downsampler=downsampler, fuser=Fuser(blocks),
                         position_encoding=PositionEmbeddingSine(cfg.mem_dim), in_dim=dim)
