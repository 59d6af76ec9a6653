"""Op census of one tracked frame: how many aten ops (and, on CUDA, kernel launches) each
stage runs, ours vs the reference (sam2 1.1.0), and which ops we run more often.

    PYTHONPATH=. .venv/bin/python benchmarks/op_census.py                  # CPU: fp32 + bf16, 256 px
    PYTHONPATH=. .venv/bin/python benchmarks/op_census.py --device cuda --image-size 1024

At SAM 2's batch-1 sizes the GPU is launch bound (tiny Hiera at 1024 px is ~0.1 ms of H200
bf16 compute), so the eager gap to the reference is in the number of launches, casts,
copies and host syncs. Both models get the same seeded random weights; tiny, 1 object (one
click on frame 0), ``--frames`` frames (default 9: the last one attends to a full bank of 7
memories + pointers) and the LAST frame is counted.

Counting: a ``TorchDispatchMode`` sees every aten op that runs (below autograd and autocast,
so the casts autocast inserts are counted as ``_to_copy``) and files it under the stage open
at the time (``sam2_fast.profiling`` stages; the reference is instrumented from outside).
Views do not launch kernels and are reported apart. A ``TorchFunctionMode`` counts the
Python-level host reads (``.item()``, ``.tolist()``, ``bool(t)``, ``.cpu()``, ``.numpy()``):
on CUDA each one syncs when its tensor lives on the device; their call sites are listed.

bf16 rows mirror the GPU bench rows: ours = ``enable_fast_runtime(dtype=bf16)`` eager
(kernels off), the reference = the whole loop under ``torch.autocast(bf16)``. CPU autocast
casts a different op set than CUDA autocast (CUDA runs layer_norm, softmax, sum, pow, exp,
upsampling, ... in fp32 and leaves cat/stack/view_as_complex alone), so on CPU the CUDA
policy is emulated (``--cpu-autocast`` turns that off): Python kernels at the AutocastCPU
key for every op whose AutocastCUDA/AutocastCPU registrations differ, read from the
dispatcher's tables. With ``--device cuda`` the real CUDA autocast runs, and a
``torch.profiler`` pass over the same frame also counts kernel launches, memcpy/memset and
synchronize calls per stage (the profiler's runtime events).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from sam2_fast.profiling import OTHER, instrument, listening, profiler_labels

Counts = Dict[str, collections.Counter]  # stage -> op -> calls

CASTS = {"_to_copy", "to", "_autocast_to_reduced_precision", "_autocast_to_full_precision", "type_as"}
COPIES = {"clone", "contiguous", "copy_", "copy"}
FACTORY = {"zeros", "ones", "full", "arange", "zeros_like", "ones_like", "full_like", "fill_", "zero_",
           "scalar_tensor", "linspace", "lift_fresh", "new_zeros", "new_ones", "new_full"}
NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach",
             "detach_", "_local_scalar_dense", "item", "is_nonzero", "sym_size", "sym_stride", "sym_numel", "dim",
             "promote_types", "result_type", "can_cast"}
HOST_ONLY = {"promote_types", "result_type", "can_cast", "sym_size", "sym_stride", "sym_numel", "dim"}
SYNC_OPS = {"item", "_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2",
            "unique_consecutive", "equal", "allclose"}
HOST_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}


def _name(func) -> str:
    return func._schema.name.split("::")[-1]


def category(func, args, out=None) -> str:
    name = _name(func)
    if name in ("to", "contiguous", "type_as") and args and out is args[0]:
        return "view"  # a no-op conversion returns its input: no kernel
    if name == "repeat_interleave":  # syncs only when the repeats are a tensor and no output_size
        tensor_repeats = func._overloadname in ("Tensor", "self_Tensor") and isinstance(args[-1] if
                                                                                     len(args) > 1 else args[0], torch.Tensor)
        return "sync" if tensor_repeats else "cat/pad"
    if name in SYNC_OPS:
        return "sync"
    if name in ("index", "index_put", "index_put_") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_flatten(args)[0][1:]):
        return "sync"  # boolean-mask indexing: nonzero + a device->host read of the count
    if name in CASTS:
        return "cast"
    if name in COPIES:
        return "copy"
    if getattr(func, "is_view", False) or name in ("detach", "detach_", "alias", "_unsafe_view") or name in HOST_ONLY:
        return "view"  # views and dtype queries: host work only
    if name in FACTORY or "empty" in name:
        return "factory"
    if name in ("cat", "stack", "constant_pad_nd", "pad", "repeat", "expand_copy", "roll", "flip"):
        return "cat/pad"
    return "compute"


def _site() -> str:
    """First frame of model code (ours or the reference) on the Python stack."""
    f = sys._getframe(2)
    while f is not None:
        fn = f.f_code.co_filename
        if ("/sam2_fast/" in fn or "/sam2/" in fn) and "profiling.py" not in fn and "/bench/" not in fn:
            cut = fn.rfind("/sam2_fast/") if "/sam2_fast/" in fn else fn.rfind("/sam2/")
            return f"{fn[cut + 1:]}:{f.f_lineno}"
        f = f.f_back
    return "?"


class Census(TorchDispatchMode):
    """Counts aten ops per stage; also a StageListener (see sam2_fast.profiling)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: List[str] = []
        self.frames: List[Tuple[Counts, collections.Counter]] = []
        self.new_frame()

    def new_frame(self) -> None:
        self.counts: Counts = collections.defaultdict(collections.Counter)
        self.sites: collections.Counter = collections.Counter()
        self.wall: collections.Counter = collections.Counter()  # stage -> seconds (exclusive)
        self.in_ops: collections.Counter = collections.Counter()  # stage -> seconds inside aten ops
        self.frames.append((self.counts, self.sites, self.wall, self.in_ops))
        self.t_last = time.perf_counter()

    def _mark(self) -> None:
        t = time.perf_counter()
        self.wall[self.stack[-1] if self.stack else OTHER] += t - self.t_last
        self.t_last = t

    def enter(self, name: str) -> None:
        self._mark()
        self.stack.append(name)

    def exit(self, name: str) -> None:
        self._mark()
        if name in self.stack:
            del self.stack[len(self.stack) - 1 - self.stack[::-1].index(name)]

    def note(self, key: str) -> None:
        self.counts[self.stack[-1] if self.stack else OTHER][key] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.in_ops[self.stack[-1] if self.stack else OTHER] += time.perf_counter() - t0
        cat = category(func, args, out)
        self.note(f"{cat}|{_name(func)}")
        if cat == "sync" or _name(func) == "lift_fresh":
            self.sites[f"{_name(func)} @ {_site()}"] += 1
        return out


