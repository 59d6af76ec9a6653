"""Per-frame time of our predictor vs the reference, interleaved frame by frame (CPU).

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_interleaved.py \\
        --video ../shared/data/bikes.mp4 --image-size 512 --frames 20

On a CPU shared with other jobs, two runs one after the other see different loads. Here
both predictors (identical sensitized random weights, same clip and click, hole filling
off on both as in ``sam2-fast bench``) propagate in lock step: frame t of one, then frame
t of the other, the order alternating every frame, so a load change hits both sides alike.
The summary is over the frames where the memory bank is full (frame >= num_maskmem: one
conditioning frame + num_maskmem - 1 recent ones, plus object pointers): median of the
per-frame ratios ours / reference and the ratio of the summed times.

Variants (``--variants``): ``ours`` (the default path), ``ours-projected`` (value space
off: the cross-attention with projected values, to attribute its share), ``reference``,
and ``ours-before``: an older commit of ours, exported and renamed so both import in one
process (``git archive <commit> sam2_fast | tar -x -C /tmp/old``, rename the folder to
``sam2_fast_old``, replace ``sam2_fast`` by ``sam2_fast_old`` in its sources, put /tmp/old on
PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is imported: no progress bars

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sam2_fast.bench import impls  # noqa: E402
from sam2_fast.bench.video import load_clip  # noqa: E402
from sam2_fast.utils.random_weights import sensitize_  # noqa: E402


def _build(impl: impls.Impl, model: str, size: int, weights) -> torch.nn.Module:
    with impls.quiet_reference():
        pred = impls.build(impl, model, size, torch.device("cpu"))
    pred.load_state_dict(weights, strict=True)
    impls.disable_hole_filling(pred)
    return pred


STAGES = ("image_encoder", "memory_attention", "memory_encoder", "sam_mask_decoder")


def _time_stages(pred, sink: Dict[str, float]) -> None:
    """Accumulate each submodule's forward time (ms) into ``sink`` (hooks; ~µs overhead)."""
    for name in STAGES:
        mod = getattr(pred, name)
        starts: List[float] = []
        mod.register_forward_pre_hook(lambda m, a, starts=starts: starts.append(time.perf_counter()))

        def done(m, a, out, name=name, starts=starts):
            sink[name] = sink.get(name, 0.0) + (time.perf_counter() - starts.pop()) * 1e3
        mod.register_forward_hook(done)


def _set_value_space(pred, on: bool) -> None:
    for layer in pred.memory_attention.layers:
        layer.cross_attn_image.value_space = on


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--video", default="../shared/data/bikes.mp4")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="ours,reference")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    clip = load_clip(args.video, args.frames, 1)
    ours_impl, ref_impl = impls.ours_impl(), impls.reference_impl()
    with impls.quiet_reference():
        source = impls.build(ref_impl, args.model, args.image_size, torch.device("cpu"))
    sensitize_(source, seed=args.seed, obj_score_bias=1.0)
    weights = {k: v.detach().clone() for k, v in source.state_dict().items()}
    num_maskmem = source.num_maskmem
    del source

    preds, gens, times, stage_sink = {}, {}, {}, {}
    built = {}
    for name in names:  # built outside inference mode, as users build them (normal parameters)
        impl = ref_impl if name == "reference" else ours_impl
        if name == "ours-before":
            from sam2_fast_old.build_sam import build_sam2_video_predictor as before_builder

            impl = impls.Impl("ours", "sam2_fast (older commit)", before_builder, True)
        built[name] = (impl, _build(impl, args.model, args.image_size, weights))
        if name == "ours-projected":
            _set_value_space(built[name][1], False)
    with torch.inference_mode(), impls.quiet_reference():
        for name in names:
            impl, pred = built[name]
            state = impls.init_state(impl, pred, clip.frames, torch.device("cpu"))
            impls.add_clicks(pred, state, clip.clicks)
            preds[name], gens[name], times[name] = pred, pred.propagate_in_video(state), []
            stage_sink[name] = {}
            _time_stages(pred, stage_sink[name])
        masks: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
        stage_ms: Dict[str, List[Dict[str, float]]] = {n: [] for n in names}
        for t in range(len(clip.frames)):
            order = names if t % 2 == 0 else names[::-1]
            for name in order:
                stage_sink[name].clear()
                t0 = time.perf_counter()
                _, _, logits = next(gens[name])
                times[name].append(time.perf_counter() - t0)
                stage_ms[name].append(dict(stage_sink[name]))
                masks[name].append(logits > 0)
            print(f"frame {t:3d}: " + "  ".join(f"{n} {times[n][-1] * 1e3:7.1f} ms" for n in names), flush=True)

    full = slice(num_maskmem, None)
    result = {"model": args.model, "image_size": args.image_size, "video": clip.source,
              "frames": len(clip.frames), "full_bank_frames": len(clip.frames) - num_maskmem,
              "threads": args.threads, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "ms_full_bank_median": {n: float(np.median(times[n][full]) * 1e3) for n in names}}
    if "reference" in names:
        ref_t = np.array(times["reference"][full])
        for n in names:
            if n == "reference":
                continue
            mine = np.array(times[n][full])
            result[f"{n}/reference per-frame median ratio"] = float(np.median(mine / ref_t))
            result[f"{n}/reference summed ratio"] = float(mine.sum() / ref_t.sum())
            agree = [float(((a == b).sum() / a.numel()).item()) for a, b in zip(masks[n], masks["reference"])]
            result[f"{n} mask pixel agreement (min over frames)"] = min(agree)
            result[f"{n}/reference per-stage summed ratio"] = {
                st: sum(f.get(st, 0.0) for f in stage_ms[n][full])
                / max(1e-9, sum(f.get(st, 0.0) for f in stage_ms["reference"][full])) for st in STAGES}
    result["stage_ms_full_bank_median"] = {
        n: {st: float(np.median([f.get(st, 0.0) for f in stage_ms[n][full]])) for st in STAGES} for n in names}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"result": result, "times_s": times, "stage_ms": stage_ms}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
