"""The drop-in ``SAM2AutomaticMaskGenerator`` ("segment everything").

Same constructor, ``generate`` records and ``from_pretrained`` as
``sam2.automatic_mask_generator``; swap the import. It runs on our image predictor (one
model, one decode path): a grid of single-click prompts per crop, the image embedding
computed once per crop, then filtering by predicted IoU and stability, box NMS within and
across crops.

Where the work differs from the official loop (same results):

* the per-batch post-processing runs on the model's device and over the whole batch at
  once: stability scores, thresholding, boxes, the crop-edge filter, the uncrop padding
  and RLE encoding (``sam2_fast.utils.amg.mask_to_rle_pytorch``, one host transfer per
  batch instead of one sync per mask);
* the low-res logits are not carried along in the per-crop data (the official code keeps
  every batch's (N, 256, 256) logits until the crop is done);
* ``points_per_batch=None`` picks the largest batch that fits (see ``_auto_points_per_batch``):
  a 32x32 grid then goes through the decoder in one call on a large GPU.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .image_prompts import Prompts
from .sam2_image_predictor import SAM2ImagePredictor
from .utils import amg as A
from .utils.transforms import image_to_rgb_hwc

# the official module re-exports its helpers' names (SAM2Base, the utils.amg functions) and
# code imports them from here: every public name of our utils.amg (a superset) comes along
from .modeling.sam2_base import SAM2Base  # noqa: E402,F401
from .utils.amg import *  # noqa: E402,F401,F403

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
# keyword arguments of from_pretrained that build the model rather than the generator
_MODEL_KWARGS = ("device", "mode", "hydra_overrides_extra", "apply_postprocessing", "image_size")


def _torchvision_ops():
    try:
        from torchvision.ops.boxes import batched_nms, box_area
    except ImportError as exc:
        raise ImportError("SAM2AutomaticMaskGenerator needs torchvision for box NMS: "
                          "pip install torchvision") from exc
    return batched_nms, box_area


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    batched_nms, _ = _torchvision_ops()
    return batched_nms(boxes.float(), scores, torch.zeros_like(boxes[:, 0]), iou_threshold=iou_threshold)


# The official constructor's keywords, in its positional order, with their defaults: the one
# table behind the generator's signature (``inspect.signature`` shows the official one), its
# binding of positional / keyword arguments and its attributes (``gen.pred_iou_thresh``, ...).
OPTIONS: Tuple[Tuple[str, Any], ...] = (
    ("points_per_side", 32), ("points_per_batch", 64), ("pred_iou_thresh", 0.8),
    ("stability_score_thresh", 0.95), ("stability_score_offset", 1.0), ("mask_threshold", 0.0),
    ("box_nms_thresh", 0.7), ("crop_n_layers", 0), ("crop_nms_thresh", 0.7),
    ("crop_overlap_ratio", 512 / 1500), ("crop_n_points_downscale_factor", 1), ("point_grids", None),
    ("min_mask_region_area", 0), ("output_mode", "binary_mask"), ("use_m2m", False),
    ("multimask_output", True),
)
_KEYWORD = inspect.Parameter.POSITIONAL_OR_KEYWORD
_SIGNATURE = inspect.Signature(
    [inspect.Parameter("self", _KEYWORD), inspect.Parameter("model", _KEYWORD)]
    + [inspect.Parameter(name, _KEYWORD, default=value) for name, value in OPTIONS]
    + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])


def _point_grids(o: SimpleNamespace) -> List[np.ndarray]:
    """One (N, 2) grid of [0, 1] click positions per crop layer, checked."""
    if (o.points_per_side is None) == (o.point_grids is None):
        raise ValueError("Exactly one of points_per_side or point_grids must be provided.")
    layers = int(o.crop_n_layers)
    if o.point_grids is not None:
        grids = [np.asarray(g, dtype=np.float64) for g in o.point_grids]
        if len(grids) < layers + 1:
            raise ValueError(f"point_grids has {len(grids)} grids but crop_n_layers={o.crop_n_layers} needs one "
                             f"per layer ({layers + 1})")
        for i, g in enumerate(grids):
            if g.ndim != 2 or g.shape[1] != 2 or len(g) == 0 or g.min() < 0 or g.max() > 1:
                raise ValueError(f"point_grids[{i}] must be a non-empty (N, 2) array of [0, 1] "
                                 f"coordinates, got shape {g.shape}")
        return grids
    if int(o.points_per_side) < 1:
        raise ValueError(f"points_per_side must be a positive integer, got {o.points_per_side}")
    if layers < 0:
        raise ValueError(f"crop_n_layers must be >= 0, got {o.crop_n_layers}")
    factor = int(o.crop_n_points_downscale_factor)
    if factor < 1:
        raise ValueError(f"crop_n_points_downscale_factor must be >= 1, got {o.crop_n_points_downscale_factor}")
    grids = A.build_all_layer_point_grids(int(o.points_per_side), layers, factor)
    empty = next((i for i, g in enumerate(grids) if len(g) == 0), None)
    if empty is not None:
        raise ValueError(f"points_per_side={o.points_per_side} leaves no points in crop layer {empty} after "
                         f"downscaling by {o.crop_n_points_downscale_factor} per layer")
    return grids


class SAM2AutomaticMaskGenerator:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Arguments as the official generator (see ``OPTIONS`` and its docstring);
        additionally ``points_per_batch=None`` chooses the largest batch that fits in memory.

        ``min_mask_region_area`` > 0 removes holes and specks up to that area (in low-res
        mask pixels) before upsampling, through the image predictor, as the official
        generator does; it needs no compiled extension here. Unknown keywords are ignored,
        as the official constructor's ``**kwargs`` are.
        """
        bound = _SIGNATURE.bind(self, *args, **kwargs)
        bound.apply_defaults()
        o = SimpleNamespace(**{name: bound.arguments[name] for name, _ in OPTIONS})
        grids = _point_grids(o)
        if o.output_mode not in OUTPUT_MODES:
            raise ValueError(f"Unknown output_mode {o.output_mode!r}; use one of {', '.join(OUTPUT_MODES)}")
        if o.output_mode == "coco_rle":
            A.require_pycocotools()
        if o.points_per_batch is not None and int(o.points_per_batch) < 1:
            raise ValueError(f"points_per_batch must be positive (or None for automatic), got {o.points_per_batch}")
        _torchvision_ops()  # fail now, not after the first crop, when torchvision is missing
        vars(self).update(vars(o))
        self.point_grids = grids
        self.points_per_batch = None if o.points_per_batch is None else int(o.points_per_batch)
        self.crop_n_layers = int(o.crop_n_layers)
        self.predictor = SAM2ImagePredictor(bound.arguments["model"], max_hole_area=o.min_mask_region_area,
                                            max_sprinkle_area=o.min_mask_region_area)

    __init__.__signature__ = _SIGNATURE  # type: ignore[attr-defined]

    @classmethod
    def from_pretrained(cls, model_id: str, **kwargs) -> "SAM2AutomaticMaskGenerator":
        """Build the model of an official Hugging Face id (local checkpoint first) and a
        generator on it; model keywords (device, image_size, ...) go to the builder."""
        from .build_sam import build_sam2_hf

        model_kwargs = {k: kwargs.pop(k) for k in _MODEL_KWARGS if k in kwargs}
        return cls(build_sam2_hf(model_id, **model_kwargs), **kwargs)

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def generate(self, image) -> List[Dict[str, Any]]:
        """Masks for an HWC RGB image: uint8 (0..255) or float (0.0..1.0) numpy, as the official
        generator takes (it embeds each crop with ``set_image``); PIL, grayscale and RGBA are
        converted.

        Records: segmentation (HW bool array, or an RLE dict per ``output_mode``), area,
        bbox (XYWH), predicted_iou, point_coords ([[x, y]]), stability_score, crop_box (XYWH).
        """
        image = image_to_rgb_hwc(image).cpu().numpy()  # checks; (H, W, 3) uint8 or float32
        data = self._generate_masks(image)
        rles = data["rles"]
        if self.output_mode == "coco_rle":
            segs = self._coco_encode(rles)
        elif self.output_mode == "binary_mask":
            segs = [A.rle_to_mask(rle) for rle in rles]
        else:
            segs = rles
        boxes = np.asarray(data["boxes"], dtype=np.float32).reshape(-1, 4)
        crops = np.asarray(data["crop_boxes"], dtype=np.float32).reshape(-1, 4)
        for b in (boxes, crops):  # XYXY -> XYWH, the same float32 subtraction as the official code
            b[:, 2:] -= b[:, :2]
        areas = np.asarray(data["areas"]).astype(np.int64).tolist()
        ious, stab = data["iou_preds"].tolist(), data["stability_score"].tolist()
        points = data["points"].tolist()
        boxes_l, crops_l = boxes.tolist(), crops.tolist()
        return [
            {"segmentation": segs[i], "area": areas[i], "bbox": boxes_l[i], "predicted_iou": ious[i],
             "point_coords": [points[i]], "stability_score": stab[i], "crop_box": crops_l[i]}
            for i in range(len(rles))
        ]

    @staticmethod
    def _coco_encode(rles: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        if not rles:
            return []
        mask_utils = A.require_pycocotools()
        h, w = rles[0]["size"]
        out = mask_utils.frPyObjects(rles, h, w)  # one call for the whole list
        for r in out:
            r["counts"] = r["counts"].decode("utf-8")  # JSON-serialisable, as the official output
        return out

    # ------------------------------------------------------------------ crops
    def _generate_masks(self, image: np.ndarray) -> A.MaskData:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = A.generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        data = A.MaskData()
        for crop_box, layer_idx in zip(crop_boxes, layer_idxs):
            data.cat(self._process_crop(image, crop_box, layer_idx, orig_size))
        if len(crop_boxes) > 1 and len(data["rles"]) > 0:
            # duplicates between crops: prefer masks from smaller crops
            _, box_area = _torchvision_ops()
            scores = (1 / box_area(data["crop_boxes"])).to(data["boxes"].device)
            data.filter(_nms(data["boxes"], scores, self.crop_nms_thresh))
        areas = data["areas"].cpu().numpy()  # int64: to_numpy would make it float32
        data.to_numpy()
        data["areas"] = areas
        return data

    def _process_crop(self, image: np.ndarray, crop_box: List[int], crop_layer_idx: int,
                      orig_size: Tuple[int, ...]) -> A.MaskData:
        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        crop_hw = cropped.shape[:2]
        self.predictor.set_image(cropped)  # the embedding: once per crop
        points = self.point_grids[crop_layer_idx] * np.array(crop_hw)[None, ::-1]  # (P, 2) crop pixels
        batch = self.points_per_batch or self._auto_points_per_batch(crop_hw)
        data = A.MaskData()
        for (pts,) in A.batch_iterator(batch, points):
            data.cat(self._process_batch(pts, crop_hw, crop_box, orig_size, normalize=True))
        self.predictor.reset_predictor()
        if len(data["rles"]) > 0:  # duplicates within the crop
            data.filter(_nms(data["boxes"], data["iou_preds"], self.box_nms_thresh))
        data["boxes"] = A.uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = A.uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box], device=data["boxes"].device).expand(len(data["rles"]), 4)
        return data

    def _auto_points_per_batch(self, crop_hw: Tuple[int, int]) -> int:
        """The largest point batch whose working set fits a memory budget (at most 1024)."""
        dev = self.predictor.device
        c = 3 if self.multimask_output else 1
        s = self.predictor.model.image_size
        # per point: C fp32 logit maps at crop size, about as much again in bool/float
        # temporaries of the post-processing; plus the decoder's activations (~40 MB per
        # prompt at 1024: the repeated 64x64x256 embedding, keys, the 4x upscaled maps)
        per_point = c * crop_hw[0] * crop_hw[1] * 10 + 40 * 2**20 * (s / 1024) ** 2
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            budget = 0.4 * free
        else:
            budget = 2**30  # host: bigger batches gain nothing on a CPU, so stay small
        return int(max(1, min(1024, budget // per_point)))

    # ------------------------------------------------------------------ one batch of points
    def _decode(self, coords: torch.Tensor, labels: torch.Tensor, mask_input: Optional[torch.Tensor],
                multimask: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """The image predictor's decoder for (B, 1, 2) model-frame clicks: raw low-res logits
        (B, C, h, w) and predicted IoU (B, C). Nothing is upsampled here: most candidates
        fail the IoU / stability filters, so only the kept ones are brought to crop size."""
        prompts = Prompts(coords=coords, labels=labels, boxes=None, mask=mask_input)
        feats, _ = self.predictor._ready_state("set_image")
        return self.predictor._decode_low_res(prompts, multimask, feats)

    def _upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        """(n, h, w) low-res logits -> (n, H, W) logits at the crop's size (the predictor's own
        post-processing; per mask, so filtering first changes no kept mask)."""
        _, orig_hw = self.predictor._ready_state("set_image")
        return self.predictor._transforms.postprocess_masks(low_res[:, None], orig_hw[-1])[:, 0]

    def _process_batch(self, points: np.ndarray, im_size: Tuple[int, ...], crop_box: List[int],
                       orig_size: Tuple[int, ...], normalize: bool = False) -> A.MaskData:
        orig_h, orig_w = orig_size
        dev = self.predictor.device
        pts = torch.as_tensor(points, dtype=torch.float32, device=dev)  # (B, 2) crop pixels
        in_pts = self.predictor._transforms.transform_coords(pts, normalize=normalize, orig_hw=im_size)
        labels = torch.ones(in_pts.shape[0], 1, dtype=torch.int32, device=dev)
        low_res, iou = self._decode(in_pts[:, None, :], labels, None, self.multimask_output)
        c = low_res.shape[1]
        low_res, iou = low_res.flatten(0, 1), iou.flatten(0, 1)  # (N, h, w), (N,)
        pts = pts.repeat_interleave(c, dim=0)  # (N, 2)
        if self.use_m2m:  # one refinement step with each (clamped, as the official) mask as the prompt
            in_pts = self.predictor._transforms.transform_coords(pts, normalize=normalize, orig_hw=im_size)
            low_res, iou = self._refine_low_res(in_pts, torch.ones(len(pts), dtype=torch.int32, device=dev),
                                                low_res.clamp(-32.0, 32.0), self.points_per_batch or len(pts))
            low_res, iou = low_res.squeeze(1), iou.squeeze(1)
        if self.pred_iou_thresh > 0.0:
            keep = iou > self.pred_iou_thresh
            low_res, iou, pts = low_res[keep], iou[keep], pts[keep]
        masks = self._upsample(low_res)  # (n, H, W): only the candidates that passed the IoU filter
        del low_res
        stability = A.calculate_stability_score(masks, self.mask_threshold, self.stability_score_offset)
        if self.stability_score_thresh > 0.0:
            keep = stability >= self.stability_score_thresh
            masks, iou, pts, stability = masks[keep], iou[keep], pts[keep], stability[keep]
        binary = masks > self.mask_threshold  # (n, h, w)
        del masks
        boxes = A.batched_mask_to_box(binary).long()  # (n, 4) XYXY crop pixels
        keep = ~A.is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
        binary, iou, pts, stability, boxes = binary[keep], iou[keep], pts[keep], stability[keep], boxes[keep]
        areas = binary.sum(dim=(1, 2))  # (n,) = the RLE's foreground count
        full = A.uncrop_masks(binary, crop_box, orig_h, orig_w)  # (n, H, W)
        return A.MaskData(iou_preds=iou, points=pts, stability_score=stability, boxes=boxes, areas=areas,
                          rles=A.mask_to_rle_pytorch(full))

    def refine_with_m2m(self, points: torch.Tensor, point_labels: torch.Tensor, low_res_masks: torch.Tensor,
                        points_per_batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode each (model-frame) point again with its own low-res mask as the mask
        prompt, single-mask output: (N, 1, H, W) logits and (N, 1) predicted IoU (the
        official method's results; the generator itself upsamples after filtering)."""
        low_res, iou = self._refine_low_res(points, point_labels, low_res_masks, points_per_batch)
        return self._upsample(low_res[:, 0])[:, None], iou

    def _refine_low_res(self, points: torch.Tensor, point_labels: torch.Tensor, low_res_masks: torch.Tensor,
                        points_per_batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`refine_with_m2m` before upsampling: (N, 1, h, w) raw logits, (N, 1) IoU."""
        new_masks, new_ious = [], []
        for cur_pts, cur_labels, low in A.batch_iterator(points_per_batch, points, point_labels, low_res_masks):
            m, i = self._decode(cur_pts[:, None, :], cur_labels[:, None], low[:, None], False)
            new_masks.append(m)
            new_ious.append(i)
        return torch.cat(new_masks, dim=0), torch.cat(new_ious, dim=0)

    @staticmethod
    def postprocess_small_regions(mask_data: A.MaskData, min_area: int, nms_thresh: float) -> A.MaskData:
        """Remove small islands and holes from each mask, then NMS again (unchanged masks
        preferred). Edits ``mask_data`` in place, as the official method; no OpenCV needed."""
        if len(mask_data["rles"]) == 0:
            return mask_data
        new_masks, scores = [], []
        for rle in mask_data["rles"]:
            mask = A.rle_to_mask(rle)
            mask, changed_h = A.remove_small_regions(mask, min_area, mode="holes")
            mask, changed_i = A.remove_small_regions(mask, min_area, mode="islands")
            new_masks.append(torch.as_tensor(np.ascontiguousarray(mask)).unsqueeze(0))
            scores.append(float(not (changed_h or changed_i)))
        masks = torch.cat(new_masks, dim=0)
        boxes = A.batched_mask_to_box(masks)
        keep = _nms(boxes, torch.as_tensor(scores), nms_thresh)
        changed = [int(i) for i in keep if scores[int(i)] == 0.0]
        if changed:
            for i, rle in zip(changed, A.mask_to_rle_pytorch(masks[changed])):
                mask_data["rles"][i] = rle
                mask_data["boxes"][i] = boxes[i]
                if "areas" in mask_data:
                    mask_data["areas"][i] = masks[i].sum()
        mask_data.filter(keep)
        return mask_data