class HostReads(TorchFunctionMode):
    """Python-level host reads (item/tolist/bool/cpu/numpy), counted into a Census."""

    def __init__(self, census: Census) -> None:
        super().__init__()
        self.census = census

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS and args and isinstance(args[0], torch.Tensor):
            self.census.note(f"host-read|{name}")
            self.census.sites[f".{name}() @ {_site()}"] += 1
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------- CUDA autocast on a CPU
LOWER = {"einsum", "addmv", "mv", "addr", "chain_matmul", "linalg_multi_dot"}
PROMOTE = {"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
           "tensordot", "scatter_add"}
SET_OPT_DTYPE = {"prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm", "linalg_matrix_norm",
                 "sum"}
_LOW = (torch.bfloat16, torch.float16)


def _registrations(op: str) -> Tuple[Optional[bool], Optional[bool]]:
    cpu = cuda = None
    for line in torch._C._dispatch_dump_table(op).splitlines():
        if line.startswith("AutocastCPU:"):
            cpu = "fallthrough" not in line
        elif line.startswith("AutocastCUDA:"):
            cuda = "fallthrough" not in line
    return cpu, cuda


@contextlib.contextmanager
def cuda_autocast_policy(report: Optional[List[str]] = None):
    """Make CPU autocast cast like CUDA autocast, for every op whose registrations differ."""
    lib = torch.library.Library("aten", "IMPL")
    guard = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
    names = sorted({n.split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("aten::")})
    for base in names:
        short = base.split("::")[1]
        packet = getattr(torch.ops.aten, short, None)
        if packet is None:
            continue
        for ov in packet.overloads():
            full = base if ov == "default" else f"{base}.{ov}"
            cpu, cuda = _registrations(full)
            if cpu is None or cpu == cuda:
                continue
            op = getattr(packet, ov)
            if cpu and not cuda:
                policy = "none"
            elif short in LOWER:
                policy = "lower"
            elif short in PROMOTE:
                policy = "promote"
            elif short in SET_OPT_DTYPE:
                policy = "opt_dtype"
            else:
                policy = "fp32"
            lib.impl(full.split("::")[1], _autocast_kernel(op, policy, guard), "AutocastCPU")
            if report is not None:
                report.append(f"{full}: {policy}")
    try:
        yield
    finally:
        lib._destroy()


