"""Helpers for the kernel tests (imported by the test modules of this folder).

Run the interpreter tests as their own pytest process, with the variable set at start:
    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/kernels -m "not aot and not cuda"
and the compile check in a process without it:
    env -u TRITON_INTERPRET OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/kernels -m aot
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Interpreter tests carry ``@pytest.mark.interp`` and this skip (TRITON_INTERPRET=1 must be
# set when the process starts: triton.jit reads it when a kernel module is imported).
needs_interp = pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1 at process "
                                  "start (TRITON_INTERPRET=1 pytest tests/kernels -m 'not aot')")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def poisoned(shape, dtype) -> torch.Tensor:
    """An output buffer full of NaN, so unwritten elements show up."""
    return torch.full(shape, float("nan"), dtype=dtype)


def assert_attention_error(ours: torch.Tensor, sdpa_same_dtype: torch.Tensor, exact: torch.Tensor,
                           what: str) -> None:
    """Error against the fp64 result is at most 2x PyTorch attention's own error in our dtype."""
    assert not torch.isnan(ours).any(), f"{what}: output not fully written (NaN left)"
    e_ours, e_torch = rel(ours, exact), rel(sdpa_same_dtype, exact)
    assert e_ours <= 2.0 * max(e_torch, 1e-9), (
        f"{what}: error {e_ours:.3e} vs fp64, PyTorch's own {e_torch:.3e} (limit 2x)")


class AlignCornersScale:
    """Product mutation of the mask-upsampling launch: wraps the real kernel object and hands
    it the align_corners=True scale (h-1)/(H-1) instead of h/H, a launcher bug that samples
    like ``F.interpolate(..., align_corners=True)`` near the borders. Install with
    ``monkeypatch.setattr(mask_upsample, "_upsample_threshold_kernel", AlignCornersScale(real))``."""

    def __init__(self, real):
        self.real = real
        names = real.arg_names
        self._at = {n: names.index(n) for n in ("h", "w", "H", "W", "scale_h", "scale_w")}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            a, at = list(args), self._at
            a[at["scale_h"]] = (a[at["h"]] - 1) / max(a[at["H"]] - 1, 1)
            a[at["scale_w"]] = (a[at["w"]] - 1) / max(a[at["W"]] - 1, 1)
            return self.real[grid](*a, **kwargs)
        return launch
