"""Prompt encoder: points, boxes and mask prompts -> sparse tokens and a dense map.

Sparse prompts become one token each: the random-Fourier encoding of the (pixel-centred)
coordinate plus a learned embedding chosen by the label:

  label -1  padding point: no position at all, only ``not_a_point_embed``
  label  0  negative click      label 1  positive click
  label  2  box top-left        label 3  box bottom-right

When points come without a box, one padding point is appended (the decoder was trained
with that extra token). A mask prompt is downscaled 4x by two strided convs into a dense
map; without one, the learned ``no_mask_embed`` fills the map.
"""

from __future__ import annotations

from typing import Optional, Tuple, Type

import torch
from torch import Tensor, nn

from sam2_fast.modeling.common import LayerNorm2d
from sam2_fast.modeling.position_encoding import PositionEmbeddingRandom

_PAD_LABEL = -1
_NUM_LABELS = 4  # neg, pos, box corner 1, box corner 2


class PromptEncoder(nn.Module):
    """Keys: ``pe_layer``, ``point_embeddings.{0..3}``, ``not_a_point_embed``,
    ``mask_downscaling.{0,1,3,4,6}``, ``no_mask_embed``."""

    def __init__(self, embed_dim: int, image_embedding_size: Tuple[int, int],
                 input_image_size: Tuple[int, int], mask_in_chans: int,
                 activation: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.num_point_embeddings = _NUM_LABELS
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(_NUM_LABELS))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        h, w = self.image_embedding_size
        self.mask_input_size = (4 * h, 4 * w)  # mask prompts are given at 4x the embedding grid
        quarter = mask_in_chans // 4
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, quarter, kernel_size=2, stride=2),
            LayerNorm2d(quarter),
            activation(),
            nn.Conv2d(quarter, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> Tensor:
        """Position encoding of every embedding-grid cell: (1, embed_dim, H, W)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _label_table(self) -> Tensor:
        # row r holds the embedding added for label r - 1 (row 0: padding)
        rows = [self.not_a_point_embed.weight] + [e.weight for e in self.point_embeddings]
        return torch.cat(rows, dim=0)  # (5, C)

    def _embed_points(self, points: Tensor, labels: Tensor, pad: bool) -> Tensor:
        """points (B, N, 2) in input-image pixels (x, y); labels (B, N) -> (B, N [+1], C)."""
        coords = points + 0.5  # pixel centres
        if pad:
            b = coords.shape[0]
            coords = torch.cat([coords, coords.new_zeros(b, 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((b, 1), _PAD_LABEL)], dim=1)
        pe = self.pe_layer.forward_with_coords(coords, self.input_image_size)  # (B, N, C)
        # gather the label embedding (a gather, not a one-hot matmul, so TF32 cannot round it);
        # labels outside -1..3 keep their bare position code, as in the official model
        known = torch.arange(_PAD_LABEL, _NUM_LABELS, device=labels.device)
        in_range = (labels.unsqueeze(-1) == known).any(dim=-1, keepdim=True)  # (B, N, 1)
        rows = (labels.long() - _PAD_LABEL).clamp(0, _NUM_LABELS)  # (B, N) row of the table
        extra = self._label_table().to(pe.dtype)[rows]  # (B, N, C)
        keep_pos = (labels != _PAD_LABEL).unsqueeze(-1)
        pe = torch.where(keep_pos, pe, torch.zeros_like(pe))
        return torch.where(in_range, pe + extra, pe)

    def _embed_boxes(self, boxes: Tensor) -> Tensor:
        """boxes (B, 4) as x0, y0, x1, y1 (or (B, 2, 2)) -> two corner tokens (B, 2, C)."""
        corners = boxes.reshape(-1, 2, 2) + 0.5
        pe = self.pe_layer.forward_with_coords(corners, self.input_image_size)  # (B, 2, C)
        corner_embed = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return pe + corner_embed.to(pe.dtype)

    def _embed_masks(self, masks: Tensor) -> Tensor:
        if tuple(masks.shape[-2:]) != self.mask_input_size:
            raise ValueError(f"mask prompts must be {self.mask_input_size} (4x the embedding grid), "
                             f"got {tuple(masks.shape[-2:])}")
        return self.mask_downscaling(masks)  # (B, C, H, W)

    @staticmethod
    def _batch_size(points, boxes, masks) -> int:
        for given in (points[0] if points is not None else None, boxes, masks):
            if given is not None:
                return given.shape[0]
        return 1

    def forward(self, points: Optional[Tuple[Tensor, Tensor]], boxes: Optional[Tensor],
                masks: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Returns sparse (B, N, C) and dense (B, C, H, W) prompt embeddings."""
        bs = self._batch_size(points, boxes, masks)
        device = self.point_embeddings[0].weight.device
        tokens = [torch.empty((bs, 0, self.embed_dim), device=device)]
        if points is not None:
            coords, labels = points
            if coords.dim() != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
                raise ValueError(f"points must be (B, N, 2) with labels (B, N); got {tuple(coords.shape)} "
                                 f"and {tuple(labels.shape)}")
            tokens.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            tokens.append(self._embed_boxes(boxes))
        sparse = torch.cat(tokens, dim=1)
        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse, dense


def build_prompt_encoder(cfg) -> PromptEncoder:
    """The prompt encoder of a :class:`~sam2_fast.config.SAM2Config` (mask_in_chans=16 as in SAM)."""
    if cfg.image_size % cfg.backbone_stride != 0:
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of backbone_stride {cfg.backbone_stride}")
    grid = cfg.image_size // cfg.backbone_stride
    return PromptEncoder(embed_dim=cfg.hidden_dim, image_embedding_size=(grid, grid),
                         input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=16)
