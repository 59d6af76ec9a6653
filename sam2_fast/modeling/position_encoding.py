"""Fixed positional encodings: the 2-D sine table of the FPN neck / memory encoder and the
random-Fourier encoding of the prompt encoder.

Both reproduce the official float32 arithmetic operation by operation (same order of
divisions and multiplications) so that their outputs match the reference bit for bit on
the same device; the sine table is a pure function of (H, W) and is therefore cached.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine table for a (B, C, H, W) map; returns (B, num_pos_feats, H, W) float32.

    The first half of the channels encodes the row (y), the second half the column (x).
    Within a half, even channels hold ``sin(pos / t_k)`` and odd channels ``cos(pos / t_k)``
    with ``t_k = temperature ** (2 * (k // 2) / half)``. With ``normalize`` the 1-based
    positions are divided by the last position (+1e-6) and scaled to ``scale`` (2*pi).
    """

    def __init__(self, num_pos_feats: int, temperature: float = 10000, normalize: bool = True,
                 scale: Optional[float] = None) -> None:
        super().__init__()
        if num_pos_feats % 2 != 0:
            raise ValueError(f"PositionEmbeddingSine needs an even num_pos_feats, got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: a scale only makes sense with normalize=True")
        self.num_pos_feats = num_pos_feats // 2  # channels per axis (the official attribute meaning)
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        # (H, W) -> (C, H, W) table on the device it was last asked for
        self._tables: Dict[Tuple[int, int], torch.Tensor] = {}

    def _axis_code(self, length: int, device: torch.device) -> torch.Tensor:
        """(length, half) sin/cos code of the positions 1..length along one axis."""
        half = self.num_pos_feats
        pos = torch.arange(1, length + 1, dtype=torch.float32, device=device)  # (L,)
        if self.normalize:
            # the official code divides by (last position + eps) and then scales
            pos = pos / (pos[-1:] + 1e-6) * self.scale
        k = torch.arange(half, dtype=torch.float32, device=device)
        wavelength = self.temperature ** (2 * (k // 2) / half)  # (half,)
        phase = pos[:, None] / wavelength  # (L, half)
        code = torch.empty_like(phase)
        code[:, 0::2] = phase[:, 0::2].sin()
        code[:, 1::2] = phase[:, 1::2].cos()
        return code

    @torch.no_grad()
    def table(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The (num_pos_feats, H, W) encoding, cached per (H, W)."""
        if torch.compiler.is_compiling():
            # traced inline, the cache untouched: dynamo would guard on the dict's keys, and
            # the entry its first trace added made the next call recompile the whole image
            # encoder / memory encoder (inductor folds this sin/cos into the output write)
            return self._build(height, width, device)
        return self._cached(height, width, device)

    def _cached(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        key = (int(height), int(width))
        cached = self._tables.get(key)
        if cached is None or cached.device != device:
            cached = self._build(height, width, device)
            self._tables[key] = cached
        return cached

    def _build(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        half = self.num_pos_feats
        rows = self._axis_code(height, device).t()  # (half, H)
        cols = self._axis_code(width, device).t()  # (half, W)
        return torch.cat(
            (rows[:, :, None].expand(half, height, width), cols[:, None, :].expand(half, height, width)),
            dim=0,
        )  # (2*half, H, W)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"PositionEmbeddingSine expects a (B, C, H, W) map, got shape {tuple(x.shape)}")
        batch, _, height, width = x.shape
        pe = self.table(height, width, x.device)  # (C, H, W)
        # a fresh tensor: callers may modify it in place without touching the cache
        return pe.unsqueeze(0).repeat(batch, 1, 1, 1)  # (B, C, H, W)


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of 2-D coordinates (prompt encoder).

    A point p in [0, 1]^2 maps to ``[sin(2*pi*(2p-1) @ G), cos(2*pi*(2p-1) @ G)]`` with the
    fixed Gaussian matrix ``G`` (buffer ``positional_encoding_gaussian_matrix``, (2, F)).
    """

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None) -> None:
        super().__init__()
        std = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", std * torch.randn((2, num_pos_feats)))

    def _encode_unit(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) coordinates in [0, 1] (x, y order) -> (..., 2F) features."""
        centred = 2 * coords - 1
        angles = 2 * math.pi * (centred @ self.positional_encoding_gaussian_matrix)  # (..., F)
        return torch.cat((angles.sin(), angles.cos()), dim=-1)

    def forward(self, size: Tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an (h, w) grid: (2F, h, w)."""
        h, w = int(size[0]), int(size[1])
        device = self.positional_encoding_gaussian_matrix.device
        # cell centres (i + 0.5) / n, exactly the official cumsum(ones) - 0.5 values
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h  # (h,)
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w  # (w,)
        grid = torch.stack((xs[None, :].expand(h, w), ys[:, None].expand(h, w)), dim=-1)  # (h, w, 2)
        return self._encode_unit(grid).permute(2, 0, 1)  # (2F, h, w)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """Encode pixel coordinates (B, N, 2) (x, y) of an image of size (H, W): (B, N, 2F)."""
        if coords_input.shape[-1] != 2:
            raise ValueError(f"coordinates must end with a dimension of 2 (x, y), got {tuple(coords_input.shape)}")
        coords = coords_input if coords_input.is_floating_point() else coords_input.float()
        # normalise in the input dtype first, then go to float32 (as the official code does)
        unit = torch.stack((coords[..., 0] / image_size[1], coords[..., 1] / image_size[0]), dim=-1)
        return self._encode_unit(unit.to(torch.float))
