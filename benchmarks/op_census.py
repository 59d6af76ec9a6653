"""Op census of one tracked frame: how many aten ops (and, on CUDA, kernel launches) each
stage runs, ours vs the reference (sam2 1.1.0), and which ops we run more often.

    PYTHONPATH=. .venv/bin/python benchmarks/op_census.py                  # CPU: fp32 + bf16, 256 px
    PYTHONPATH=. .venv/bin/python benchmarks/op_census.py --device cuda --image-size 1024

At SAM 2's batch-1 sizes the GPU is launch bound (tiny Hiera at 1024 px is ~0.1 ms of H200
bf16 compute), so the eager gap to the reference is in the number of launches, casts,
copies and host syncs. Both models get the same seeded random weights; tiny, 1 object (one
click on frame 0), ``--frames`` frames (default 9: the last one attends to a full bank of 7
memories + pointers) and the LAST frame is counted.

Counting (``census_modes.py``): a ``TorchDispatchMode`` sees every aten op that runs (below autograd and autocast,
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
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # census_modes, also under python -m
from census_modes import NO_LAUNCH, Census, HostReads, cuda_autocast_policy  # noqa: E402

from sam2_fast.profiling import OTHER, instrument, listening, profiler_labels  # noqa: E402


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
