"""Seeded random weights that make SAM 2 sensitive (for tests and benchmarks without checkpoints).

Weight recipe ("sensitive" random weights)
------------------------------------------
The official initialisation gives a quiet model: truncated-normal(0.02) tokens and
embeddings, layer-scale 1e-6 and zero-initialised heads make the mask logits |x| < 0.3 and
the object score negative, so every mask is the constant no-object score and a semantic
bug moves the output by ~1e-4. ``sensitize_`` redraws every parameter so that each part of
the network carries signal at unit scale:

* matrices / conv kernels (ndim >= 2): N(0, 1/fan_in) -> activations keep unit variance;
* biases: N(0, 0.1^2);
* norm weights: 1 + N(0, 0.1^2); norm biases: N(0, 0.1^2);
* learned tokens and embeddings (no_mem_embed, pos_embed, mask/iou/obj-score tokens,
  point embeddings, maskmem_tpos_enc, no_obj_ptr, no_obj_embed_spatial, ...): N(0, 1);
* layer-scale ``gamma`` of the memory-encoder CX blocks: N(0, 0.5^2) (the official 1e-6
  would silence the fuser);
* ``obj_score_bias`` (keyword argument) is added to the last bias of the object-score head
  so a test can place the object present on most frames and absent on some.

Usage in parity tests: build the reference model, ``sensitize_(ref, seed)``, then load ``ref.state_dict()``
into ours through our checkpoint loader so both hold identical weights.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

NORM_HINTS = ("norm", "ln", "layernorm")


def sensitize_(model: nn.Module, seed: int = 0, obj_score_bias: float = 0.0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)

    def draw(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float64).mul_(std).add_(mean)

    norm_modules = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)) or type(mod).__name__ == "LayerNorm2d":
            norm_modules.add(mname)
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner, _, leaf = name.rpartition(".")
            if owner in norm_modules:
                new = draw(p.shape, 0.1, 1.0 if leaf == "weight" else 0.0)
            elif leaf == "gamma":
                new = draw(p.shape, 0.5)
            elif leaf == "bias":
                new = draw(p.shape, 0.1)
            elif leaf == "weight" and p.ndim >= 2:
                fan_in = p[0].numel()
                new = draw(p.shape, 1.0 / math.sqrt(fan_in))
            elif leaf == "weight" and p.ndim == 1:
                new = draw(p.shape, 0.1, 1.0)
            else:  # tokens, embeddings, positional tables
                new = draw(p.shape, 1.0)
            p.copy_(new.to(p.dtype))
        if obj_score_bias:
            head = _obj_score_head(model)
            if head is not None:
                head.bias.add_(obj_score_bias)
    return model


def _obj_score_head(model: nn.Module) -> Optional[nn.Linear]:
    dec = getattr(model, "sam_mask_decoder", model)
    head = getattr(dec, "pred_obj_score_head", None)
    if head is None:
        return None
    if isinstance(head, nn.Linear):
        return head
    return head.layers[-1]
