"""The drop-in ``SAM2ImagePredictor``: embed an image once, then answer many prompts.

Same constructor, methods, return types and state attributes as
``sam2.sam2_image_predictor``. The state is what the official predictor keeps, as plain
attributes that code written for it reads and writes:

* ``_features``: ``{"image_embed": (B, C, S/16, S/16), "high_res_feats": [(B, C/8, S/4, S/4),
  (B, C/4, S/8, S/8)]}`` (a dict; the no-memory embedding is already added);
* ``_orig_hw``: ``[(H, W), ...]``, one per image; ``_is_image_set``; ``_is_batch``.

So the common embedding cache works unchanged::

    saved = predictor._features, predictor._orig_hw
    ...
    predictor._features, predictor._orig_hw = saved
    predictor._is_image_set = True

Prompts are checked in ``sam2_fast.image_prompts`` (clear errors instead of deep torch
tracebacks); a state set by hand is checked before use.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, TypedDict

import numpy as np
import torch

from .image_prompts import Prompts, PromptError, check_box, check_mask, check_points
from .utils import transforms as T
from .modeling.sam2_base import SAM2Base  # noqa: F401  (importable from here, as in sam2)
from .utils.transforms import SAM2Transforms  # noqa: F401  (importable from here, as in sam2)


class ImageFeatures(TypedDict):
    """``SAM2ImagePredictor._features``: backbone features of the images set."""

    image_embed: torch.Tensor  # (B, C, S/16, S/16), no-memory embedding already added
    high_res_feats: List[torch.Tensor]  # [(B, C/8, S/4, S/4), (B, C/4, S/8, S/8)]


class SAM2ImagePredictor:
    def __init__(self, sam_model, mask_threshold: float = 0.0, max_hole_area: float = 0.0,
                 max_sprinkle_area: float = 0.0, **kwargs) -> None:
        self.model = sam_model
        self.mask_threshold = mask_threshold
        self._transforms = T.SAM2Transforms(
            resolution=self.model.image_size, mask_threshold=mask_threshold,
            max_hole_area=max_hole_area, max_sprinkle_area=max_sprinkle_area,
        )
        # (H, W) of the three backbone levels, highest resolution first; derived from the
        # model's input size so any image_size works (the official predictor hard-codes 1024's)
        s = self.model.image_size
        self._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
        # predictor state: plain attributes, as in the official predictor (see module docstring)
        self._is_image_set = False
        self._features: Optional[ImageFeatures] = None
        self._orig_hw: Optional[List[Tuple[int, int]]] = None
        self._is_batch = False

    @classmethod
    def from_pretrained(cls, model_id: str, **kwargs) -> "SAM2ImagePredictor":
        from .build_sam import build_sam2_hf

        return cls(build_sam2_hf(model_id, **kwargs), **kwargs)

    # ------------------------------------------------------------------ state
    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_predictor(self) -> None:
        self._is_image_set = False
        self._features = None
        self._orig_hw = None
        self._is_batch = False

    def _ready_state(self, setter: str) -> Tuple[ImageFeatures, List[Tuple[int, int]]]:
        """(features, orig_hw) after checking a state that may have been restored by hand."""
        if not self._is_image_set:
            raise RuntimeError(f"An image must be set with .{setter}(...) before mask prediction.")
        feats, orig_hw = self._features, self._orig_hw
        if not isinstance(feats, dict) or "image_embed" not in feats or "high_res_feats" not in feats:
            raise RuntimeError("_is_image_set is True but _features is not a dict with 'image_embed' and "
                               f"'high_res_feats' (got {type(feats).__name__}); restore both from the "
                               "same predictor state")
        n = feats["image_embed"].shape[0]
        if orig_hw is None or len(orig_hw) != n:
            raise RuntimeError(f"_orig_hw must list the (H, W) of each of the {n} embedded image(s), got "
                               f"{orig_hw!r}")
        return feats, [(int(hw[0]), int(hw[1])) for hw in orig_hw]

    # ------------------------------------------------------------------ embedding
    @torch.no_grad()
    def _embed(self, batch: torch.Tensor) -> ImageFeatures:
        # batch: (B, 3, S, S) normalised
        backbone_out = self.model.forward_image(batch)
        _, vision_feats, _, _ = self.model._prepare_backbone_features(backbone_out)
        # vision_feats: per level (H*W, B, C), highest resolution first
        if self.model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        maps = [f.permute(1, 2, 0).reshape(f.shape[1], f.shape[2], h, w)
                for f, (h, w) in zip(vision_feats, self._bb_feat_sizes)]
        return {"image_embed": maps[-1], "high_res_feats": maps[:-1]}

    @torch.no_grad()
    def set_image(self, image) -> None:
        """Embed one RGB image: an HWC numpy array (or torch tensor), or a PIL image.

        uint8 pixels are 0..255; float pixels (float16/32/64) are 0.0..1.0 and give the same
        embedding as ``uint8 / 255`` (as with the official predictor). Float values outside
        [0, 1] (e.g. a 0..255 float image) are rejected by name. Grayscale is replicated to
        RGB, an alpha channel is dropped.
        """
        self.reset_predictor()
        batch = self._transforms(image)[None].to(self.device)  # (1, 3, S, S); checks the image
        self._features = self._embed(batch)
        self._orig_hw = [T.image_hw(image)]
        self._is_image_set = True

    @torch.no_grad()
    def set_image_batch(self, image_list: Sequence[np.ndarray]) -> None:
        """Embed several images (a list of HWC arrays, as in ``set_image``) for ``predict_batch``."""
        self.reset_predictor()
        if not isinstance(image_list, (list, tuple)) or len(image_list) == 0:
            raise TypeError("set_image_batch expects a non-empty list of HWC images")
        batch = self._transforms.forward_batch(image_list).to(self.device)  # (B, 3, S, S)
        self._features = self._embed(batch)
        self._orig_hw = [T.image_hw(im) for im in image_list]
        self._is_image_set = True
        self._is_batch = True

    def get_image_embedding(self) -> torch.Tensor:
        if not self._is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
        return self._ready_state("set_image")[0]["image_embed"]

    # ------------------------------------------------------------------ prompts
    def _user_prompts(self, point_coords, point_labels, box, mask_logits, normalize_coords,
                      orig_hw: Tuple[int, int]) -> Prompts:
        dev = self.device
        coords = labels = boxes = mask = None
        if point_coords is not None:
            # no clicks yet beside a box (an interactive demo's empty click list) is the box
            # alone, as in the official predictor; empty points with nothing else stay an error
            c, lab = check_points(point_coords, point_labels, allow_empty=box is not None)
            if c.shape[1] > 0:
                coords = self._transforms.transform_coords(
                    torch.as_tensor(c, dtype=torch.float32, device=dev), normalize=normalize_coords, orig_hw=orig_hw)
                labels = torch.as_tensor(lab, dtype=torch.int32, device=dev)
        elif point_labels is not None and np.size(point_labels) > 0:
            # the official predictor ignores labels without points: a click that silently did
            # nothing; an empty label list carries nothing and passes
            raise PromptError("point_labels were given without point_coords")
        if box is not None:
            b = check_box(box)
            boxes = self._transforms.transform_boxes(
                torch.as_tensor(b.reshape(-1, 4), dtype=torch.float32, device=dev), normalize=normalize_coords, orig_hw=orig_hw)
        if mask_logits is not None:
            low_res = self.model.sam_prompt_encoder.mask_input_size[0]
            mask = torch.as_tensor(check_mask(mask_logits, low_res), dtype=torch.float32, device=dev)
        return Prompts(coords=coords, labels=labels, boxes=boxes, mask=mask)

    @torch.no_grad()
    def _predict_prompts(self, prompts: Prompts, multimask_output: bool, return_logits: bool,
                         feats: ImageFeatures, orig_hw: Tuple[int, int], img_idx: int = -1
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        low_res, iou = self._decode_low_res(prompts, multimask_output, feats, img_idx)
        masks = self._transforms.postprocess_masks(low_res, orig_hw)
        # logits are clamped for reuse as mask_input, as the official predictor does
        low_res = low_res.clamp(-32.0, 32.0)
        if not return_logits:
            masks = masks > self.mask_threshold
        return masks, iou, low_res

    # The official predictor's tensor-level pair, which downstream code calls directly (SAM 2
    # has no public ``predict_torch``): prompts already as tensors, batched over prompt sets.
    def _prep_prompts(self, point_coords, point_labels, box, mask_logits, normalize_coords, img_idx=-1):
        """Official signature: ``(mask_input, unnorm_coords, labels, unnorm_box)`` tensors on the
        model's device, coords (B, N, 2) and boxes (B, 2, 2) in model-input pixels."""
        _, hw = self._image(img_idx)
        p = self._user_prompts(point_coords, point_labels, box, mask_logits, normalize_coords, hw)
        return p.mask, p.coords, p.labels, p.boxes

    def _image(self, img_idx: int) -> Tuple[ImageFeatures, Tuple[int, int]]:
        feats, orig_hw = self._ready_state("set_image")
        if not -len(orig_hw) <= img_idx < len(orig_hw):
            raise PromptError(f"img_idx {img_idx} is out of range: {len(orig_hw)} image(s) are set")
        return feats, orig_hw[img_idx]

    @torch.no_grad()
    def _predict(self, point_coords: Optional[torch.Tensor], point_labels: Optional[torch.Tensor],
                 boxes: Optional[torch.Tensor] = None, mask_input: Optional[torch.Tensor] = None,
                 multimask_output: bool = True, return_logits: bool = False, img_idx: int = -1,
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Official signature: prompts as tensors from :meth:`_prep_prompts` (or transformed by
        ``_transforms``); returns masks (B, C, H, W), IoU (B, C), low-res logits (B, C, h, w)."""
        feats, hw = self._image(img_idx)
        if (point_coords is None) != (point_labels is None):
            raise PromptError("point_coords and point_labels must be given together")
        if point_coords is not None and (point_coords.dim() != 3 or point_coords.shape[-1] != 2
                                         or tuple(point_labels.shape) != tuple(point_coords.shape[:2])):
            raise PromptError(f"point_coords must be (B, N, 2) with point_labels (B, N), got "
                              f"{tuple(point_coords.shape)} and {tuple(point_labels.shape)}")
        if boxes is not None and boxes.numel() % 4 != 0:
            raise PromptError(f"boxes must be (B, 4) or (B, 2, 2), got {tuple(boxes.shape)}")
        prompts = Prompts(coords=point_coords, labels=point_labels,
                          boxes=None if boxes is None else boxes.reshape(-1, 2, 2), mask=mask_input)
        return self._predict_prompts(prompts, multimask_output, return_logits, feats, hw, img_idx)

    @torch.no_grad()
    def _decode_low_res(self, prompts: Prompts, multimask_output: bool, feats: ImageFeatures,
                        img_idx: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
        """The decoder alone: raw (unclamped) low-res logits (B, C, h, w) and IoU (B, C);
        callers that filter candidates (the mask generator) upsample only the kept ones."""
        points = prompts.sparse_points()
        sparse, dense = self.model.sam_prompt_encoder(points=points, boxes=None, masks=prompts.mask)
        # several prompt sets on one image: the decoder repeats the image embedding per set
        repeat = points is not None and points[0].shape[0] > 1
        low_res, iou, _, _ = self.model.sam_mask_decoder(
            image_embeddings=feats["image_embed"][img_idx].unsqueeze(0),
            image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=repeat,
            high_res_features=[lvl[img_idx].unsqueeze(0) for lvl in feats["high_res_feats"]],
        )
        return low_res, iou

    @staticmethod
    def _to_numpy(*tensors: torch.Tensor) -> Tuple[np.ndarray, ...]:
        return tuple(t.squeeze(0).float().detach().cpu().numpy() for t in tensors)

    def predict(self, point_coords: Optional[np.ndarray] = None, point_labels: Optional[np.ndarray] = None,
                box: Optional[np.ndarray] = None, mask_input: Optional[np.ndarray] = None,
                multimask_output: bool = True, return_logits: bool = False, normalize_coords: bool = True,
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks (C, H, W), their predicted IoU (C,) and low-res logits (C, 256, 256) at 1024.

        Points are (x, y) in pixels of the image (or in [0, 1] with ``normalize_coords=False``),
        boxes XYXY; both may reach outside the image, as with the official predictor.
        """
        feats, orig_hw = self._ready_state("set_image")
        if self._is_batch and len(orig_hw) > 1:
            raise RuntimeError("several images are set with set_image_batch: use predict_batch")
        prompts = self._user_prompts(point_coords, point_labels, box, mask_input, normalize_coords, orig_hw[-1])
        return self._to_numpy(*self._predict_prompts(prompts, multimask_output, return_logits, feats, orig_hw[-1]))

    def predict_batch(self, point_coords_batch=None, point_labels_batch=None, box_batch=None,
                      mask_input_batch=None, multimask_output: bool = True, return_logits: bool = False,
                      normalize_coords: bool = True):
        """``predict`` for every image set by ``set_image_batch``; lists of per-image results."""
        feats, orig_hw = self._ready_state("set_image_batch")
        if not self._is_batch:
            raise RuntimeError("predict_batch needs images set with set_image_batch(...)")
        n = len(orig_hw)
        per_image = []
        for name, seq in (("point_coords_batch", point_coords_batch), ("point_labels_batch", point_labels_batch),
                          ("box_batch", box_batch), ("mask_input_batch", mask_input_batch)):
            if seq is not None and len(seq) != n:
                raise PromptError(f"{name} has {len(seq)} entries but {n} images are set")
            per_image.append(seq if seq is not None else [None] * n)
        outs: Tuple[list, list, list] = ([], [], [])
        for i, (pc, pl, bx, mi) in enumerate(zip(*per_image)):
            prompts = self._user_prompts(pc, pl, bx, mi, normalize_coords, orig_hw[i])
            result = self._predict_prompts(prompts, multimask_output, return_logits, feats, orig_hw[i], img_idx=i)
            for acc, arr in zip(outs, self._to_numpy(*result)):
                acc.append(arr)
        return outs
