"""``sam2-fast bench --task amg``: our automatic mask generator next to the reference's.

Same image, same weights (identical sensitive random weights unless ``--checkpoint``),
same generator settings. Rows: the reference in fp32 (the accuracy golden) and ours in
fp32; on CUDA also both under bf16 autocast (as the official notebooks run the AMG) and
ours with ``points_per_batch=None`` (the largest batch that fits). Per row: ms per image
(median of the timed runs), masks/s, masks, peak device / host memory, and accuracy
against the golden: mean and min IoU of each golden mask's best match (the same columns
as the tracking bench), the mask count difference and the largest predicted-IoU error.

``--amg-settings official`` uses the official defaults; ``random-weights`` thresholds at
which the seeded random model keeps a realistic number of masks (the official filters drop
every one of them); ``all`` keeps every grid mask (thresholds 0, NMS off: the heaviest
post-processing). ``auto`` (default): ``official`` with ``--checkpoint``, else
``random-weights``. A run whose reference keeps no masks says so: its accuracy columns
compare nothing.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import statistics
import time
import warnings
from typing import Any, Dict, List

import numpy as np
import torch

from sam2_fast.bench import impls
from sam2_fast.bench.env import card_slug, environment, host_rss_mib
from sam2_fast.bench.report import _fmt, _table

SETTINGS = {
    "official": {},
    # thresholds at which the seeded sensitive random weights keep a realistic number of masks
    # (the official 0.8 / 0.95 keep none of a random model's masks, so the accuracy columns
    # would compare nothing). Default case (tiny at 256, 8x8 points, 192 candidates):
    # predicted IoU median 0.48 (90th percentile 0.68), stability median 0.64 -> 45 masks kept.
    # NMS still runs but keeps them all: a random model's masks are 55-78k-pixel blobs of a
    # 102k-pixel image that NMS at 0.7 would collapse to 1
    "random-weights": dict(pred_iou_thresh=0.5, stability_score_thresh=0.6, box_nms_thresh=1.0),
    "all": dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0),
}
CSV_ROW = ("key", "impl", "status", "ms_per_image", "masks_per_s", "masks", "peak_device_mib", "peak_host_mib",
           "miou", "min_iou", "count_diff", "score_err", "warmup_s", "reason")


def add_args(p) -> None:
    p.add_argument("--image", default=None, help="--task amg: image file, or a video (its first frame); "
                   "default a synthetic image of --resolution")
    p.add_argument("--points-per-side", type=int, default=None, help="--task amg: grid size (default 8 CPU, 32 CUDA)")
    p.add_argument("--amg-settings", default="auto", choices=["auto"] + sorted(SETTINGS),
                   help="--task amg: official defaults; random-weights (thresholds at which a random model "
                   "keeps some masks); all (no filtering: every mask post-processed); auto (default): "
                   "official with --checkpoint, else random-weights")


def load_image(args) -> tuple:
    from sam2_fast.bench.video import parse_resolution, synthetic_clip

    if args.image:
        if not os.path.exists(args.image):
            raise ValueError(f"--image {args.image!r} does not exist")
        try:
            from PIL import Image

            with Image.open(args.image) as im:
                return np.asarray(im.convert("RGB")), os.path.basename(args.image)
        except Exception:  # not an image: try it as a video
            from sam2_fast.bench.video import load_clip

            clip = load_clip(args.image, 1, 1)
            return clip.frames[0], f"{os.path.basename(args.image)} frame 0"
    h, w = parse_resolution(args.resolution)
    return synthetic_clip(1, h, w, 3, seed=args.seed).frames[0], f"synthetic {h}x{w}"


def _build(ours: bool, model: str, image_size: int, device: torch.device, weights, checkpoint):
    if ours:
        from sam2_fast.build_sam import build_sam2
    else:
        from sam2.build_sam import build_sam2
    over = [f"++model.image_size={image_size}"] if image_size else []
    m = build_sam2(impls.config_for(model), checkpoint, device=device, hydra_overrides_extra=over)
    if weights is not None:
        m.load_state_dict(weights)
    return m.eval()


def _generator(ours: bool, model, **kwargs):
    if ours:
        from sam2_fast.automatic_mask_generator import SAM2AutomaticMaskGenerator
        return SAM2AutomaticMaskGenerator(model, **kwargs)
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    gen = SAM2AutomaticMaskGenerator(model, **kwargs)
    s = model.image_size  # the reference hard-codes the backbone sizes of a 1024 input
    gen.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return gen


def accuracy(records: List[dict], golden: List[dict], device: torch.device) -> Dict[str, float]:
    """Each golden mask's best IoU among ``records`` (mean, min), count and score errors."""
    out = {"count_diff": float(len(records) - len(golden))}
    if not golden:
        return {**out, "miou": 1.0 if not records else 0.0, "min_iou": 1.0 if not records else 0.0, "score_err": 0.0}
    if not records:
        return {**out, "miou": 0.0, "min_iou": 0.0, "score_err": float("nan")}
    g = torch.from_numpy(np.stack([r["segmentation"] for r in golden]).reshape(len(golden), -1))
    o = torch.from_numpy(np.stack([r["segmentation"] for r in records]).reshape(len(records), -1))
    inter = torch.zeros(len(golden), len(records), dtype=torch.float64, device=device)
    step = 1 << 18  # pixels per chunk: keeps the float copies small at 1080p x thousands of masks
    for s in range(0, g.shape[1], step):
        a = g[:, s:s + step].to(device, torch.float32)
        b = o[:, s:s + step].to(device, torch.float32)
        inter += (a @ b.T).double()  # exact: chunk counts < 2**24
    area_g, area_o = g.sum(1).to(device).double(), o.sum(1).to(device).double()
    iou = inter / (area_g[:, None] + area_o[None, :] - inter).clamp(min=1)
    best, idx = iou.max(dim=1)
    scores_g = torch.tensor([r["predicted_iou"] for r in golden], dtype=torch.float64)
    scores_o = torch.tensor([r["predicted_iou"] for r in records], dtype=torch.float64)
    return {**out, "miou": float(best.mean()), "min_iou": float(best.min()),
            "score_err": float((scores_o[idx.cpu()] - scores_g).abs().max())}


