"""Small helpers shared by the kernel launchers (no Triton code here)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional, Tuple

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


# ----------------------------------------------------------------------------- the card


@dataclass(frozen=True)
class Card:
    """What the launchers need to know about the GPU a launch runs on."""

    capability: Tuple[int, int]
    sms: int  # streaming multiprocessors; 0 off the GPU (no split-KV)


# Off the GPU (the interpreter): sm_90's tiles, no SM count.
CPU_CARD = Card((9, 0), 0)


@functools.lru_cache(maxsize=None)
def _cuda_card(index: int) -> Card:
    props = torch.cuda.get_device_properties(index)
    return Card((props.major, props.minor), props.multi_processor_count)


def card(device: torch.device) -> Card:
    """The card of ``device``, asked once per device and process (the launchers used to
    query capability and properties on every call: host time on the eager path, issue 8)."""
    if device.type != "cuda":
        return CPU_CARD
    return _cuda_card(device.index if device.index is not None else torch.cuda.current_device())


# Per-SM resources by capability (CUDA C Programming Guide, "Technical Specifications per
# Compute Capability"): shared memory per SM usable by CTAs (bytes), 32-bit registers,
# resident threads, resident CTAs. The driver reserves 1 KiB of shared memory per CTA.
SM_RESOURCES = {
    (8, 0): (167_936, 65_536, 2048, 32),
    (8, 6): (102_400, 65_536, 1536, 16),
    (8, 7): (167_936, 65_536, 1536, 16),
    (8, 9): (102_400, 65_536, 1536, 24),
    (9, 0): (233_472, 65_536, 2048, 32),
}
SMEM_RESERVED_PER_CTA = 1024
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256


def ctas_per_sm(shared: int, registers: int, num_warps: int, capability: Tuple[int, int]) -> int:
    """Resident CTAs per SM of a compiled kernel (its shared bytes and registers per thread)."""
    smem_sm, regs_sm, threads_sm, ctas_sm = SM_RESOURCES[tuple(capability)]
    warp_regs = -(-registers * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = regs_sm // max(1, warp_regs * num_warps)
    by_smem = smem_sm // (shared + SMEM_RESERVED_PER_CTA)
    return min(by_regs, by_smem, threads_sm // (32 * num_warps), ctas_sm)