def _autocast_kernel(op, policy: str, guard) -> Callable:
    def kernel(*args, **kwargs):
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
        to = None
        if policy == "fp32":
            to = torch.float32
        elif policy == "lower":
            to = torch.get_autocast_dtype("cpu")
        elif policy == "promote" and len({t.dtype for t in tensors}) > 1:
            to = torch.float32
        elif policy == "opt_dtype" and any(a.name == "dtype" for a in op._schema.arguments) \
                and kwargs.get("dtype") is None \
                and any(t.dtype in _LOW for t in tensors):
            kwargs = dict(kwargs, dtype=torch.float32)
        if to is not None:
            def cast(t):
                ok = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != to
                return t.to(to) if ok and (policy != "fp32" or t.dtype in _LOW) else t
            args, kwargs = tree_map(cast, (args, kwargs))
        with torch._C._ExcludeDispatchKeyGuard(guard):
            return op(*args, **kwargs)

    return kernel


# ---------------------------------------------------------------- models and the run
def build_pair(image_size: int, device: torch.device, fill_holes: bool = False):
    from sam2.build_sam import build_sam2_video_predictor as build_ref
    from sam2_fast.build_sam import build_sam2_video_predictor as build_ours
    from sam2_fast.utils.random_weights import sensitize_

    cfg, over = "configs/sam2.1/sam2.1_hiera_t.yaml", [f"++model.image_size={image_size}"]
    torch.manual_seed(0)
    ref = build_ref(cfg, None, device="cpu", hydra_overrides_extra=over, apply_postprocessing=False)
    sensitize_(ref, 0, obj_score_bias=4.0)
    # --fill-holes: ours with the configs' hole filling (the pip reference cannot: it needs its
    # CUDA extension), to count what it costs per frame (ops, syncs in "other")
    ours = build_ours(cfg, None, device="cpu", hydra_overrides_extra=over, apply_postprocessing=fill_holes)
    ours.load_state_dict(ref.state_dict())
    return ref.to(device).eval(), ours.to(device).eval()


