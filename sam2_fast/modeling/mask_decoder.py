"""SAM mask decoder: output tokens + prompt tokens attend to the image embedding.

Token layout fed to the two-way transformer (per prompt set):
  [obj_score_token]? , iou_token , mask_tokens[0..3] , sparse prompt tokens ...
mask_tokens[0] predicts the single-mask answer, mask_tokens[1..3] the three multimask
candidates. Each mask token is turned by its own hypernetwork MLP into weights that are
dotted with the 4x-upscaled image embedding (fused with the stride-4 / stride-8 backbone
features when ``use_high_res_features``) to give mask logits.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import List, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from sam2_fast.modeling.common import MLP, LayerNorm2d
from sam2_fast.modeling.transformer import TwoWayTransformer


def stability_scores(mask_logits: Tensor, delta: float) -> Tensor:
    """IoU of the masks thresholded at +delta and -delta: (..., H, W) -> (...)."""
    flat = mask_logits.flatten(-2)
    inner = (flat > delta).sum(dim=-1).float()
    outer = (flat > -delta).sum(dim=-1).float()
    # an empty outer mask is perfectly stable by convention
    return torch.where(outer > 0, inner / outer, torch.ones_like(outer))


class MaskDecoder(nn.Module):
    """Keys: ``transformer``, ``iou_token``, ``mask_tokens``, ``obj_score_token``,
    ``output_upscaling.{0,1,3}``, ``conv_s0``, ``conv_s1``, ``output_hypernetworks_mlps.{i}``,
    ``iou_prediction_head``, ``pred_obj_score_head``."""

    def __init__(self, *, transformer_dim: int, transformer: nn.Module, num_multimask_outputs: int = 3,
                 activation: Type[nn.Module] = nn.GELU, iou_head_depth: int = 3,
                 iou_head_hidden_dim: int = 256, use_high_res_features: bool = False,
                 iou_prediction_use_sigmoid: bool = False, dynamic_multimask_via_stability: bool = False,
                 dynamic_multimask_stability_delta: float = 0.05,
                 dynamic_multimask_stability_thresh: float = 0.98, pred_obj_scores: bool = False,
                 pred_obj_scores_mlp: bool = False, use_multimask_token_for_obj_ptr: bool = False) -> None:
        super().__init__()
        dim = transformer_dim
        self.transformer_dim = dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.pred_obj_scores = pred_obj_scores
        if pred_obj_scores:
            self.obj_score_token = nn.Embedding(1, dim)
        self.use_multimask_token_for_obj_ptr = use_multimask_token_for_obj_ptr

        # indices 2 and 4 are parameter-free activations; the high-res path unpacks this
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            activation(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.use_high_res_features = use_high_res_features
        if use_high_res_features:
            # project the stride-4 (s0) and stride-8 (s1) backbone maps to the upscaler widths
            self.conv_s0 = nn.Conv2d(dim, dim // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(dim, dim // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth,
                                       sigmoid_output=iou_prediction_use_sigmoid)
        if pred_obj_scores:
            self.pred_obj_score_head = MLP(dim, dim, 1, 3) if pred_obj_scores_mlp else nn.Linear(dim, 1)
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh

    # ------------------------------------------------------------------ forward
    def forward(self, image_embeddings: Tensor, image_pe: Tensor, sparse_prompt_embeddings: Tensor,
                dense_prompt_embeddings: Tensor, multimask_output: bool, repeat_image: bool,
                high_res_features: Optional[List[Tensor]] = None
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns (masks (B, M, 4H, 4W), iou (B, M), sam tokens (B, M', C), object logits (B, 1)).

        M = 3 with ``multimask_output`` else 1; M' = 3 only when the multimask tokens also
        serve as object pointers (``use_multimask_token_for_obj_ptr``), else 1.
        """
        masks, iou, mask_tokens_out, obj_logits = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
            repeat_image, high_res_features)
        if multimask_output:
            masks, iou = masks[:, 1:], iou[:, 1:]
        elif self.dynamic_multimask_via_stability and not self.training:
            masks, iou = self._dynamic_multimask_via_stability(masks, iou)
        else:
            masks, iou = masks[:, :1], iou[:, :1]
        # the single-mask token is the object pointer unless multimask tokens are asked for
        use_multi_tokens = multimask_output and self.use_multimask_token_for_obj_ptr
        sam_tokens_out = mask_tokens_out[:, 1:] if use_multi_tokens else mask_tokens_out[:, :1]
        return masks, iou, sam_tokens_out, obj_logits

    def _output_tokens(self, batch: int) -> Tensor:
        learned = [self.iou_token.weight, self.mask_tokens.weight]
        if self.pred_obj_scores:
            learned.insert(0, self.obj_score_token.weight)
        return torch.cat(learned, dim=0).unsqueeze(0).expand(batch, -1, -1)  # (B, T, C)

    def _upscale(self, image: Tensor, high_res_features: Optional[List[Tensor]]) -> Tensor:
        # image: (B, C, H, W) -> (B, C/8, 4H, 4W)
        if not self.use_high_res_features:
            return self.output_upscaling(image)
        if high_res_features is None or len(high_res_features) != 2:
            raise ValueError("use_high_res_features needs high_res_features = [stride-4 map, stride-8 map]")
        feat_s0, feat_s1 = high_res_features
        up1, norm1, act1, up2, act2 = self.output_upscaling
        x = act1(norm1(up1(image) + feat_s1))  # (B, C/4, 2H, 2W)
        return act2(up2(x) + feat_s0)  # (B, C/8, 4H, 4W)

    def predict_masks(self, image_embeddings: Tensor, image_pe: Tensor, sparse_prompt_embeddings: Tensor,
                      dense_prompt_embeddings: Tensor, repeat_image: bool,
                      high_res_features: Optional[List[Tensor]] = None
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """All mask-token outputs: (masks (B, 4, h, w), iou (B, 4), mask tokens (B, 4, C), obj (B, 1))."""
        n_prompts = sparse_prompt_embeddings.shape[0]
        tokens = torch.cat([self._output_tokens(n_prompts), sparse_prompt_embeddings], dim=1)
        if repeat_image:
            # one image, several prompt sets: copy the image per prompt set
            image = torch.repeat_interleave(image_embeddings, n_prompts, dim=0)
        else:
            if image_embeddings.shape[0] != n_prompts:
                raise ValueError(f"{image_embeddings.shape[0]} image embeddings for {n_prompts} prompt "
                                 "sets; pass repeat_image=True to share one image")
            image = image_embeddings
        image = image + dense_prompt_embeddings  # (B, C, H, W)
        if image_pe.shape[0] != 1:
            raise ValueError("image_pe must have batch 1 (as returned by get_dense_pe())")
        pos = image_pe.expand(n_prompts, -1, -1, -1)
        b, c, h, w = image.shape

        hs, image_tokens = self.transformer(image, pos, tokens)  # (B, T, C), (B, HW, C)
        first = 1 if self.pred_obj_scores else 0
        iou_token_out = hs[:, first]
        mask_tokens_out = hs[:, first + 1:first + 1 + self.num_mask_tokens]  # (B, 4, C)

        upscaled = self._upscale(image_tokens.transpose(1, 2).reshape(b, c, h, w), high_res_features)
        hyper = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in
                             enumerate(self.output_hypernetworks_mlps)], dim=1)  # (B, 4, C/8)
        ub, uc, uh, uw = upscaled.shape
        masks = torch.bmm(hyper, upscaled.reshape(ub, uc, uh * uw)).reshape(ub, -1, uh, uw)

        iou_pred = self.iou_prediction_head(iou_token_out)  # (B, 4)
        if self.pred_obj_scores:
            obj_logits = self.pred_obj_score_head(hs[:, 0])  # (B, 1)
        else:
            # no occlusion head: report "object present" with a confident logit
            obj_logits = iou_pred.new_full((iou_pred.shape[0], 1), 10.0)
        return masks, iou_pred, mask_tokens_out, obj_logits

    def _get_stability_scores(self, mask_logits: Tensor) -> Tensor:
        return stability_scores(mask_logits, self.dynamic_multimask_stability_delta)

    def _dynamic_multimask_via_stability(self, all_mask_logits: Tensor, all_iou_scores: Tensor
                                         ) -> Tuple[Tensor, Tensor]:
        """Single-mask output, falling back to the best-IoU multimask candidate when the
        single mask is unstable (stability below the threshold)."""
        best = all_iou_scores[:, 1:].argmax(dim=-1) + 1  # (B,) index into all 4 outputs
        rows = torch.arange(all_iou_scores.shape[0], device=all_iou_scores.device)
        best_mask = all_mask_logits[rows, best].unsqueeze(1)  # (B, 1, H, W)
        best_iou = all_iou_scores[rows, best].unsqueeze(1)  # (B, 1)
        single_mask, single_iou = all_mask_logits[:, :1], all_iou_scores[:, :1]
        stable = self._get_stability_scores(single_mask) >= self.dynamic_multimask_stability_thresh  # (B, 1)
        masks = torch.where(stable[:, :, None, None], single_mask, best_mask)
        ious = torch.where(stable, single_iou, best_iou)
        return masks, ious


def build_mask_decoder(cfg) -> MaskDecoder:
    """The SAM mask decoder of a :class:`~sam2_fast.config.SAM2Config`.

    Fixed SAM hyper-parameters: 2 two-way blocks, 8 heads, MLP width 2048, 3 multimask
    outputs, a 3-layer IoU head of width 256.
    """
    dim = cfg.hidden_dim
    extra = asdict(cfg.sam_mask_decoder_extra_args) if cfg.sam_mask_decoder_extra_args is not None else {}
    two_way = TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2048, num_heads=8)
    return MaskDecoder(
        transformer_dim=dim, transformer=two_way, num_multimask_outputs=3,
        iou_head_depth=3, iou_head_hidden_dim=256,
        use_high_res_features=cfg.use_high_res_features_in_sam,
        iou_prediction_use_sigmoid=cfg.iou_prediction_use_sigmoid,
        pred_obj_scores=cfg.pred_obj_scores, pred_obj_scores_mlp=cfg.pred_obj_scores_mlp,
        use_multimask_token_for_obj_ptr=cfg.use_multimask_token_for_obj_ptr, **extra)
