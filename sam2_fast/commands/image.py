"""``sam2-fast segment`` (clicks / a box on an image -> a mask) and ``sam2-fast amg``
(every object of an image -> masks)."""

from __future__ import annotations

import argparse
import os
from typing import List

import numpy as np
import torch

from sam2_fast.commands import outputs as O
from sam2_fast.commands.models import (CliError, add_model_args, find_checkpoint, load_model, overrides, pick_device,
                                       resolve_model)
from sam2_fast.commands.prompts import parse_image_box, parse_image_point

SEGMENT_EXAMPLES = """examples:
  sam2-fast segment photo.jpg --point 500,375 --out mask.png
  sam2-fast segment photo.jpg --point 500,375 --point 420,300:0 --out mask.png --multimask
  sam2-fast segment photo.jpg --box 75,275,1725,850 --out mask.json     (COCO RLE)
"""
AMG_EXAMPLES = """examples:
  sam2-fast amg photo.jpg --out masks/
  sam2-fast amg photo.jpg --out masks/ --format coco_rle --points-per-side 16 --crop-n-layers 1
"""


def load_image(path: str) -> np.ndarray:
    from PIL import Image

    if not os.path.exists(path):
        raise CliError(f"image not found: {path}")
    if os.path.isdir(path):
        raise CliError(f"{path} is a folder; give an image file")
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # a writable copy
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise CliError(f"cannot read image {path}: {exc}") from None


def _build_model(args):
    from sam2_fast.build_sam import build_sam2

    info = resolve_model(args.model)
    ckpt = find_checkpoint(info, args.checkpoint)
    device = pick_device(args.device)
    return load_model(build_sam2, info, ckpt, device=device, hydra_overrides_extra=overrides(args.image_size))


# ----------------------------------------------------------------------------- segment
def build_segment_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="an image file (any format PIL reads)")
    add_model_args(p)
    p.add_argument("--point", action="append", default=[], metavar="X,Y[:LABEL]",
                   help="a click at pixel X,Y; LABEL 1 (default) = foreground, 0 = background; repeatable")
    p.add_argument("--box", default=None, metavar="X0,Y0,X1,Y1", help="a box prompt")
    p.add_argument("--out", required=True, help="mask.png (0/255 PNG) or mask.json (COCO RLE)")
    p.add_argument("--multimask", action="store_true",
                   help="write all three candidates (OUT_0, OUT_1, OUT_2, best first) with their scores")


def _segment_outputs(out: str, multimask: bool, n: int) -> List[str]:
    stem, ext = os.path.splitext(out)
    if ext.lower() not in (".png", ".json"):
        raise CliError(f"--out {out}: use a .png (mask image) or .json (COCO RLE) file name")
    return [f"{stem}_{k}{ext}" for k in range(n)] if multimask else [out]


def run_segment(args: argparse.Namespace, log=print) -> int:
    points = [parse_image_point(t) for t in args.point]
    box = parse_image_box(args.box) if args.box else None
    if not points and box is None:
        raise CliError("no prompt given: add --point X,Y (repeatable) and/or --box X0,Y0,X1,Y1")
    _segment_outputs(args.out, args.multimask, 3)  # name checks before any work
    image = load_image(args.image)
    if args.out.lower().endswith(".json"):
        from sam2_fast.utils.amg import require_pycocotools

        require_pycocotools()
    O.prepare_out_file(args.out)
    h, w = image.shape[:2]
    for x, y, _ in points:
        if x > w or y > h:
            raise CliError(f"--point {x:g},{y:g} lies outside the {w}x{h} image")
    if box is not None and (box[2] > w or box[3] > h):
        raise CliError(f"--box {args.box} lies outside the {w}x{h} image")
    from sam2_fast.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(_build_model(args))
    predictor.set_image(image)
    # one click alone is ambiguous: the official advice is three candidates, keep the best
    multi = args.multimask or (len(points) == 1 and box is None)
    masks, scores, _ = predictor.predict(
        point_coords=np.array([p[:2] for p in points], np.float32) if points else None,
        point_labels=np.array([p[2] for p in points], np.int32) if points else None,
        box=np.array(box, np.float32) if box else None, multimask_output=multi)
    order = np.argsort(-scores, kind="stable")
    if not args.multimask:
        order = order[:1]
    paths = _segment_outputs(args.out, args.multimask, len(order))
    for path, k in zip(paths, order):
        mask = masks[k].astype(bool)
        if path.lower().endswith(".json"):
            (rle,) = O.coco_rles(mask[None])
            O.write_json(path, {"height": h, "width": w, "score": float(scores[k]), "segmentation": rle,
                                "area": int(mask.sum()), "bbox": O.mask_boxes(mask[None])[0]})
        else:
            O.write_png(path, _binary_png(mask))
        log(f"score {scores[k]:.4f}, area {int(mask.sum())} px -> {path}")
    return 0


def _binary_png(mask: np.ndarray):
    from PIL import Image

    return Image.fromarray(mask.astype(np.uint8) * 255, mode="L")


# ----------------------------------------------------------------------------- amg
def build_amg_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="an image file (any format PIL reads)")
    add_model_args(p)
    p.add_argument("--out", required=True, help="output folder: masks.json (index) and mask_NNNN.png")
    p.add_argument("--format", default="png", choices=("png", "coco_rle"),
                   help="png: one 0/255 PNG per mask; coco_rle: masks inside masks.json as COCO RLE")
    g = p.add_argument_group("generator options (as SAM2AutomaticMaskGenerator)")
    g.add_argument("--points-per-side", type=int, default=32)
    g.add_argument("--points-per-batch", type=int, default=None, help="default: the largest batch that fits")
    g.add_argument("--pred-iou-thresh", type=float, default=0.8)
    g.add_argument("--stability-score-thresh", type=float, default=0.95)
    g.add_argument("--box-nms-thresh", type=float, default=0.7)
    g.add_argument("--crop-n-layers", type=int, default=0)
    g.add_argument("--min-mask-region-area", type=int, default=0)
    g.add_argument("--use-m2m", action="store_true")


def run_amg(args: argparse.Namespace, log=print) -> int:
    from sam2_fast.automatic_mask_generator import SAM2AutomaticMaskGenerator

    image = load_image(args.image)
    out = O.prepare_out_dir(args.out)
    mode = "coco_rle" if args.format == "coco_rle" else "binary_mask"
    try:
        kwargs = dict(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
                      pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
                      box_nms_thresh=args.box_nms_thresh, crop_n_layers=args.crop_n_layers,
                      min_mask_region_area=args.min_mask_region_area, use_m2m=args.use_m2m, output_mode=mode)
        gen = SAM2AutomaticMaskGenerator(_build_model(args), **kwargs)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    with torch.inference_mode():
        records = gen.generate(image)
    index = []
    for i, rec in enumerate(records):
        entry = {k: v for k, v in rec.items() if k != "segmentation"}
        entry["id"] = i
        if mode == "coco_rle":
            entry["segmentation"] = rec["segmentation"]
        else:
            entry["file"] = f"mask_{i:04d}.png"
            O.write_png(os.path.join(out, entry["file"]), _binary_png(rec["segmentation"]))
        index.append(entry)
    h, w = image.shape[:2]
    O.write_json(os.path.join(out, "masks.json"), {"image": os.path.abspath(args.image), "height": h, "width": w,
                                                   "masks": index})
    log(f"{len(records)} masks -> {os.path.join(out, 'masks.json')}" + ("" if mode == "coco_rle" else " and PNGs"))
    return 0
