"""The rows of the benchmark: the reference as users run it, and our optimisation ladder.

Our ladder is cumulative: eager fp32 → bf16 → compile → + each Triton kernel →
static memory / batched objects → CUDA graphs. A row that cannot run here (needs CUDA,
or the feature does not exist yet) is reported as "n/a" with the reason; nothing is
estimated or copied from another row.

How a row switches features on (the contract with the kernel and runtime code):

* kernels: ``sam2_fast.kernels.dispatch`` names one environment variable that disables
  every kernel and one per kernel ("1" = use the PyTorch path); the dispatchers read them
  when a call is traced or run, so a row sets them before building and restores them after.
  Their names come from the dispatcher's public ``ENV_ALL``/``ENV_SWITCHES``.
* runtime: rows from bf16 on build our eager predictor and then call
  ``sam2_fast.runtime.enable_fast_runtime(predictor, dtype=..., compile=..., static_bank=...,
  cuda_graphs=...)`` with that row's knobs (``vos_optimized=True`` turns all of them on);
  the runtime's own ``runtime_info`` is stored with the row.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

# Our kernels in the order the ladder adds them (names as in sam2_fast.kernels.ENV_SWITCHES).
KERNEL_ORDER = ("window_attention", "memory_attention", "mask_upsample")
KERNEL_TITLES = {
    "window_attention": "+ Hiera windowed-attention kernel",
    "memory_attention": "+ memory cross-attention kernel",
    "mask_upsample": "+ fused mask-upsampling kernel",
}
# Every kernel the rows with "all kernels" turn on. connected_components gets no ladder row of
# its own: it runs only in hole filling, which the bench turns off on both sides (a compiled
# row costs minutes of a GPU lease and would measure nothing); benchmarks/kernel_candidates.py
# times it on its own.
ALL_KERNELS = KERNEL_ORDER + ("connected_components",)


@dataclass
class RowSpec:
    key: str
    impl: str  # "ours" | "reference"
    title: str
    dtype: str = "fp32"  # compute precision of the row ("fp32" rows can serve as the accuracy golden)
    autocast: Optional[torch.dtype] = None  # outside bf16 autocast, as the reference's benchmark.py
    tf32: bool = False
    vos_optimized: bool = False
    compiles: bool = False  # slow to warm up (torch.compile)
    slow_on_cpu: bool = False  # e.g. bf16 autocast, emulated and slower than fp32 on most CPUs
    needs_cuda: bool = False
    env: Dict[str, str] = field(default_factory=dict)
    build_kwargs: Dict[str, object] = field(default_factory=dict)
    runtime: Optional[Dict[str, object]] = None  # enable_fast_runtime(**runtime) after building
    check: Optional[Callable[[], Optional[str]]] = None  # -> reason it cannot run, or None
    golden: bool = False  # the fp32 reference every row's accuracy is measured against
    per_object: bool = False  # ours, one tracking step per object (as the reference), not batched


def _kernel_switches() -> Optional[tuple]:
    """(variable disabling all kernels, {kernel: variable disabling it}) or None."""
    try:
        mod = importlib.import_module("sam2_fast.kernels.dispatch")
    except Exception:  # noqa: BLE001 - no kernels here: the kernel rows say so
        return None
    every = getattr(mod, "ENV_ALL", None)
    one = getattr(mod, "ENV_SWITCHES", None)
    if not every or not isinstance(one, dict):
        return None
    return every, dict(one)


def _runtime_missing() -> Optional[str]:
    try:
        mod = importlib.import_module("sam2_fast.runtime")
    except Exception as exc:  # noqa: BLE001
        return f"sam2_fast.runtime not importable ({exc.__class__.__name__}: {exc})"
    return None if hasattr(mod, "enable_fast_runtime") else "sam2_fast.runtime has no enable_fast_runtime yet"


def reference_rows(device: torch.device) -> List[RowSpec]:
    cuda = device.type == "cuda"
    return [
        RowSpec("ref-eager-fp32", "reference", "reference eager fp32", golden=True),
        RowSpec("ref-bf16", "reference", "reference eager, bf16 autocast + TF32 (benchmark.py way)",
                dtype="bf16", autocast=torch.bfloat16, tf32=cuda, slow_on_cpu=True),
        RowSpec("ref-vos", "reference", "reference vos_optimized=True (max-autotune compile), bf16 + TF32",
                dtype="bf16", autocast=torch.bfloat16, tf32=True, vos_optimized=True, compiles=True, needs_cuda=True),
    ]


def _knobs(compile: bool, static_bank: bool = False, cuda_graphs: bool = False) -> Dict[str, object]:
    return {"dtype": torch.bfloat16, "compile": compile, "static_bank": static_bank, "cuda_graphs": cuda_graphs}


def our_rows(device: torch.device) -> List[RowSpec]:
    switches = _kernel_switches()
    runtime_missing = _runtime_missing()
    # Values are "disable" flags: "1" sends that kernel's calls to the PyTorch path.
    all_off: Dict[str, str] = {switches[0]: "1"} if switches else {}

    def kernel_env(enabled: Sequence[str]) -> Dict[str, str]:
        if not switches:
            return {}
        env = {switches[0]: "0"}
        env.update({var: ("0" if name in enabled else "1") for name, var in switches[1].items()})
        return env

    def runtime_check() -> Optional[str]:
        return runtime_missing

    rows = [
        RowSpec("eager-fp32", "ours", "ours eager fp32", env=dict(all_off)),
        RowSpec("bf16", "ours", "ours eager, runtime bf16 autocast + TF32", dtype="bf16", slow_on_cpu=True,
                env=dict(all_off), runtime=_knobs(compile=False), check=runtime_check),
        RowSpec("bf16-unbatched", "ours", "ours eager bf16, one step per object (the batching's baseline)",
                dtype="bf16", slow_on_cpu=True, env=dict(all_off), runtime=_knobs(compile=False),
                check=runtime_check, per_object=True),
        RowSpec("bf16-kernels", "ours", "ours eager bf16 + every kernel slot (selection layer picks per card)",
                dtype="bf16", needs_cuda=True, env=kernel_env(ALL_KERNELS), runtime=_knobs(compile=False),
                check=runtime_check),
        RowSpec("compile", "ours", "ours bf16 + torch.compile, kernels off", dtype="bf16", compiles=True,
                env=dict(all_off), runtime=_knobs(compile=True), check=runtime_check),
    ]
    for i, name in enumerate(KERNEL_ORDER):
        def check(name=name) -> Optional[str]:
            if runtime_missing:
                return runtime_missing
            if not switches:
                return "sam2_fast.kernels.dispatch names no kernel switches (ENV_ALL/ENV_SWITCHES)"
            if name not in switches[1]:
                return f"kernel {name!r} has no switch in sam2_fast.kernels.dispatch yet"
            return None

        rows.append(RowSpec(f"k-{name}", "ours", KERNEL_TITLES[name], dtype="bf16", compiles=True, needs_cuda=True,
                            env=kernel_env(KERNEL_ORDER[: i + 1]), runtime=_knobs(compile=True), check=check))
    every = kernel_env(ALL_KERNELS)
    rows.append(RowSpec("static-batched", "ours", "+ static memory bank (batched objects)", dtype="bf16",
                        compiles=True, needs_cuda=True, env=every, runtime=_knobs(True, static_bank=True),
                        check=runtime_check))
    rows.append(RowSpec("cuda-graphs", "ours", "+ CUDA graphs (= vos_optimized=True)", dtype="bf16", compiles=True,
                        needs_cuda=True, env=every, runtime=_knobs(True, static_bank=True, cuda_graphs=True),
                        check=runtime_check))
    rows.append(RowSpec("cuda-graphs-unbatched", "ours", "vos_optimized=True, one step per object (baseline)",
                        dtype="bf16", compiles=True, needs_cuda=True, env=every,
                        runtime=_knobs(True, static_bank=True, cuda_graphs=True), check=runtime_check,
                        per_object=True))
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
            if row.per_object and not keys:
                continue  # baselines of the batching: only when named (e.g. the multi-object GPU check)
            reason = None
            if row.needs_cuda and device.type != "cuda":
                reason = "needs CUDA"
            if reason is None and row.check is not None:
                reason = row.check()
            if reason is None and device.type != "cuda" and choice == "auto":
                if row.compiles:
                    reason = "skipped on CPU by default (slow inductor compile); name it in --ladder to run"
                elif row.slow_on_cpu:
                    reason = "skipped on CPU by default (bf16 is emulated, slower than fp32); name it to run"
            out.append((row, reason))
    return out
