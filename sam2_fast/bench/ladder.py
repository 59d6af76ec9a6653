"""The rows of the benchmark: the reference as users run it, and our optimisation ladder.

Our ladder is cumulative: eager fp32 → bf16 → compile → + each Triton kernel →
static memory / batched objects → CUDA graphs. A row that cannot run here (needs CUDA,
or the feature does not exist yet) is reported as "n/a" with the reason; nothing is
estimated or copied from another row.

How a row switches features on (the contract with the kernel and runtime code):

* kernels: ``sam2_fast.kernels.dispatch`` names one environment variable that disables
  every kernel and one per kernel ("1" = use the PyTorch path); the dispatchers read them
  when a call is traced or run, so a row sets them before building and restores them after.
  Public names ``ENV_ALL``/``ENV_SWITCHES`` are used when present, else ``_ENV_ALL``/``_ENV_ONE``.
* runtime: ``sam2_fast.runtime.LADDER_OPTIONS`` maps "static_memory" and "cuda_graphs"
  to extra keyword arguments for ``build_sam2_video_predictor``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

# Our kernels in the order the ladder adds them (names as in sam2_fast.kernels.ENV_SWITCHES).
KERNEL_ORDER = ("window_attention", "memory_attention", "mask_upsample")
KERNEL_TITLES = {
    "window_attention": "+ Hiera windowed-attention kernel",
    "memory_attention": "+ memory cross-attention kernel",
    "mask_upsample": "+ fused mask-upsampling kernel",
}


@dataclass
class RowSpec:
    key: str
    impl: str  # "ours" | "reference"
    title: str
    autocast: Optional[torch.dtype] = None  # bf16 autocast as the reference's benchmark.py
    tf32: bool = False
    vos_optimized: bool = False
    compiles: bool = False  # slow to warm up (torch.compile)
    slow_on_cpu: bool = False  # e.g. bf16 autocast, emulated and slower than fp32 on most CPUs
    needs_cuda: bool = False
    env: Dict[str, str] = field(default_factory=dict)
    build_kwargs: Dict[str, object] = field(default_factory=dict)
    check: Optional[Callable[[], Optional[str]]] = None  # -> reason it cannot run, or None
    golden: bool = False  # the fp32 reference every row's accuracy is measured against


def _kernel_switches() -> Optional[tuple]:
    """(variable disabling all kernels, {kernel: variable disabling it}) or None."""
    try:
        mod = importlib.import_module("sam2_fast.kernels.dispatch")
    except Exception:  # noqa: BLE001 - no kernels here: the kernel rows say so
        return None
    every = getattr(mod, "ENV_ALL", getattr(mod, "_ENV_ALL", None))
    one = getattr(mod, "ENV_SWITCHES", getattr(mod, "_ENV_ONE", None))
    if not every or not isinstance(one, dict):
        return None
    return every, dict(one)


def _runtime_options() -> Dict[str, dict]:
    try:
        mod = importlib.import_module("sam2_fast.runtime")
    except Exception:  # noqa: BLE001
        return {}
    opts = getattr(mod, "LADDER_OPTIONS", None)
    return opts if isinstance(opts, dict) else {}


def reference_rows(device: torch.device) -> List[RowSpec]:
    cuda = device.type == "cuda"
    return [
        RowSpec("ref-eager-fp32", "reference", "reference eager fp32", golden=True),
        RowSpec("ref-bf16", "reference", "reference eager, bf16 autocast + TF32 (benchmark.py way)",
                autocast=torch.bfloat16, tf32=cuda, slow_on_cpu=True),
        RowSpec("ref-vos", "reference", "reference vos_optimized=True (max-autotune compile), bf16 + TF32",
                autocast=torch.bfloat16, tf32=True, vos_optimized=True, compiles=True, needs_cuda=True),
    ]


def our_rows(device: torch.device) -> List[RowSpec]:
    cuda = device.type == "cuda"
    switches = _kernel_switches()
    runtime = _runtime_options()
    # Values are "disable" flags: "1" sends that kernel's calls to the PyTorch path.
    all_off: Dict[str, str] = {switches[0]: "1"} if switches else {}

    def no_switches() -> Optional[str]:
        return None if switches else "sam2_fast.kernels.dispatch names no kernel switches (ENV_ALL/ENV_SWITCHES)"

    rows = [
        RowSpec("eager-fp32", "ours", "ours eager fp32", env=dict(all_off)),
        RowSpec("bf16", "ours", "ours eager, bf16 autocast + TF32", autocast=torch.bfloat16, tf32=cuda,
                slow_on_cpu=True, env=dict(all_off)),
        RowSpec("compile", "ours", "ours compiled (vos_optimized=True), kernels off", autocast=torch.bfloat16,
                tf32=cuda, vos_optimized=True, compiles=True, env=dict(all_off)),
    ]
    added: List[str] = []
    for name in KERNEL_ORDER:
        added.append(name)
        env: Dict[str, str] = {}
        if switches:
            env[switches[0]] = "0"
            for kname, var in switches[1].items():
                env[var] = "0" if kname in added else "1"

        def check(name=name) -> Optional[str]:
            if not switches:
                return no_switches()
            if name not in switches[1]:
                return f"kernel {name!r} has no switch in sam2_fast.kernels.dispatch yet"
            return None

        rows.append(RowSpec(f"k-{name}", "ours", KERNEL_TITLES[name], autocast=torch.bfloat16, tf32=True,
                            vos_optimized=True, compiles=True, needs_cuda=True, env=env, check=check))
    kernels_on = {switches[0]: "0", **{v: "0" for v in switches[1].values()}} if switches else {}
    static_kw = dict(runtime.get("static_memory", {}))
    rows.append(RowSpec("static-batched", "ours", "+ static memory slots / batched objects", autocast=torch.bfloat16,
                        tf32=True, vos_optimized=True, compiles=True, needs_cuda=True, env=kernels_on,
                        build_kwargs=static_kw,
                        check=lambda: None if "static_memory" in runtime else
                        "not implemented yet (sam2_fast.runtime.LADDER_OPTIONS has no 'static_memory')"))
    graph_kw = {**static_kw, **dict(runtime.get("cuda_graphs", {}))}
    rows.append(RowSpec("cuda-graphs", "ours", "+ CUDA graphs", autocast=torch.bfloat16, tf32=True,
                        vos_optimized=True, compiles=True, needs_cuda=True, env=kernels_on, build_kwargs=graph_kw,
                        check=lambda: None if "cuda_graphs" in runtime else
                        "not implemented yet (sam2_fast.runtime.LADDER_OPTIONS has no 'cuda_graphs')"))
    return rows


def select_rows(device: torch.device, ladder: str, reference: str) -> List[tuple]:
    """Rows to report, each with the reason it is skipped (None = run it).

    ``ladder``/``reference``: "auto" (everything that fits the device; compiling rows are
    skipped on CPU, where inductor's compile takes minutes on a small machine),
    "all", "none", or a comma list of row keys (a named row is run even if slow).
    """
    out = []
    for rows, choice in ((reference_rows(device), reference), (our_rows(device), ladder)):
        keys = {k.strip() for k in choice.split(",")} if choice not in ("auto", "all", "none") else set()
        unknown = keys - {r.key for r in rows}
        if unknown:
            raise ValueError(f"unknown row(s) {sorted(unknown)}; known: {[r.key for r in rows]}")
        for row in rows:
            if choice == "none" or (keys and row.key not in keys):
                continue
            reason = None
            if row.needs_cuda and device.type != "cuda":
                reason = "needs CUDA"
            elif row.check is not None:
                reason = row.check()
            elif row.compiles and device.type != "cuda" and choice == "auto":
                reason = "skipped on CPU by default (slow inductor compile); name it in --ladder to run"
            elif row.slow_on_cpu and device.type != "cuda" and choice == "auto":
                reason = "skipped on CPU by default (bf16 is emulated, slower than fp32); name it to run"
            out.append((row, reason))
    return out