def _run_row(key: str, ours: bool, autocast: bool, gen_kwargs: dict, args, image, weights, device, golden):
    res: Dict[str, Any] = {"key": key, "impl": "sam2_fast" if ours else "sam2==1.1.0", "status": "ok"}
    try:
        model = _build(ours, args.model, args.image_size, device, weights, args.checkpoint)
        gen = _generator(ours, model, output_mode="binary_mask", **gen_kwargs)
        ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with ctx(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the reference's missing-extension warning
            records = gen.generate(image)  # warm-up; its masks are the accuracy sample
            if cuda:
                torch.cuda.synchronize()
            res["warmup_s"] = time.perf_counter() - t0
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                gen.generate(image)
                if cuda:
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t) * 1e3)
        ms = statistics.median(times)
        res.update(ms_per_image=ms, masks=len(records), masks_per_s=len(records) / (ms / 1e3),
                   peak_host_mib=host_rss_mib(),
                   peak_device_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else None)
        if golden is not None:
            res.update(accuracy(records, golden, device))
        else:
            res.update(miou=1.0, min_iou=1.0, count_diff=0.0, score_err=0.0)
        return res, records
    except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
        res.update(status="error", reason=f"{type(exc).__name__}: {exc}")
        return res, None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def table(rows: List[Dict[str, Any]]) -> str:
    header = ("row", "impl", "ms/image", "masks/s", "masks", "dev MiB", "host MiB", "mIoU", "min IoU",
              "score err", "note")
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append((r["key"], r["impl"], "error", "", "", "", "", "", "", "", (r.get("reason") or "")[:90]))
            continue
        note = "golden" if r["key"] == "ref-fp32" else f"vs ref-fp32, count {r['count_diff']:+.0f}"
        lines.append((r["key"], r["impl"], _fmt(r["ms_per_image"]), _fmt(r["masks_per_s"]), r["masks"],
                      _fmt(r.get("peak_device_mib"), 0), _fmt(r.get("peak_host_mib"), 0), _fmt(r["miou"], 4),
                      _fmt(r["min_iou"], 4), f"{r['score_err']:.1e}", note))
    return _table(header, lines)