def run(impl: str, model, dtype: str, device: torch.device, clip, profile: bool) -> Dict:
    from sam2_fast.bench import impls

    which = impls.reference_impl() if impl == "reference" else impls.ours_impl()
    if impl == "ours" and dtype == "bf16":
        from sam2_fast.runtime import enable_fast_runtime
        enable_fast_runtime(model, dtype=torch.bfloat16, compile=False, static_bank=False, cuda_graphs=False)
    outer = torch.autocast(device.type, dtype=torch.bfloat16) if impl == "reference" and dtype == "bf16" \
        else contextlib.nullcontext()
    census = Census()
    with outer, impls.quiet_reference(), torch.inference_mode():
        state = impls.init_state(which, model, clip.frames, device)
        impls.add_clicks(model, state, clip.clicks)
        list(model.propagate_in_video(state))  # warm-up pass (lazy caches, first-call paths)
        frames = len(clip.frames)
        prof = None
        with instrument(model), listening(census):
            gen = model.propagate_in_video(state)
            census.frames.clear()
            census.new_frame()
            with census, HostReads(census):
                for i in range(frames):
                    if profile and i == frames - 1:  # CUDA: the last frame also under the profiler
                        with _profiler(device) as prof:
                            next(gen)
                            if device.type == "cuda":
                                torch.cuda.synchronize()
                    else:
                        next(gen)
                    census._mark()
                    census.new_frame()
                assert next(gen, None) is None, "the clip yielded more frames than it has"
        counts, sites, wall, in_ops = census.frames[-2]  # the last one is empty (opened after the end)
        glue = {s: round(1e3 * (wall[s] - in_ops[s]), 2) for s in wall}  # ms outside aten ops
        out = {"counts": {s: dict(c) for s, c in counts.items()}, "sites": dict(sites), "glue_ms": glue}
        if prof is not None:
            out["launches"] = _runtime_calls(prof)
    if impl == "ours" and dtype == "bf16":
        from sam2_fast.runtime import disable_fast_runtime
        disable_fast_runtime(model)
    return out


LAUNCH = ("LaunchKernel", "cuLaunch", "cudaGraphLaunch")
RUNTIME_KINDS = {"launch": LAUNCH, "memcpy": ("Memcpy",), "memset": ("Memset",), "sync": ("Synchronize",)}


@contextlib.contextmanager
def _profiler(device: torch.device):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profiler_labels(), profile(activities=acts) as prof:
        yield prof


def _runtime_calls(prof) -> Dict[str, Dict[str, int]]:
    """CUDA runtime calls (launches, memcpy, memset, synchronize) per stage of the profiled frame."""
    evs = prof.events()
    stages = [e for e in evs if e.name.startswith("stage::")]
    out: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in evs:
        t = e.time_range.start
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        kind = next((k for k, keys in RUNTIME_KINDS.items() if any(s in e.name for s in keys)), None)
        if kind is None or not e.name.startswith("cu"):
            continue
        inner = [s for s in stages if s.time_range.start <= t <= s.time_range.end]
        stage = min(inner, key=lambda s: s.time_range.end - s.time_range.start).name[7:] if inner else OTHER
        out[stage][kind] += 1
    return {s: dict(c) for s, c in out.items()}


# ---------------------------------------------------------------- report
CATS = ("compute", "cast", "copy", "cat/pad", "factory", "sync", "host-read", "view")  # view: no kernel
ORDER = ("image_encoder", "memory_attention", "sam_heads", "memory_encoder", "upsampling", OTHER)


def _by_cat(c: Dict[str, int]) -> collections.Counter:
    out = collections.Counter()
    for key, n in c.items():
        out[key.split("|")[0]] += n
    return out


def launches(c: Dict[str, int]) -> int:
    """Ops that launch a kernel (or copy) on CUDA: everything but views and host-only ops."""
    return sum(n for k, n in c.items() if k.split("|")[0] not in ("view", "host-read")
               and k.split("|")[1] not in NO_LAUNCH)


