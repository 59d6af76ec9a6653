"""``sam2.modeling.sam2_utils`` under its official path: the inference helpers code imports.

``from sam2.modeling.sam2_utils import MLP, LayerNorm2d, get_1d_sine_pe, mask_to_box,
select_closest_cond_frames`` works with ``sam2_fast`` swapped in; each name is our
implementation (same signature and result; parity in ``tests/test_drop_in_sweep.py``). The
training-only samplers of the official module (``sample_box_points``, ``get_next_point``,
...) and its building blocks (``DropPath``, ``get_clones``, ``get_activation_fn``) are not
provided: importing them fails by name (README, "Differences").
"""

from __future__ import annotations

import torch

from sam2_fast.modeling.common import LayerNorm2d, MLP
from sam2_fast.modeling.memory_select import select_closest_cond_frames, sine_pe_1d
from sam2_fast.utils.misc import mask_to_box

__all__ = ["LayerNorm2d", "MLP", "get_1d_sine_pe", "mask_to_box", "select_closest_cond_frames"]


def get_1d_sine_pe(pos_inds: torch.Tensor, dim: int, temperature: float = 10000) -> torch.Tensor:
    """Sine/cosine encoding of positions ``pos_inds`` (...,) -> (..., dim), as the official one."""
    return sine_pe_1d(pos_inds, dim, temperature)