def write(out_dir: str, stem: str, meta: dict, case: dict, rows: List[dict]) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, stem + ".json"), "csv": os.path.join(out_dir, stem + ".csv")}
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "case": case, "rows": rows}, f, indent=1, default=str)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(meta) + list(case) + list(CSV_ROW))
        for r in rows:
            w.writerow(list(meta.values()) + list(case.values()) + [r.get(k) for k in CSV_ROW])
    return paths


def run(args, device: torch.device, log=print) -> List[Dict[str, Any]]:
    import datetime as _dt

    cuda = device.type == "cuda"
    if args.repeats is None:
        args.repeats = 3 if cuda else 1
    pps = args.points_per_side or (32 if cuda else 8)
    try:
        impls.config_for(args.model)
        image, source = load_image(args)
        if pps < 1:
            raise ValueError(f"--points-per-side must be positive, got {pps}")
    except ValueError as exc:
        raise SystemExit(f"sam2-fast bench: error: {exc}") from None
    if args.amg_settings == "auto":
        args.amg_settings = "official" if args.checkpoint else "random-weights"
    gen_kwargs = dict(points_per_side=pps, **SETTINGS[args.amg_settings])
    weights = None
    if not args.checkpoint:
        from sam2_fast.utils.random_weights import sensitize_

        torch.manual_seed(args.seed)
        m = _build(True, args.model, args.image_size, torch.device("cpu"), None, None)
        weights = {k: v.clone() for k, v in sensitize_(m, seed=args.seed).state_dict().items()}
        del m
    rows_spec = [("ref-fp32", False, False, {}), ("amg-fp32", True, False, {})]
    if cuda:
        rows_spec += [("ref-bf16", False, True, {}), ("amg-bf16", True, True, {}),
                      ("amg-bf16-autobatch", True, True, {"points_per_batch": None})]
    meta = environment(device)
    case = {"task": "amg", "model": args.model, "image_size": args.image_size or None, "image": source,
            "height": int(image.shape[0]), "width": int(image.shape[1]), "points_per_side": pps,
            "settings": args.amg_settings, "repeats": args.repeats, "device": str(device)}
    log(f"sam2-fast bench --task amg on {meta['card']} | torch {meta['torch']} | commit {meta['commit']}\n"
        f"case: {args.model}, image_size {args.image_size or 'model default'}, {source}, {pps}x{pps} points, "
        f"{args.amg_settings} settings")
    rows, golden = [], None
    for key, ours, autocast, extra in rows_spec:
        res, records = _run_row(key, ours, autocast, {**gen_kwargs, **extra}, args, image, weights, device, golden)
        if key == "ref-fp32":
            golden = records
        rows.append(res)
        log(f"  {key}: " + (f"{res['ms_per_image']:.1f} ms/image, {res['masks']} masks" if res["status"] == "ok"
                            else res["reason"]))
    if golden is not None and not golden:
        log("  note: the reference kept no masks with these settings, so the accuracy columns compare "
            "nothing and the timings leave out the post-processing; try --amg-settings random-weights or all")
    log("\n" + table(rows))
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    paths = write(f"{args.out}/{card_slug(device)}", f"amg_{args.model}_{image.shape[0]}x{image.shape[1]}_{stamp}",
                  meta, case, rows)
    log(f"wrote {paths['json']} and {paths['csv']}")
    return [{"case": case, "rows": rows, "paths": paths}]
