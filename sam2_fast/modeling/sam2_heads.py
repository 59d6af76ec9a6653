"""The SAM prompt encoder + mask decoder as SAM2Base runs them on one frame.

``SamHeadsMixin`` is mixed into ``SAM2Base``; it relies on the attributes the base sets
(``sam_prompt_encoder``, ``sam_mask_decoder``, ``obj_ptr_proj``, ``no_obj_ptr``,
``mask_downsample`` and the config flags). Both methods return the same 7-tuple:

    (low_res_multimasks, high_res_multimasks, ious, low_res_masks, high_res_masks,
     obj_ptr, object_score_logits)

with masks (B, M, S/4, S/4) and (B, M, S, S) (M = 3 for multimask, else 1), the chosen
mask (B, 1, ...), ious (B, M), obj_ptr (B, C) and object_score_logits (B, 1).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Mask logit written where the object is predicted absent (sigmoid is exactly 0 in fp32).
NO_OBJ_SCORE = -1024.0

# A mask given as the answer becomes logits of -10 / +10 (sigmoid 4.5e-5 / 0.99995).
_MASK_LOGIT_SCALE, _MASK_LOGIT_BIAS = 20.0, -10.0

HeadOutputs = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]

# True while the mask decoder decodes a prompt (clicks, a box, a mask) rather than tracks.
# The fast runtime reads it to run those calls eagerly: their token count changes with every
# click, and a compiled or graphed decoder compiled / captured once more per count.
_PROMPTED_DECODE: ContextVar[bool] = ContextVar("sam2_fast_prompted_decode", default=False)


def prompted_decode() -> bool:
    """Is the mask decoder call in progress decoding a user prompt (not a tracked frame)?"""
    return _PROMPTED_DECODE.get()


class SamHeadsMixin:
    def _gate_obj_ptr(self, obj_ptr: Tensor, presence: Tensor) -> Tensor:
        """Blend the pointer with the learned no-object pointer by presence in [0, 1], (B, 1)."""
        if self.fixed_no_obj_ptr:
            obj_ptr = presence * obj_ptr  # absent objects lose their decoded pointer entirely
        return obj_ptr + (1 - presence) * self.no_obj_ptr

    def _forward_sam_heads(self, backbone_features: Tensor, point_inputs: Optional[Dict[str, Tensor]] = None,
                           mask_inputs: Optional[Tensor] = None,
                           high_res_features: Optional[List[Tensor]] = None,
                           multimask_output: bool = False) -> HeadOutputs:
        """Decode masks on (B, C, S/16, S/16) features from clicks and/or a mask prompt.

        point_inputs: {"point_coords": (B, P, 2) pixels (x, y), "point_labels": (B, P) int32}
        (1 positive, 0 negative, -1 padding); mask_inputs: (B, 1, h, w) logits or 0/1 mask,
        resized to the prompt encoder's mask size when needed.
        """
        batch, chans, height, width = backbone_features.shape
        side = self.sam_image_embedding_size
        if chans != self.sam_prompt_embed_dim or (height, width) != (side, side):
            raise ValueError(f"backbone_features must be (B, {self.sam_prompt_embed_dim}, {side}, {side}), "
                             f"got {tuple(backbone_features.shape)}")
        device = backbone_features.device

        if point_inputs is None:
            # one padding point (label -1) stands for "no clicks"
            coords = torch.zeros(batch, 1, 2, device=device)
            labels = torch.full((batch, 1), -1, dtype=torch.int32, device=device)
        else:
            coords, labels = point_inputs["point_coords"], point_inputs["point_labels"]
            if coords.size(0) != batch or labels.size(0) != batch:
                raise ValueError(f"point_inputs hold {coords.size(0)} / {labels.size(0)} rows for a "
                                 f"batch of {batch}")

        mask_prompt = None
        if mask_inputs is not None:
            if mask_inputs.dim() != 4 or tuple(mask_inputs.shape[:2]) != (batch, 1):
                raise ValueError(f"mask_inputs must be (B={batch}, 1, H, W), got {tuple(mask_inputs.shape)}")
            target = tuple(self.sam_prompt_encoder.mask_input_size)
            mask_prompt = mask_inputs
            if tuple(mask_inputs.shape[-2:]) != target:
                mask_prompt = F.interpolate(mask_inputs.float(), size=target, mode="bilinear",
                                            align_corners=False, antialias=True)  # antialias: downsampling

        sparse, dense = self.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=mask_prompt)
        flag = _PROMPTED_DECODE.set(point_inputs is not None or mask_inputs is not None)
        try:
            low_multi, ious, out_tokens, score_logits = self.sam_mask_decoder(
                image_embeddings=backbone_features, image_pe=self.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                multimask_output=multimask_output, repeat_image=False,  # features are already per object
                high_res_features=high_res_features)
        finally:
            _PROMPTED_DECODE.reset(flag)

        present = None
        if self.pred_obj_scores:
            present = score_logits > 0  # (B, 1)
            # the spatial mask makes a hard present/absent decision (the pointer may be soft)
            low_multi = torch.where(present[:, None, None], low_multi, NO_OBJ_SCORE)
        low_multi = low_multi.float()  # decoders may run in bf16; interpolate and store in fp32
        high_multi = F.interpolate(low_multi, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)

        token = out_tokens[:, 0]  # (B, C)
        if multimask_output:
            best = ious.argmax(dim=-1)  # (B,) the candidate with the highest predicted IoU
            rows = torch.arange(batch, device=device)
            low_masks = low_multi[rows, best].unsqueeze(1)
            high_masks = high_multi[rows, best].unsqueeze(1)
            if out_tokens.size(1) > 1:  # decoder returned one token per candidate mask
                token = out_tokens[rows, best]
        else:
            low_masks, high_masks = low_multi, high_multi

        obj_ptr = self.obj_ptr_proj(token)
        if present is not None:
            weight = score_logits.sigmoid() if self.soft_no_obj_ptr else present.float()
            obj_ptr = self._gate_obj_ptr(obj_ptr, weight)
        return low_multi, high_multi, ious, low_masks, high_masks, obj_ptr, score_logits

    def _use_mask_as_output(self, backbone_features: Tensor, high_res_features: Optional[List[Tensor]],
                            mask_inputs: Tensor) -> HeadOutputs:
        """Take a given (B, 1, S, S) mask as the prediction; only the pointer is decoded."""
        mask = mask_inputs.float()
        high_masks = mask * _MASK_LOGIT_SCALE + _MASK_LOGIT_BIAS  # (B, 1, S, S) logits
        low_size = (high_masks.size(-2) // 4, high_masks.size(-1) // 4)
        low_masks = F.interpolate(high_masks, size=low_size, mode="bilinear", align_corners=False,
                                  antialias=True)
        ious = mask_inputs.new_ones(mask_inputs.size(0), 1).float()  # placeholder scores
        if self.use_obj_ptrs_in_encoder:
            obj_ptr = self._forward_sam_heads(backbone_features=backbone_features,
                                              mask_inputs=self.mask_downsample(mask),
                                              high_res_features=high_res_features)[5]
        else:
            obj_ptr = torch.zeros(mask_inputs.size(0), self.hidden_dim, device=mask_inputs.device)
        # presence follows the given mask (any foreground pixel), not the decoder's score
        presence = (mask.flatten(1) > 0).any(dim=1, keepdim=True).float()  # (B, 1)
        score_logits = _MASK_LOGIT_SCALE * presence + _MASK_LOGIT_BIAS
        if self.pred_obj_scores:
            obj_ptr = self._gate_obj_ptr(obj_ptr, presence)
        return low_masks, high_masks, ious, low_masks, high_masks, obj_ptr, score_logits
