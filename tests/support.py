"""Shared helpers for the parity tests: errors and diff reports.

The sensitive weight recipe lives in ``sam2_fast.utils.random_weights`` (benchmarks use it
too) and is re-exported here.
"""

from __future__ import annotations

import torch

from sam2_fast.utils.random_weights import sensitize_  # noqa: F401  (re-export)


# Tolerance for an output a faithful fp32 run reproduces bit for bit (measured 0): ten fp32
# roundings (10 * 2^-24 = 6.0e-7), so a reordered sum still passes but a real change does not.
EXACT_TOL = 10 * 2.0**-24


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| in float64 (0 when both are all zeros)."""
    ours = torch.as_tensor(ours).detach().double().cpu()
    ref = torch.as_tensor(ref).detach().double().cpu()
    assert ours.shape == ref.shape, f"shape mismatch: ours {tuple(ours.shape)} vs ref {tuple(ref.shape)}"
    den = ref.norm().item()
    num = (ours - ref).norm().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def describe_diff(ours: torch.Tensor, ref: torch.Tensor, name: str = "tensor", top: int = 5) -> str:
    """Where two tensors differ: relative error, max abs error and the worst indices."""
    ours = torch.as_tensor(ours).detach().double().cpu()
    ref = torch.as_tensor(ref).detach().double().cpu()
    if ours.shape != ref.shape:
        return f"{name}: shape ours {tuple(ours.shape)} vs ref {tuple(ref.shape)}"
    diff = (ours - ref).abs()
    flat = diff.flatten()
    k = min(top, flat.numel())
    vals, idx = flat.topk(k)
    lines = [f"{name}: rel_err={rel_err(ours, ref):.3e} max_abs={flat.max().item():.3e} "
             f"|ref|max={ref.abs().max().item():.3e} shape={tuple(ref.shape)}"]
    for v, i in zip(vals.tolist(), idx.tolist()):
        where = tuple(int(t) for t in torch.unravel_index(torch.tensor(i), ref.shape))
        lines.append(f"  at {where}: ours={ours[where].item():.6g} ref={ref[where].item():.6g} |d|={v:.3e}")
    return "\n".join(lines)


def assert_close_rel(ours, ref, tol: float, name: str = "tensor") -> float:
    err = rel_err(ours, ref)
    assert err <= tol, describe_diff(ours, ref, name) + f"\n  tolerance {tol:.1e}"
    return err
