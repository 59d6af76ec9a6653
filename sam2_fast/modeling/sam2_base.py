"""SAM2Base: the image encoder, memory attention/encoder and SAM heads joined into one tracker.

One tracking step (``track_step``) takes the current frame's backbone features, conditions
them on memories of earlier frames (spatial memories from the memory encoder plus object
pointers from the SAM decoder), runs the SAM prompt encoder and mask decoder, and encodes
the predicted mask into a new memory for later frames.

Tensor layouts follow the official model because predictors exchange them with us:
backbone features are flattened sequence-first, ``(H*W, B, C)``; masks are ``(B, 1, H, W)``;
object pointers ``(B, C)``. Frame outputs live in a mapping with the keys
``"cond_frame_outputs"`` and ``"non_cond_frame_outputs"`` (frame index -> output dict).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from sam2_fast.config import SAM2Config
from sam2_fast.modeling.common import MLP, seq_to_map
from sam2_fast.modeling.memory_gather import MemoryPlan, PointerSource, SlotSource, build_memory
from sam2_fast.modeling.memory_select import (
    memory_slot_frames,
    non_overlapping_logits,
    pointer_sources,
    select_closest_cond_frames,
    offset_sines,
)
from sam2_fast.modeling.sam2_heads import NO_OBJ_SCORE, SamHeadsMixin  # noqa: F401  (re-export)

# Config fields that SAM2Base exposes unchanged as attributes (the official names).
_COPIED_FIELDS = (
    "num_maskmem", "image_size", "backbone_stride", "sigmoid_scale_for_mem_enc",
    "sigmoid_bias_for_mem_enc", "binarize_mask_from_pts_for_mem_enc",
    "use_mask_input_as_output_without_sam", "max_cond_frames_in_attn", "directly_add_no_mem_embed",
    "use_high_res_features_in_sam", "multimask_output_in_sam", "multimask_min_pt_num",
    "multimask_max_pt_num", "multimask_output_for_tracking", "use_multimask_token_for_obj_ptr",
    "iou_prediction_use_sigmoid", "memory_temporal_stride_for_eval", "non_overlap_masks_for_mem_enc",
    "use_obj_ptrs_in_encoder", "max_obj_ptrs_in_encoder", "add_tpos_enc_to_obj_ptrs",
    "proj_tpos_enc_in_obj_ptrs", "use_signed_tpos_enc_to_obj_ptrs", "only_obj_ptrs_in_the_past_for_eval",
    "pred_obj_scores", "pred_obj_scores_mlp", "fixed_no_obj_ptr", "soft_no_obj_ptr",
    "use_mlp_for_obj_ptr_proj",
)


def _token(*shape: int) -> nn.Parameter:
    """A learned embedding, initialised like the official model (truncated normal, std 0.02)."""
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=0.02))


class SAM2Base(SamHeadsMixin, nn.Module):
    """The SAM 2 tracker; parameter names and shapes follow the official checkpoints."""

    def __init__(self, cfg: SAM2Config, *, image_encoder: Optional[nn.Module] = None,
                 memory_attention: Optional[nn.Module] = None, memory_encoder: Optional[nn.Module] = None,
                 sam_prompt_encoder: Optional[nn.Module] = None,
                 sam_mask_decoder: Optional[nn.Module] = None) -> None:
        super().__init__()
        if not isinstance(cfg, SAM2Config):
            raise TypeError(f"SAM2Base needs a SAM2Config, got {type(cfg).__name__}")
        self.cfg = cfg
        for name in _COPIED_FIELDS:
            setattr(self, name, getattr(cfg, name))
        extra = cfg.sam_mask_decoder_extra_args
        self.sam_mask_decoder_extra_args = None if extra is None else dataclasses.asdict(extra)
        self.hidden_dim = cfg.hidden_dim
        self.mem_dim = cfg.mem_dim
        self.num_feature_levels = 3 if cfg.use_high_res_features_in_sam else 1
        self.sam_prompt_embed_dim = self.hidden_dim
        self.sam_image_embedding_size = cfg.image_size // cfg.backbone_stride
        if cfg.use_obj_ptrs_in_encoder and self.hidden_dim % self.mem_dim != 0:
            raise ValueError(f"an object pointer of width {self.hidden_dim} cannot be split into "
                             f"memory tokens of width {self.mem_dim}")

        # Registration order mirrors the official module so state_dict() lists keys alike.
        self.image_encoder = image_encoder if image_encoder is not None else _build("image_encoder", cfg)
        if cfg.use_obj_ptrs_in_encoder:
            # brings a 0/1 mask prompt to the stride-4 logit scale of the decoder's mask input
            self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.memory_attention = (memory_attention if memory_attention is not None
                                 else _build("memory_attention", cfg))
        self.memory_encoder = memory_encoder if memory_encoder is not None else _build("memory_encoder", cfg)
        self.maskmem_tpos_enc = _token(cfg.num_maskmem, 1, 1, self.mem_dim)  # one row per temporal slot
        self.no_mem_embed = _token(1, 1, self.hidden_dim)
        self.no_mem_pos_enc = _token(1, 1, self.hidden_dim)
        has_no_obj_ptr = cfg.pred_obj_scores and cfg.use_obj_ptrs_in_encoder
        self.no_obj_ptr = _token(1, self.hidden_dim) if has_no_obj_ptr else None
        self.no_obj_embed_spatial = _token(1, self.mem_dim) if cfg.no_obj_embed_spatial else None
        self.sam_prompt_encoder = (sam_prompt_encoder if sam_prompt_encoder is not None
                                   else _build("prompt_encoder", cfg))
        self.sam_mask_decoder = sam_mask_decoder if sam_mask_decoder is not None else _build("mask_decoder", cfg)
        if not cfg.use_obj_ptrs_in_encoder:
            self.obj_ptr_proj: nn.Module = nn.Identity()
        elif cfg.use_mlp_for_obj_ptr_proj:
            self.obj_ptr_proj = MLP(self.hidden_dim, self.hidden_dim, self.hidden_dim, 3)
        else:
            self.obj_ptr_proj = nn.Linear(self.hidden_dim, self.hidden_dim)
        self.obj_ptr_tpos_proj: nn.Module = (nn.Linear(self.hidden_dim, self.mem_dim)
                                             if cfg.proj_tpos_enc_in_obj_ptrs else nn.Identity())

        if cfg.compile_image_encoder:
            # compile the bound forward, not the module, so checkpoints still load by name
            self.image_encoder.forward = torch.compile(
                self.image_encoder.forward, mode="max-autotune", fullgraph=True, dynamic=False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "SAM2Base has no forward(); run it through a predictor (SAM2VideoPredictor / "
            "SAM2ImagePredictor) or call track_step() / forward_image() directly")

    # ------------------------------------------------------------------ image features
    def forward_image(self, img_batch: Tensor) -> Dict[str, Any]:
        """Backbone outputs for a (B, 3, S, S) batch; the two high-res levels are pre-projected
        by the decoder's conv_s0 / conv_s1 once here instead of on every click."""
        backbone_out = self.image_encoder(img_batch)
        if self.use_high_res_features_in_sam:
            fpn = backbone_out["backbone_fpn"]
            fpn[0] = self.sam_mask_decoder.conv_s0(fpn[0])  # (B, C/8, S/4, S/4)
            fpn[1] = self.sam_mask_decoder.conv_s1(fpn[1])  # (B, C/4, S/8, S/8)
        return backbone_out

    def _prepare_backbone_features(self, backbone_out: Dict[str, Any]):
        """Flatten the used FPN levels to (H*W, B, C) views.

        Returns (shallow copy of backbone_out, vision_feats, vision_pos_embeds, feat_sizes),
        highest resolution first.
        """
        backbone_out = dict(backbone_out)
        fpn, pos = backbone_out["backbone_fpn"], backbone_out["vision_pos_enc"]
        if len(fpn) != len(pos):
            raise ValueError(f"backbone_fpn has {len(fpn)} levels but vision_pos_enc has {len(pos)}")
        if len(fpn) < self.num_feature_levels:
            raise ValueError(f"need {self.num_feature_levels} feature levels, backbone gave {len(fpn)}")
        used = slice(len(fpn) - self.num_feature_levels, None)
        feat_sizes = [(p.shape[-2], p.shape[-1]) for p in pos[used]]
        vision_feats = [x.flatten(2).permute(2, 0, 1) for x in fpn[used]]
        vision_pos_embeds = [p.flatten(2).permute(2, 0, 1) for p in pos[used]]
        return backbone_out, vision_feats, vision_pos_embeds, feat_sizes

    # ------------------------------------------------------------------ memory read
    def _get_tpos_enc(self, rel_pos_list: Sequence[int], device: torch.device,
                      max_abs_pos: Optional[int] = None, dummy: bool = False) -> Tensor:
        """Temporal encoding of object pointers at the given frame offsets: (N, mem_dim).

        Offsets are normalised by ``max_abs_pos - 1`` (the farthest pointer offset), encoded
        with 1-D sines and projected by ``obj_ptr_tpos_proj``. ``dummy`` gives zeros.
        """
        if dummy:
            return torch.zeros(len(rel_pos_list), self.mem_dim, device=device)
        # the official model divides by zero (NaN pointers) when only one pointer fits; we
        # keep the divisor at least 1, which changes nothing in any other case
        span = max(max_abs_pos - 1, 1) if max_abs_pos is not None else 1
        width = self.hidden_dim if self.proj_tpos_enc_in_obj_ptrs else self.mem_dim
        return self.obj_ptr_tpos_proj(self._tpos_sines(tuple(rel_pos_list), span, width, device))

    def _tpos_sines(self, offsets: Tuple[int, ...], span: int, width: int, device: torch.device) -> Tensor:
        return offset_sines(offsets, span, width, device)  # (N, width) float32, see memory_select

    def _memory_plan(self, frame_idx: int, output_dict: Mapping[str, Mapping[int, dict]],
                     num_frames: Optional[int], track_in_reverse: bool) -> MemoryPlan:
        """Which stored memories and pointers the frame attends to (plain Python, no tensor op).

        Conditioning frames sit at t_pos 0 (up to ``max_cond_frames_in_attn`` of them, the
        closest), recent tracked frames fill t_pos 1 .. num_maskmem - 1, then the object
        pointers with their temporal offsets. One plan per object; ``memory_gather`` stacks
        the plans of all objects of a step into one bank.
        """
        if self.num_maskmem == 0:  # memory disabled (plain SAM): nothing is read
            return MemoryPlan(frame_idx, (), (), 0, 1)
        cond = output_dict["cond_frame_outputs"]
        if len(cond) == 0:
            raise ValueError(f"frame {frame_idx} is tracked (not an initial conditioning frame) but "
                             "output_dict['cond_frame_outputs'] is empty; prompt some frame first")
        non_cond = output_dict["non_cond_frame_outputs"]
        attended, left_out = select_closest_cond_frames(frame_idx, cond, self.max_cond_frames_in_attn)
        stride = 1 if self.training else self.memory_temporal_stride_for_eval

        chosen: List[Tuple[int, int, dict]] = [(t, 0, out) for t, out in attended.items()]
        for t_pos, t in memory_slot_frames(frame_idx, self.num_maskmem, stride, track_in_reverse):
            out = non_cond.get(t)
            if out is None:
                out = left_out.get(t)  # a conditioning frame left out of attention still counts
            if out is not None:
                chosen.append((t, t_pos, out))
        slots = tuple(SlotSource(t, t_pos, out["maskmem_features"], out["maskmem_pos_enc"][-1])
                      for t, t_pos, out in chosen)

        ptr_srcs: List[Tuple[int, dict]] = []
        max_ptrs = self.max_obj_ptrs_in_encoder
        if self.use_obj_ptrs_in_encoder:
            if num_frames is not None:
                max_ptrs = min(num_frames, max_ptrs)
            ptr_srcs = pointer_sources(
                frame_idx, attended, left_out, non_cond, num_frames, max_ptrs, track_in_reverse,
                past_only=self.only_obj_ptrs_in_the_past_for_eval and not self.training,
                signed=self.use_signed_tpos_enc_to_obj_ptrs)
        pointers = tuple(PointerSource(off, out["obj_ptr"]) for off, out in ptr_srcs)
        batch = slots[0].features.shape[0] if slots else (pointers[0].obj_ptr.shape[0] if pointers else 1)
        return MemoryPlan(frame_idx, slots, pointers, max_ptrs, batch)

    def _gather_memory(self, frame_idx: int, like: Tensor, output_dict: Mapping[str, Mapping[int, dict]],
                       num_frames: Optional[int], track_in_reverse: bool) -> Tuple[Tensor, Tensor, int]:
        """Memory tokens, their position encodings (both (M, B, mem_dim)) and the pointer count.

        The batched bank of ``memory_gather`` with one plan (all B rows share the output
        dict): tokens are copied straight into one preallocated buffer in the compute dtype,
        that of ``like`` (the current features) promoted with the parameters'. bf16-stored
        memories are upcast exactly on the way in, so fp32 inference never meets a bf16
        memory, and under autocast the values equal the official concatenation's.
        """
        plan = self._memory_plan(frame_idx, output_dict, num_frames, track_in_reverse)
        dtype = torch.promote_types(like.dtype, self.maskmem_tpos_enc.dtype)
        batch = like.size(1)
        if plan.batch != batch:
            raise ValueError(f"stored memories hold {plan.batch} rows but the current features {batch}")
        bank = build_memory(self, [plan], batch, like.size(0), dtype, like.device)
        # (B, M, dim) -> the official sequence-first (M, B, dim), as a view
        return bank.memory.transpose(0, 1), bank.memory_pos.transpose(0, 1), bank.num_ptr_tokens

    def _prepare_memory_conditioned_features(self, frame_idx: int, is_init_cond_frame: bool,
                                             current_vision_feats: List[Tensor],
                                             current_vision_pos_embeds: List[Tensor],
                                             feat_sizes: List[Tuple[int, int]],
                                             output_dict: Mapping[str, Mapping[int, dict]],
                                             num_frames: Optional[int],
                                             track_in_reverse: bool = False) -> Tensor:
        """Lowest-resolution features fused with the memory bank: (B, C, H, W)."""
        feats = current_vision_feats[-1]  # (H*W, B, C)
        size = feat_sizes[-1]
        if self.num_maskmem == 0:  # memory disabled: plain SAM on single images
            return seq_to_map(feats, size)
        if is_init_cond_frame:
            if self.directly_add_no_mem_embed:
                return seq_to_map(feats + self.no_mem_embed, size)
            batch = feats.size(1)
            # a single placeholder token so the attention never sees an empty memory
            memory = self.no_mem_embed.expand(1, batch, self.mem_dim)
            memory_pos = self.no_mem_pos_enc.expand(1, batch, self.mem_dim)
            num_ptr_tokens = 0
        else:
            memory, memory_pos, num_ptr_tokens = self._gather_memory(
                frame_idx, feats, output_dict, num_frames, track_in_reverse)
        fused = self.memory_attention(curr=current_vision_feats, curr_pos=current_vision_pos_embeds,
                                      memory=memory, memory_pos=memory_pos,
                                      num_obj_ptr_tokens=num_ptr_tokens)  # (H*W, B, C)
        return seq_to_map(fused, size)

    # ------------------------------------------------------------------ memory write
    def _encode_new_memory(self, current_vision_feats: List[Tensor], feat_sizes: List[Tuple[int, int]],
                           pred_masks_high_res: Tensor, object_score_logits: Tensor,
                           is_mask_from_pts: bool, separate_objects: bool = False) -> Tuple[Tensor, List[Tensor]]:
        """Memory of this frame from its features and predicted mask logits (B, 1, S, S).

        ``separate_objects``: the batch rows are different objects tracked together (each
        keeps the memory per-object tracking gives it, so no non-overlap across rows)."""
        pix_feat = seq_to_map(current_vision_feats[-1], feat_sizes[-1])  # (B, C, H, W)
        masks = pred_masks_high_res
        if self.non_overlap_masks_for_mem_enc and not self.training and not separate_objects:
            masks = self._apply_non_overlapping_constraints(masks)
        if self.binarize_mask_from_pts_for_mem_enc and is_mask_from_pts and not self.training:
            mask_for_mem = (masks > 0).float()
        else:
            mask_for_mem = torch.sigmoid(masks)
        # temperature: map probabilities to logits-like [bias, bias + scale]; in place on the
        # fresh tensor unless autograd needs the sigmoid output for a backward pass
        inplace = not mask_for_mem.requires_grad
        if self.sigmoid_scale_for_mem_enc != 1.0:
            s = self.sigmoid_scale_for_mem_enc
            mask_for_mem = mask_for_mem.mul_(s) if inplace else mask_for_mem * s
        if self.sigmoid_bias_for_mem_enc != 0.0:
            b = self.sigmoid_bias_for_mem_enc
            mask_for_mem = mask_for_mem.add_(b) if inplace else mask_for_mem + b
        encoded = self.memory_encoder(pix_feat, mask_for_mem, skip_mask_sigmoid=True)
        maskmem_features = encoded["vision_features"]  # (B, mem_dim, H, W)
        if self.no_obj_embed_spatial is not None:
            # frames predicted empty get a learned "occluded" offset on every memory token;
            # (B, 1, 1, 1) * (1, mem_dim, 1, 1) broadcasts without a full-size temporary
            absent = 1 - (object_score_logits > 0).float()  # (B, 1)
            maskmem_features += absent[..., None, None] * self.no_obj_embed_spatial[..., None, None]
        return maskmem_features, encoded["vision_pos_enc"]

    def _encode_memory_in_output(self, current_vision_feats, feat_sizes, point_inputs, run_mem_encoder,
                                 high_res_masks, object_score_logits, current_out) -> None:
        if run_mem_encoder and self.num_maskmem > 0:
            feats, pos = self._encode_new_memory(current_vision_feats, feat_sizes, high_res_masks,
                                                 object_score_logits, point_inputs is not None)
        else:
            feats, pos = None, None
        current_out["maskmem_features"] = feats
        current_out["maskmem_pos_enc"] = pos

    def _apply_non_overlapping_constraints(self, pred_masks: Tensor) -> Tensor:
        """Per pixel, keep only the highest-scoring object (objects along the batch dim)."""
        return non_overlapping_logits(pred_masks)

    # ------------------------------------------------------------------ one frame
    def _track_step(self, frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds,
                    feat_sizes, point_inputs, mask_inputs, output_dict, num_frames, track_in_reverse,
                    prev_sam_mask_logits):
        """Returns (partial frame output, SAM head outputs, high-res features, fused features)."""
        current_out: Dict[str, Any] = {"point_inputs": point_inputs, "mask_inputs": mask_inputs}
        high_res_features = None
        if len(current_vision_feats) > 1:  # (H*W, B, C) -> (B, C, H, W) views for the decoder
            high_res_features = [seq_to_map(x, s) for x, s in zip(current_vision_feats[:-1], feat_sizes[:-1])]
        if mask_inputs is not None and self.use_mask_input_as_output_without_sam:
            # a given mask is taken as the answer; the decoder only supplies the pointer
            pix_feat = seq_to_map(current_vision_feats[-1], feat_sizes[-1])
            sam_outputs = self._use_mask_as_output(pix_feat, high_res_features, mask_inputs)
            return current_out, sam_outputs, high_res_features, pix_feat
        pix_feat = self._prepare_memory_conditioned_features(
            frame_idx=frame_idx, is_init_cond_frame=is_init_cond_frame,
            current_vision_feats=current_vision_feats[-1:],
            current_vision_pos_embeds=current_vision_pos_embeds[-1:], feat_sizes=feat_sizes[-1:],
            output_dict=output_dict, num_frames=num_frames, track_in_reverse=track_in_reverse)
        if prev_sam_mask_logits is not None:
            # earlier low-res logits refine a new click (interactive demo)
            if point_inputs is None or mask_inputs is not None:
                raise ValueError("prev_sam_mask_logits is only accepted together with point_inputs "
                                 "and without mask_inputs")
            mask_inputs = prev_sam_mask_logits
        sam_outputs = self._forward_sam_heads(
            backbone_features=pix_feat, point_inputs=point_inputs, mask_inputs=mask_inputs,
            high_res_features=high_res_features,
            multimask_output=self._use_multimask(is_init_cond_frame, point_inputs))
        return current_out, sam_outputs, high_res_features, pix_feat

    def track_step(self, frame_idx: int, is_init_cond_frame: bool, current_vision_feats: List[Tensor],
                   current_vision_pos_embeds: List[Tensor], feat_sizes: List[Tuple[int, int]],
                   point_inputs: Optional[Dict[str, Tensor]], mask_inputs: Optional[Tensor],
                   output_dict: Mapping[str, Mapping[int, dict]], num_frames: Optional[int],
                   track_in_reverse: bool = False, run_mem_encoder: bool = True,
                   prev_sam_mask_logits: Optional[Tensor] = None) -> Dict[str, Any]:
        """Segment one frame and (optionally) encode its memory.

        The returned dict holds point_inputs, mask_inputs, pred_masks (B, 1, S/4, S/4),
        pred_masks_high_res (B, 1, S, S), obj_ptr (B, C), object_score_logits (B, 1; eval
        only), maskmem_features (B, mem_dim, S/16, S/16) and maskmem_pos_enc (list), the
        last two None without the memory encoder.
        """
        current_out, sam_outputs, _, _ = self._track_step(
            frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds, feat_sizes,
            point_inputs, mask_inputs, output_dict, num_frames, track_in_reverse, prev_sam_mask_logits)
        low_res_masks, high_res_masks, obj_ptr, object_score_logits = sam_outputs[3:]
        current_out["pred_masks"] = low_res_masks
        current_out["pred_masks_high_res"] = high_res_masks
        current_out["obj_ptr"] = obj_ptr
        if not self.training:  # kept out of training outputs, as in the official model
            current_out["object_score_logits"] = object_score_logits
        self._encode_memory_in_output(current_vision_feats, feat_sizes, point_inputs, run_mem_encoder,
                                      high_res_masks, object_score_logits, current_out)
        return current_out

    def track_objects_step(self, frame_idx: int, current_vision_feats: List[Tensor],
                           current_vision_pos_embeds: List[Tensor], feat_sizes: List[Tuple[int, int]],
                           plans: Sequence[MemoryPlan], rows: int, run_mem_encoder: bool = True) -> Dict[str, Any]:
        """Track several objects on one frame in one batched step (see ``batched_step``)."""
        from sam2_fast.modeling.batched_step import track_objects_step

        return track_objects_step(self, frame_idx, current_vision_feats, current_vision_pos_embeds, feat_sizes,
                                  plans, rows, run_mem_encoder)

    def _use_multimask(self, is_init_cond_frame: bool, point_inputs: Optional[Dict[str, Tensor]]) -> bool:
        """Three candidate masks for few-click prompts (first frame, or always when tracking)."""
        if not self.multimask_output_in_sam:
            return False
        if not (is_init_cond_frame or self.multimask_output_for_tracking):
            return False
        clicks = 0 if point_inputs is None else point_inputs["point_labels"].size(1)
        return self.multimask_min_pt_num <= clicks <= self.multimask_max_pt_num


def _build(part: str, cfg: SAM2Config) -> nn.Module:
    """Build a submodule from the config with its module's builder (imported on demand, so
    this file imports before every submodule exists)."""
    import importlib

    module = importlib.import_module(f"sam2_fast.modeling.{part}")
    builder = getattr(module, f"build_{part}", None)
    if builder is None:
        raise ImportError(f"sam2_fast.modeling.{part} has no build_{part}(cfg)")
    return builder(cfg)
