"""Launch shapes of the window kernel for large image batches (issue 8, item 5), checked on
the real Hiera trunks run on the meta device: every block's launch grid fits CUDA's limits."""

from __future__ import annotations

import types

import pytest
import torch

from sam2_fast.config import PRESETS
from sam2_fast.kernels import window_attention as wa
from sam2_fast.modeling import kernel_gate
from sam2_fast.modeling.hiera import Hiera


def _grids(monkeypatch, preset: str, batch: int, image_size: int = 1024):
    grids = []

    def reason(qkv, bias, heads, window, pool):
        return None

    def attention(qkv, bias, heads, window, pool):
        b, h, w, c3 = qkv.shape
        g = wa.window_geometry(h, w, window, pool)
        n_q = g["wqw"][0] * g["wqw"][1]
        cfg = wa.pick_config(n_q, (c3 // 3) // heads, torch.bfloat16)
        grids.append(wa.launch_grid(b, g["n_win_y"] * g["n_win_x"], heads, n_q, cfg))
        return qkv.new_empty(wa.output_shape(qkv, window, pool))

    fake = types.SimpleNamespace(window_attention_reason=reason, window_attention=attention)
    monkeypatch.setattr(kernel_gate, "kernel_enabled", lambda kernel, device_type: kernel == "window_attention")
    monkeypatch.setattr(kernel_gate, "dispatch", lambda: fake)
    cfg = PRESETS[preset]
    with torch.device("meta"):
        trunk = Hiera(cfg.trunk)
        trunk(torch.empty(batch, 3, image_size, image_size))
    return grids


def check_grids_fit(grids) -> None:
    """Every launch grid within CUDA's limits, on a batch large enough to have overflowed
    axis 1 with the old order (the product's own guard raises first; this check is what a
    launcher without the guard, such as the old one, runs into)."""
    assert grids, "no block reached the window kernel"
    over = [g for g in grids if any(n > m for n, m in zip(g, wa.MAX_GRID))]
    assert not over, f"{len(over)} of {len(grids)} launch grids exceed the CUDA limits {wa.MAX_GRID[:2]}: {over[:3]}"
    assert max(g[0] for g in grids) > 65535  # the case that failed on axis 1 before


@pytest.mark.parametrize("preset,batch", [("sam2.1_hiera_tiny", 32), ("sam2.1_hiera_large", 16)])
def test_large_image_batches_fit_the_grid(monkeypatch, preset, batch):
    check_grids_fit(_grids(monkeypatch, preset, batch))


def test_mutation_old_axis_order_fails(monkeypatch):
    """Plant the old launcher in the product: (query blocks, batch x windows x heads), built
    inline with no guard (CUDA refused the launch). The tiny batch of 32 fails the check."""
    def old_grid(b, n_win, heads, n_q, cfg):
        return (-(-n_q // cfg.block_m), b * n_win * heads)

    monkeypatch.setattr(wa, "launch_grid", old_grid)
    with pytest.raises(AssertionError, match="exceed the CUDA limits"):
        check_grids_fit(_grids(monkeypatch, "sam2.1_hiera_tiny", 32))
