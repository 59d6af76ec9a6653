"""The physical floor: FLOPs per stage and the card's measured matrix rate.

``torch.utils.flop_counter.FlopCounterMode`` knows the CUDA attention ops but not every
variant (on CPU it missed ``_scaled_dot_product_flash_attention_for_cpu`` and counted 55 of
memory attention's 606 GFLOP), so :func:`flop_counter` adds a formula for each attention
op the installed torch has and the counter lacks. Only the two matrix products of
attention are counted (2·L·S·E for QKᵀ plus 2·L·S·Ev for PV per batch·head), the same
convention the counter uses for its own attention ops.
"""

from __future__ import annotations

import time
from typing import Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, flop_registry

aten = torch.ops.aten

# Attention ops whose first three arguments are (query, key, value) as (B, H, L, E).
_ATTENTION_OPS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)


def attention_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """Matrix FLOPs of softmax(QKᵀ)V for (..., L, E) queries and (..., S, E/Ev) keys/values."""
    *batch_q, seq_q, dim_qk = q_shape
    *batch_k, seq_k, _ = k_shape
    dim_v = v_shape[-1]
    batch = 1
    # Grouped/broadcast heads: the query's batch dims decide how many products run.
    for d in batch_q:
        batch *= int(d)
    return 2 * batch * int(seq_q) * int(seq_k) * (int(dim_qk) + int(dim_v))


def missing_attention_ops() -> Dict[object, object]:
    extra = {}
    for name in _ATTENTION_OPS:
        op = getattr(aten, name, None)
        if op is None:
            continue
        if op in flop_registry or getattr(op, "default", None) in flop_registry:
            continue
        extra[op] = attention_flops
    return extra


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts the attention variants it would miss."""
    return FlopCounterMode(display=False, custom_mapping=missing_attention_ops())


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (broadcast dims, stride 0, count once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


class ByteCounter(TorchDispatchMode):
    """Bytes each non-view aten op reads and writes: its tensor inputs plus its outputs
    (an in-place or ``out=`` destination counts as read and written).

    What an unfused eager run moves through memory at op boundaries (a fused kernel that
    keeps intermediates on chip moves less); views, reshapes and metadata ops move nothing
    and are skipped. Works under ``FakeTensorMode`` (no data needed). ``total`` in bytes,
    ``by_op`` per aten overload name.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.by_op: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (func.is_view or func in _METADATA_OPS):
            moved = sum(_distinct_bytes(t) for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))
            self.total += moved
            name = str(func.overloadpacket.__name__)
            self.by_op[name] = self.by_op.get(name, 0) + moved
        return out


# ops that allocate or alias without moving data (empty buffers are written by the next op)
_METADATA_OPS = {aten.detach.default, aten.empty.memory_format, aten.empty_strided.default,
                 aten.lift_fresh.default}


def measure_matmul_tflops(device: torch.device, dtype: Optional[torch.dtype] = None, trials: int = 5) -> Dict[str, float]:
    """Measured dense matrix-product rate: bf16 8192³ on CUDA, fp32 1024³ on CPU.

    The best of ``trials`` timings is kept: the floor is what the card can do, so a trial
    slowed by a neighbour or a clock ramp must not lower it. Inputs are random (zeros run
    faster on some cards and would flatter the floor).
    """
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    n, reps = (8192, 10) if cuda else (1024, 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):  # warm-up: library handles, thread pools, clocks
        a @ b
    best = float("inf")
    for _ in range(trials):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                a @ b
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3 / reps
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            seconds = (time.perf_counter() - t0) / reps
        best = min(best, seconds)
    return {"tflops": 2 * n**3 / best / 1e12, "dtype": str(dtype).replace("torch.", ""), "n": n, "trials": trials}


def floor_rows(stage_flops: Dict[str, float], stage_ms: Dict[str, float], rate_tflops: float) -> Dict[str, Dict[str, float]]:
    """Per stage: GFLOP per frame, floor ms at the measured rate, achieved TFLOP/s, % of floor."""
    out: Dict[str, Dict[str, float]] = {}
    for name, flops in stage_flops.items():
        ms = stage_ms.get(name)
        floor_ms = flops / (rate_tflops * 1e12) * 1e3 if rate_tflops > 0 else float("nan")
        row = {"gflop": flops / 1e9, "floor_ms": floor_ms}
        if ms:
            row["ms"] = ms
            row["tflops"] = flops / (ms / 1e3) / 1e12
            row["pct_floor"] = 100.0 * floor_ms / ms
        out[name] = row
    return out