def report(res: Dict[str, Dict], dtype: str, top: int) -> str:
    ours, ref = res["ours"]["counts"], res["reference"]["counts"]
    lines = [f"### {dtype}: ops of the last frame per stage, ours / reference",
             "", "| stage | launch-ops | " + " | ".join(CATS) + " | host ms outside ops |",
             "|---" * (len(CATS) + 3) + "|"]
    go, gr = res["ours"].get("glue_ms", {}), res["reference"].get("glue_ms", {})
    tot_o, tot_r = collections.Counter(), collections.Counter()
    for st in ORDER:
        o, r = ours.get(st, {}), ref.get(st, {})
        if not o and not r:
            continue
        co, cr = _by_cat(o), _by_cat(r)
        tot_o.update(o), tot_r.update(r)
        cells = [f"{co[c]} / {cr[c]}" for c in CATS]
        lines.append(f"| {st} | {launches(o)} / {launches(r)} | " + " | ".join(cells)
                     + f" | {go.get(st, 0):.1f} / {gr.get(st, 0):.1f} |")
    co, cr = _by_cat(tot_o), _by_cat(tot_r)
    lines.append(f"| **frame** | **{launches(tot_o)} / {launches(tot_r)}** | "
                 + " | ".join(f"{co[c]} / {cr[c]}" for c in CATS)
                 + f" | {sum(go.values()):.1f} / {sum(gr.values()):.1f} |")
    for st in ORDER:
        o, r = collections.Counter(ours.get(st, {})), collections.Counter(ref.get(st, {}))
        diff = [(o[k] - r[k], k) for k in set(o) | set(r) if o[k] != r[k] and not k.startswith("view|")]
        if not diff:
            continue
        diff.sort(key=lambda x: (-abs(x[0]), x[1]))
        lines.append(f"\n{st}: ops we run more (+) / fewer (-) than the reference (views left out): "
                     + ", ".join(f"{k.split('|')[1]} {d:+d} ({o[k]} vs {r[k]})" for d, k in diff[:top]))
    syncs = [sum(res[i]["sites"].values()) for i in ("ours", "reference")]
    lines.append(f"\nhost syncs per frame on CUDA (host reads, sync-prone ops, torch.tensor(data, device)): "
                 f"ours {syncs[0]} / reference {syncs[1]}")
    for impl in ("ours", "reference"):
        sites = res[impl]["sites"]
        if sites:
            lines.append(f"\n{impl}: host reads / sync-prone ops / torch.tensor(data) in the frame: "
                         + "; ".join(f"{k} x{n}" for k, n in sorted(sites.items())))
        if "launches" in res[impl]:
            lines.append(f"\n{impl} CUDA runtime calls per stage: {json.dumps(res[impl]['launches'])}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image-size", type=int, default=None, help="default 1024 on CUDA, 256 on CPU")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--dtype", default="bf16,fp32")
    p.add_argument("--cpu-autocast", action="store_true", help="CPU: keep CPU autocast's own op set")
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--profile", default=None, action=argparse.BooleanOptionalAction,
                   help="count CUDA runtime calls of the last frame with torch.profiler (default: on CUDA)")
    p.add_argument("--json", default=None, help="write every count here")
    p.add_argument("--fill-holes", action="store_true", help="ours with hole filling (fill_hole_area of the config)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    size = a.image_size or (1024 if device.type == "cuda" else 256)
    os.environ["SAM2_FAST_DISABLE_KERNELS"] = "1"  # the eager bf16 rows run with kernels off
    from sam2_fast.bench.video import synthetic_clip

    clip = synthetic_clip(a.frames, *((240, 320) if device.type == "cpu" else (480, 854)), objects=1)
    t0 = time.perf_counter()
    ref, ours = build_pair(size, device, a.fill_holes)
    result = {"device": str(device), "image_size": size, "frames": a.frames, "torch": torch.__version__,
              "fill_holes": a.fill_holes}
    for dtype in [d.strip() for d in a.dtype.split(",")]:
        emulate = dtype == "bf16" and device.type == "cpu" and not a.cpu_autocast
        policy: List[str] = []
        with (cuda_autocast_policy(policy) if emulate else contextlib.nullcontext()):
            res = {impl: run(impl, m, dtype, device, clip,
                          profile=a.profile if a.profile is not None else device.type == "cuda")
                   for impl, m in (("ours", ours), ("reference", ref))}
        result[dtype] = res
        print(report(res, dtype + (" (CUDA autocast policy emulated on CPU)" if emulate else ""), a.top), flush=True)
        print()
    print(f"census done in {time.perf_counter() - t0:.1f}s (image {size}, {a.frames} frames, last frame counted)")
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(a.json + ".tmp", a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
