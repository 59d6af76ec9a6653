"""Small building blocks shared by the SAM 2 modules."""

from __future__ import annotations

from typing import Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn


def seq_to_map(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(H*W, B, C) -> (B, C, H, W); a view whenever the strides allow it."""
    return x.permute(1, 2, 0).reshape(x.size(1), x.size(2), *size)


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without stalling the host: on CUDA through pinned
    memory with ``non_blocking`` (a copy from pageable memory may wait for the stream, i.e.
    a sync on every tracked frame); plain ``.to`` elsewhere, while compiling or capturing."""
    if (device.type != "cuda" or torch.compiler.is_compiling()
            or torch.cuda.is_current_stream_capturing()):
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def activation(name: str) -> Type[nn.Module]:
    """The activation module class named in a config ("relu" / "gelu")."""
    table = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(table)}")
    return table[name]


class MLP(nn.Module):
    """``num_layers`` linear layers (state-dict keys ``layers.{i}``), activation between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int,
                 activation: Type[nn.Module] = nn.ReLU, sigmoid_output: bool = False) -> None:
        super().__init__()
        widths = [input_dim, *([hidden_dim] * (num_layers - 1)), output_dim]
        self.layers = nn.ModuleList(nn.Linear(widths[i], widths[i + 1]) for i in range(num_layers))
        self.num_layers, self.sigmoid_output = num_layers, sigmoid_output
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i != last:
                x = self.act(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class LayerNorm2d(nn.LayerNorm):
    """Channel LayerNorm of a (B, C, H, W) map; parameters ``weight`` / ``bias`` of shape (C,)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last view so the fused layer_norm kernel normalises over C
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)
