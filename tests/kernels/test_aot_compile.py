"""Ahead-of-time GPU compile of every kernel variant the launchers can pick (no GPU needed).

Run WITHOUT TRITON_INTERPRET (with it, @triton.jit gives interpreted functions):
    env -u TRITON_INTERPRET OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/kernels -m aot
and under triton 3.6 (the lent GPU machines) with scripts/triton36_venv.sh.
This catches what the interpreter lets through (mixed-dtype tl.dot, register/smem blow-ups).
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.aot,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="AOT compile needs a process without TRITON_INTERPRET"),
]

from sam2_fast.config import PRESETS  # noqa: E402
from sam2_fast.kernels import mask_upsample as mu  # noqa: E402
from sam2_fast.kernels import memory_attention as ma  # noqa: E402
from sam2_fast.kernels import window_attention as wa  # noqa: E402

# Shared memory per block each card allows (opt-in maximum), bytes.
SMEM_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
TL_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Scalar (non-pointer) float arguments of the kernels; every other scalar is an i32.
FLOAT_ARGS = {"qk_scale", "scale_h", "scale_w", "threshold"}


def _signature(fn, constexprs: dict, pointers: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def _compile(fn, constexprs, pointers, cfg, cc):
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=fn, signature=_signature(fn, constexprs, pointers),
                                    constexprs=constexprs)
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
    return kernel.metadata.shared


def _hiera_head_dims():
    dims = set()
    for cfg in PRESETS.values():
        t = cfg.trunk
        for i, c in enumerate(t.stage_dims):
            dims.add(c // int(t.num_heads * t.head_mul**i))
    return sorted(dims)


def _window_variants():
    out = []
    for dt, const, cfg in wa.all_configs(_hiera_head_dims()):
        t = TL_TYPE[dt]  # the launcher casts the bias to qkv's dtype
        ptrs = {"qkv_ptr": t, "bias_ptr": t, "out_ptr": t}
        out.append(pytest.param(wa._window_attn_kernel, const, ptrs, cfg, id=f"window-{t}-" +
                                "-".join(f"{k}{v}" for k, v in const.items() if k != "DOT_PREC")))
    return out


def _memory_variants():
    out = []
    for kind, dt, const, cfg in ma.all_configs():
        t = TL_TYPE[dt]
        if kind == "merge":
            fn, ptrs = ma._merge_splits_kernel, {"part_ptr": "fp32", "lse_ptr": "fp32", "out_ptr": t}
        else:
            fn = ma._mem_attn_kernel
            scratch, table = "fp32", "fp32"
            ptrs = {"q_ptr": t, "mk_ptr": t, "mv_ptr": t, "slot_ptr": "i32", "pk_ptr": t, "pv_ptr": t,
                    "cos_ptr": table, "sin_ptr": table, "out_ptr": t, "part_ptr": scratch,
                    "lse_ptr": scratch}
        name = f"mem-{kind}-{t}-" + "-".join(f"{k}{v}" for k, v in const.items() if k != "DOT_PREC")
        out.append(pytest.param(fn, const, ptrs, cfg, id=name))
    return out


def _upsample_variants():
    out = []
    for dt, const, cfg in mu.all_configs():
        t = TL_TYPE[dt]
        ptrs = {"x_ptr": t, "mask_ptr": "u8", "logit_ptr": t}
        out.append(pytest.param(mu._upsample_threshold_kernel, const, ptrs, cfg,
                                id=f"upsample-{t}-" + "-".join(f"{k}{v}" for k, v in const.items())))
    return out


@pytest.mark.parametrize("cc", sorted(SMEM_LIMIT))
@pytest.mark.parametrize("fn,const,ptrs,cfg", _window_variants() + _memory_variants() + _upsample_variants())
def test_compiles_within_shared_memory(fn, const, ptrs, cfg, cc):
    shared = _compile(fn, const, ptrs, cfg, cc)
    assert shared <= SMEM_LIMIT[cc], f"needs {shared} B of shared memory, sm_{cc} allows {SMEM_LIMIT[cc]}"
