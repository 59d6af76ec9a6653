"""What the fast runtime turns on, in one place, each choice with the reason for it.

:func:`runtime_settings` is the single source of the runtime's knobs: the dtype policy,
the ``torch.compile`` arguments per component, the inductor config values and whether
CUDA graphs and the static memory bank are used. ``enable_fast_runtime`` only applies
what this returns, and records it, so a benchmark can print exactly what ran.

Dtype policy
    CUDA: bfloat16 autocast around the per-frame work (image encoder, track step, memory
    encoder) with TF32 for the fp32 matmuls left outside autocast. bf16 keeps fp32's
    exponent range, so no loss scaling or overflow guards are needed (fp16 would).
    CPU: float32 and eager. bf16 matmuls are slow on most CPUs and CPU runs exist for
    parity checks, where fp32 is the point. Either can be overridden (``dtype=...``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

# Dynamo's recompile limit while the runtime is on (see runtime_settings for why).
RECOMPILE_LIMIT = 64

# The components compiled, in the order they run on a tracked frame.
COMPILED_PARTS: Tuple[str, ...] = ("image_encoder", "memory_attention", "mask_decoder", "memory_encoder")


@dataclasses.dataclass(frozen=True)
class RuntimeSettings:
    """Resolved runtime choices for one device. ``reasons`` explains every entry."""

    device_type: str
    dtype: torch.dtype  # compute dtype of the autocast regions (float32: no autocast)
    allow_tf32: bool
    compile: bool
    cuda_graphs: bool
    static_bank: bool
    extra_cond_frames: int  # conditioning frames the static bank holds beyond the first
    compile_kwargs: Mapping[str, Mapping[str, Any]]  # component -> torch.compile kwargs
    inductor_config: Mapping[str, Any]  # dotted torch._inductor.config name -> value
    dynamo_config: Mapping[str, Any]  # torch._dynamo.config name -> value
    reasons: Mapping[str, str]

    @property
    def autocast(self) -> bool:
        return self.dtype != torch.float32

    def as_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["dtype"] = str(self.dtype).replace("torch.", "")
        return out


def _default_dtype(device_type: str) -> Tuple[torch.dtype, str]:
    if device_type != "cuda":
        return torch.float32, "CPU: fp32 (bf16 matmuls are slow on CPU; CPU runs are parity runs)"
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float32, "this GPU has no bf16 tensor cores; fp16 would need overflow guards"
    return torch.bfloat16, "bf16 autocast: 2x tensor-core rate and half the bytes, fp32 exponent range"


def runtime_settings(device: "torch.device | str", *, dtype: Optional[torch.dtype] = None,
                     compile: Optional[bool] = None, cuda_graphs: Optional[bool] = None,
                     static_bank: Optional[bool] = None, compile_backend: Optional[str] = None,
                     compile_mode: Optional[str] = None, extra_cond_frames: int = 2) -> RuntimeSettings:
    """The runtime configuration for ``device``; ``None`` arguments take the device default.

    Defaults: CUDA -> bf16, compile, CUDA graphs, static bank; CPU -> fp32 eager with the
    static bank (exact, and it keeps CPU parity runs on the code path the GPU runs).
    """
    device_type = torch.device(device).type
    on_cuda = device_type == "cuda"
    reasons: Dict[str, str] = {}

    if dtype is None:
        dtype, reasons["dtype"] = _default_dtype(device_type)
    else:
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        reasons["dtype"] = "requested by the caller"

    # TF32 only under the fast (reduced-precision) policy: an fp32 run asked for parity
    allow_tf32 = on_cuda and dtype != torch.float32
    reasons["allow_tf32"] = ("fp32 matmuls outside autocast (RoPE, pointer MLPs) use tensor cores"
                             if allow_tf32 else "off: fp32 parity run or no CUDA")

    if compile is None:
        compile = on_cuda
        reasons["compile"] = "default on CUDA" if on_cuda else "CPU: eager unless asked (compile time > gain)"
    else:
        reasons["compile"] = "requested by the caller"

    if cuda_graphs is None:
        cuda_graphs = on_cuda
        reasons["cuda_graphs"] = ("default on CUDA: one replay per step instead of ~1000 launches"
                                  if on_cuda else "CUDA graphs need a CUDA device")
    elif cuda_graphs and not on_cuda:
        raise ValueError("cuda_graphs=True needs a CUDA device; the predictor is on " + device_type)
    else:
        reasons["cuda_graphs"] = "requested by the caller"

    if static_bank is None:
        static_bank = True
        reasons["static_bank"] = ("fixed-shape memory attention: no recompiles, capturable in a graph; "
                                  "exact (masked keys weigh exp(-inf) = 0)")
    else:
        reasons["static_bank"] = "requested by the caller"
    if cuda_graphs and not static_bank:
        raise ValueError("cuda_graphs=True needs static_bank=True (memory length changes every frame)")
    if extra_cond_frames < 0:
        raise ValueError(f"extra_cond_frames must be >= 0, got {extra_cond_frames}")
    reasons["extra_cond_frames"] = ("a second capacity bucket for up to 1 + extra conditioning frames; "
                                    "more fall back to the plain module")

    backend = compile_backend or "inductor"
    mode: Optional[str]
    if compile_mode is not None:
        if cuda_graphs and compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"compile_mode={compile_mode!r} adds inductor's own CUDA graphs; with "
                             "cuda_graphs=True use 'max-autotune-no-cudagraphs' or 'default'")
        mode = compile_mode
        reasons["compile.mode"] = "requested by the caller"
    elif on_cuda and backend == "inductor":
        # our own CUDA graphs (graphs.py) capture whole steps; inductor's would nest inside them
        mode = "max-autotune-no-cudagraphs"
        reasons["compile.mode"] = "autotuned GEMM/conv templates; no inductor cudagraphs (graphs.py captures)"
    else:
        mode = None
        reasons["compile.mode"] = "default mode: autotuning has nothing to pick from on CPU"
    base: Dict[str, Any] = {"backend": backend, "fullgraph": True, "dynamic": False}
    if mode is not None and mode != "default":
        base["mode"] = mode
    reasons["compile.fullgraph"] = "a graph break would silently split a step and hide a regression"
    reasons["compile.dynamic"] = "every compiled step sees one shape (batch 1 at image_size, fixed bank)"
    compile_kwargs = {part: dict(base) for part in COMPILED_PARTS}

    inductor: Dict[str, Any] = {}
    if compile and on_cuda and backend == "inductor":
        inductor = {
            # as gpt-fast: tune block sizes of pointwise/reduction kernels past the heuristics
            "coordinate_descent_tuning": True,
            # Hiera's and the memory encoder's 1x1 convs become GEMMs (no im2col, better tiles)
            "conv_1x1_as_mm": True,
            # pad GEMM dims to tensor-core multiples (odd widths in the heads)
            "shape_padding": True,
            # second process start reuses compiled graphs from disk
            "fx_graph_cache": True,
            # kernel names in profiles say which ops they fused
            "triton.unique_kernel_names": True,
        }
        reasons["inductor_config"] = "gpt-fast's knobs plus 1x1-conv-as-GEMM for the convolutional parts"
    else:
        reasons["inductor_config"] = "unchanged (no inductor on CUDA)"

    dynamo: Dict[str, Any] = {}
    if compile:
        # One compiled function sees (object buckets) x (bank buckets) shapes, plus one entry
        # per predictor built: a worker tracking videos of 1, 2, 3, 5 and 9 objects reached 9
        # memory-attention graphs, past dynamo's default limit of 8, where fullgraph=True
        # raises FailOnRecompileLimitHit mid-video (measured on CPU). 64 covers 64 objects
        # (8 buckets x 2 bank buckets) on several predictors.
        dynamo = {"recompile_limit": RECOMPILE_LIMIT}
        reasons["dynamo_config"] = (f"recompile_limit {RECOMPILE_LIMIT}: the bucket grid outgrows the default 8, "
                                    "and fullgraph=True fails hard at the limit")
    else:
        reasons["dynamo_config"] = "unchanged (no compile)"

    return RuntimeSettings(
        device_type=device_type, dtype=dtype, allow_tf32=allow_tf32, compile=bool(compile),
        cuda_graphs=bool(cuda_graphs), static_bank=bool(static_bank),
        extra_cond_frames=int(extra_cond_frames), compile_kwargs=compile_kwargs,
        inductor_config=inductor, dynamo_config=dynamo, reasons=reasons)


def apply_inductor_config(knobs: Mapping[str, Any]) -> Dict[str, Any]:
    """Set inductor config values that exist in this torch; returns {name: previous value}.

    Unknown names are skipped (they move between torch releases) rather than failing.
    """
    import torch._inductor.config as cfg

    return apply_config(cfg, knobs)


def apply_dynamo_config(knobs: Mapping[str, Any]) -> Dict[str, Any]:
    """As :func:`apply_inductor_config`, for ``torch._dynamo.config``."""
    import torch._dynamo.config as cfg

    return apply_config(cfg, knobs)


def apply_config(cfg: Any, knobs: Mapping[str, Any]) -> Dict[str, Any]:
    if not knobs:
        return {}
    previous: Dict[str, Any] = {}
    for dotted, value in knobs.items():
        *path, leaf = dotted.split(".")
        owner: Any = cfg
        for part in path:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, leaf):
            continue
        previous[dotted] = getattr(owner, leaf)
        setattr(owner, leaf, value)
    return previous
