"""Run one benchmark case: every selected row on the same clip, prompts and weights.

For each row: build the predictor, load the shared weights, ``init_state`` and clicks
(untimed, as the reference's benchmark.py does), then

1. a warm-up pass over the whole clip (compile time lands here); its outputs are kept
   on the host for the accuracy column;
2. ``repeats`` timed passes: per-frame latency between consecutive yields (CUDA events
   on GPU, ``perf_counter`` on CPU) and frames/s over the passes' wall time;
3. one more pass with the stage timer listening, for the per-stage breakdown.

The golden row (reference eager fp32) also gets an untimed FLOP-counting pass.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from sam2_fast.bench import impls
from sam2_fast.bench.env import host_rss_mib
from sam2_fast.bench.flops import flop_counter
from sam2_fast.bench.ladder import RowSpec
from sam2_fast.bench.stages import StageTimer
from sam2_fast.bench.video import Clip
from sam2_fast.profiling import instrument, listening

LOGIT_CLAMP = 32.0  # the -1024 "no object" fill would otherwise drown the logit error


@dataclass
class Case:
    model: str = "tiny"
    image_size: Optional[int] = 256
    frames: int = 8
    objects: int = 1
    resolution: str = "240p"
    video: Optional[str] = None
    checkpoint: Optional[str] = None
    device: str = "cpu"
    repeats: int = 1
    seed: int = 0
    obj_score_bias: float = 2.0  # random weights: keeps the object present on most frames
    fill_holes: bool = False


@dataclass
class Outputs:
    logits: List[torch.Tensor] = field(default_factory=list)  # per frame (objects, H, W) fp32 host


def shared_weights(case: Case, ours: impls.Impl, ref: impls.Impl, device: torch.device) -> Optional[Dict[str, torch.Tensor]]:
    """The state dict every row loads: random (sensitized) unless a checkpoint is given."""
    if case.checkpoint:
        return None  # each builder loads the checkpoint itself
    from sam2_fast.utils.random_weights import sensitize_

    source = ref if ref.available else ours
    model = impls.build(source, case.model, case.image_size, torch.device("cpu"))
    sensitize_(model, seed=case.seed, obj_score_bias=case.obj_score_bias)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model
    return sd


@contextlib.contextmanager
def row_settings(row: RowSpec, device: torch.device):
    """Environment variables, TF32 and autocast for one row; all restored afterwards."""
    saved_env = {k: os.environ.get(k) for k in row.env}
    os.environ.update(row.env)
    saved_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = row.tf32
    torch.backends.cudnn.allow_tf32 = row.tf32
    from sam2_fast.video import propagate

    saved_per_object = propagate.TRACK_PER_OBJECT
    propagate.TRACK_PER_OBJECT = row.per_object
    try:
        yield
    finally:
        propagate.TRACK_PER_OBJECT = saved_per_object
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _autocast(row: RowSpec, device: torch.device):
    if row.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=row.autocast)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_pass(predictor, state, device, keep: Optional[Outputs], lat_ms: Optional[List[float]], rss: List[float],
              timer: Optional[StageTimer] = None) -> float:
    """Propagate over the clip once; returns the wall time in seconds."""
    cuda = device.type == "cuda"
    _sync(device)
    t0 = time.perf_counter()
    last = torch.cuda.Event(enable_timing=True) if cuda else t0
    if cuda:
        last.record()
    marks = []
    if timer is not None:
        timer.begin_frame()
    for _, _, masks in predictor.propagate_in_video(state):
        if timer is not None:
            timer.end_frame()
        if cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append(ev)
        else:
            marks.append(time.perf_counter())
        if keep is not None:
            keep.logits.append(masks.detach().float().squeeze(1).cpu())
        rss.append(host_rss_mib())
        if timer is not None:
            timer.begin_frame()
    if timer is not None:
        timer.discard_frame()
    _sync(device)
    wall = time.perf_counter() - t0
    if lat_ms is not None:
        prev = last
        for m in marks:
            lat_ms.append(prev.elapsed_time(m) if cuda else (m - prev) * 1e3)
            prev = m
    return wall


def accuracy(outs: Outputs, golden: Outputs) -> Dict[str, float]:
    """Mean/min mask IoU (logit > 0) and relative logit error (clamped to ±32) vs golden."""
    if len(outs.logits) != len(golden.logits):
        return {"miou": float("nan"), "min_iou": float("nan"), "logit_rel_err": float("nan")}
    ious, num, den = [], 0.0, 0.0
    for a, b in zip(outs.logits, golden.logits):
        if a.shape != b.shape:
            return {"miou": float("nan"), "min_iou": float("nan"), "logit_rel_err": float("nan")}
        ma, mb = a > 0, b > 0
        inter = (ma & mb).flatten(1).sum(1).double()
        union = (ma | mb).flatten(1).sum(1).double()
        ious.extend(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).tolist())
        ca, cb = a.double().clamp(-LOGIT_CLAMP, LOGIT_CLAMP), b.double().clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
        num += float((ca - cb).pow(2).sum())
        den += float(cb.pow(2).sum())
    return {
        "miou": float(np.mean(ious)),
        "min_iou": float(np.min(ious)),
        "logit_rel_err": (num / den) ** 0.5 if den > 0 else float("nan"),
    }


def run_row(row: RowSpec, impl: impls.Impl, case: Case, clip: Clip, weights, device: torch.device,
            count_flops: bool = False, log=print) -> Dict[str, object]:
    """Measure one row. Returns its result dict; outputs go in result['_outputs']."""
    res: Dict[str, object] = {"key": row.key, "impl": row.impl, "impl_label": impl.label, "title": row.title,
                              "dtype": row.dtype, "runtime": {k: str(v) for k, v in (row.runtime or {}).items()},
                              "autocast": str(row.autocast).replace("torch.", "") if row.autocast else None,
                              "tf32": row.tf32, "vos_optimized": row.vos_optimized, "env": dict(row.env)}
    cuda = device.type == "cuda"
    import sys
    if "sam2_fast.kernels.dispatch" in sys.modules:  # per-row kernel/backend counts
        sys.modules["sam2_fast.kernels.dispatch"].reset_launch_counts()
    # Dynamo keeps compiled entries per code object, and every row builds the same classes:
    # without a reset, later rows would hit the recompile limit and silently run eager.
    torch._dynamo.reset()
    graphs_before = _compiled_graphs()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss: List[float] = [host_rss_mib()]
    # Built outside inference mode, as users build it (parameters stay normal tensors).
    with row_settings(row, device), impls.quiet_reference():
        t0 = time.perf_counter()
        predictor = impls.build(impl, case.model, case.image_size, device, row.vos_optimized, case.checkpoint,
                                **row.build_kwargs)
        if weights is not None:
            predictor.load_state_dict(weights, strict=True)
        if row.runtime is not None:
            from sam2_fast.runtime import enable_fast_runtime

            enable_fast_runtime(predictor, **row.runtime)
        if not case.fill_holes:
            res["hole_filling_off"] = impls.disable_hole_filling(predictor)
        res["build_s"] = time.perf_counter() - t0
        with _autocast(row, device), impls.quiet_reference(), torch.inference_mode():  # quiet again: new modules
            t0 = time.perf_counter()
            state = impls.init_state(impl, predictor, clip.frames, device)
            impls.add_clicks(predictor, state, clip.clicks)
            _sync(device)
            res["init_s"] = time.perf_counter() - t0
            log(f"  [{row.key}] built in {res['build_s']:.1f}s, state+clicks {res['init_s']:.1f}s; warm-up pass ...")
            outs = Outputs()
            warm_lat: List[float] = []
            res["warmup_s"] = _one_pass(predictor, state, device, outs, warm_lat, rss)
            res["first_frame_ms"] = warm_lat[1] if len(warm_lat) > 1 else warm_lat[0]
            lat: List[float] = []
            wall = 0.0
            for _ in range(max(1, case.repeats)):
                wall += _one_pass(predictor, state, device, None, lat, rss)
            n = len(lat)
            res.update(frames=len(outs.logits), timed_frames=n, fps=n / wall if wall > 0 else float("nan"),
                       p50_ms=float(np.percentile(lat, 50)), p99_ms=float(np.percentile(lat, 99)),
                       mean_ms=float(np.mean(lat)))
            timer = StageTimer(device)
            with instrument(predictor) as found, listening(timer):
                _one_pass(predictor, state, device, None, None, rss, timer)
            res["stages_found"] = found
            res["stage_ms"] = timer.mean_ms()
            if count_flops:
                counter = flop_counter()
                ftimer = StageTimer(device, counter)
                with counter, instrument(predictor), listening(ftimer):
                    _one_pass(predictor, state, device, None, None, rss, ftimer)
                res["stage_flops"] = ftimer.mean_flops()
                res["stage_flops_last"] = ftimer.last_flops()
    # graphs dynamo compiled for this row (each one autotuned under max-autotune): the
    # warm-up time divided by this is the cost per graph on this card
    res["compiled_graphs"] = _compiled_graphs() - graphs_before
    if res["compiled_graphs"]:
        log(f"  [{row.key}] compiled {res['compiled_graphs']} graphs; warm-up {res['warmup_s']:.1f}s, "
            f"state+clicks {res['init_s']:.1f}s")
    info = getattr(predictor, "runtime_info", None)
    if info is not None:
        res["runtime_info"] = info  # what the fast runtime enabled, skipped and counted
    backends = _kernel_backends()
    if backends:
        res["kernel_backends"] = backends
        for line in backends["lines"]:
            print(f"    backend {line}", flush=True)
    res["peak_device_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    res["peak_host_mib"] = max(rss)
    res["status"] = "ok"
    res["_outputs"] = outs
    del predictor, state
    gc.collect()
    return res


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _kernel_backends() -> dict:
    """Which implementation each kernel slot ran (selection layer), with measured times."""
    import sys
    mod = sys.modules.get("sam2_fast.kernels.dispatch")
    if mod is None:
        return {}
    counts, choices = mod.backend_counts(), mod.backend_choices()
    lines = [f"{name}: {n} calls" for name, n in sorted(counts.items())]
    for key, entry in sorted(choices.items()):
        times = ", ".join(f"{c} {t:.0f}us" for c, t in sorted(entry.get("times_us", {}).items(), key=lambda x: x[1]))
        lines.append(f"{key} -> {entry.get('choice')} ({times})")
    return {"counts": counts, "choices": choices, "lines": lines}


COMPILE_RESERVE_S = 150.0  # a compiling row is not started with less time than this left
ROW_RESERVE_S = 30.0


def _order(row: RowSpec) -> int:
    """Golden first, then the cheap reference row, our ladder, and the slow compiled reference last."""
    if row.golden:
        return 0
    if row.impl == "reference":
        return 3 if row.compiles else 1
    return 2


def run_rows(rows: Sequence[tuple], case: Case, clip: Clip, ours: impls.Impl, ref: impls.Impl,
             device: torch.device, log=print, deadline: Optional[float] = None,
             on_row: Optional[Callable[[List[Dict[str, object]]], None]] = None) -> List[Dict[str, object]]:
    """Run (row, skip_reason) pairs; the first successful fp32 row is the accuracy golden.

    ``deadline`` (``time.monotonic()`` value): rows that would start too late to finish are
    reported as n/a instead, so a time-limited run always ends with its report written.
    ``on_row`` gets the results so far after every row (for incremental report files).
    """
    weights = shared_weights(case, ours, ref, device) if (ours.available or ref.available) else None
    results: List[Dict[str, object]] = []
    golden: Optional[Outputs] = None
    golden_key: Optional[str] = None
    # Golden first: the reference fp32 when it runs, else our fp32 row.
    ordered = sorted(rows, key=lambda rr: _order(rr[0]))  # stable: keeps the ladder's order
    for row, reason in ordered:
        impl = ref if row.impl == "reference" else ours
        if reason is None and not impl.available:
            reason = impl.missing
        if reason is None and deadline is not None:
            left = deadline - time.monotonic()
            if left < (COMPILE_RESERVE_S if row.compiles else ROW_RESERVE_S):
                reason = f"time budget: {max(left, 0):.0f}s left when this row was due"
        if reason is not None:
            log(f"  [{row.key}] n/a: {reason}")
            results.append({"key": row.key, "impl": row.impl, "title": row.title, "status": "n/a", "reason": reason})
            if on_row is not None:
                on_row(results)
            continue
        is_fp32 = row.dtype == "fp32"
        log(f"  [{row.key}] {row.title}")
        try:
            # FLOPs are a property of the model, not of the row: count them once, in fp32.
            count = is_fp32 and not any(r.get("stage_flops") for r in results)
            res = run_row(row, impl, case, clip, weights, device, count_flops=count, log=log)
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
            log(f"  [{row.key}] error: {exc.__class__.__name__}: {exc}")
            results.append({"key": row.key, "impl": row.impl, "title": row.title, "status": "error",
                            "reason": f"{exc.__class__.__name__}: {exc}", "traceback": traceback.format_exc(limit=6)})
            if on_row is not None:
                on_row(results)
            continue
        outs = res.pop("_outputs")
        if golden is None and is_fp32:
            golden, golden_key = outs, row.key
        if golden is not None:
            res.update(accuracy(outs, golden))
            res["accuracy_vs"] = golden_key
        results.append(res)
        del outs
        if on_row is not None:
            on_row(results)
    return results
