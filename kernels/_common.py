"""Small helpers shared by the kernel launchers (no Triton code here)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

# Dtypes every launcher accepts. bf16 runs on GPUs only in practice: the Triton interpreter
# computes bf16 ``tl.dot`` wrongly (measured ~1e10 relative error with triton 3.8), so the
# interpreter tests use fp32/fp16 and bf16 is left to the GPU check.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The smallest M/N/K a ``tl.dot`` tile may have on NVIDIA targets.
MIN_DOT_TILE = 16


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``.

    fp32 inputs use "ieee": the kernels promise fp32 parity with the reference (TF32 would
    give ~3e-4 relative error). 16-bit inputs ignore the setting; "ieee" is passed for them
    too so that one compiled variant exists per dtype.
    """
    return "ieee"


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_dtype(name: str, t: torch.Tensor) -> Optional[str]:
    if t.dtype not in SUPPORTED_DTYPES:
        return f"{name} has dtype {t.dtype}; supported: fp32, fp16, bf16"
    return None


def raise_if(reason: Optional[str], what: str) -> None:
    """Turn a named check's reason into a clear error."""
    if reason is not None:
        raise ValueError(f"{what}: {reason}")


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and launch settings of one compiled kernel variant."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
