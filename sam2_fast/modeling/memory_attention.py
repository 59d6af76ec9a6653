"""Memory attention: the current frame's features attend to encoded past frames.

Inputs are sequence-first, as SAM2Base produces them: current-frame tokens (HW, B, C) and
memory tokens (M, B, mem_dim), where M = frames * HW + object-pointer tokens. Internally
everything runs batch-first. Each layer is pre-norm: RoPE self-attention, RoPE
cross-attention to the memories (keys carry the memory position encoding, the queries do
not), then a ReLU feed-forward.
"""

from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sam2_fast.modeling.rope import RoPEAttention

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}


class MemoryAttentionLayer(nn.Module):
    """One pre-norm layer: self-attn -> cross-attn to memories -> MLP (keys as the checkpoint)."""

    def __init__(self, activation: str, cross_attention: nn.Module, d_model: int, dim_feedforward: int,
                 dropout: float, pos_enc_at_attn: bool, pos_enc_at_cross_attn_keys: bool,
                 pos_enc_at_cross_attn_queries: bool, self_attention: nn.Module) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(_ACTIVATIONS)}")
        # sub-modules, named as in the official checkpoints
        self.self_attn, self.cross_attn_image = self_attention, cross_attention
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.linear1, self.linear2 = nn.Linear(d_model, dim_feedforward), nn.Linear(dim_feedforward, d_model)
        # hyper-parameters (public, as other code inspects them)
        self.d_model, self.dim_feedforward, self.dropout_value = d_model, dim_feedforward, dropout
        self.activation_str, self._act = activation, _ACTIVATIONS[activation]
        # which attention inputs receive the position encodings
        self.pos_enc_at_attn = pos_enc_at_attn
        self.pos_enc_at_cross_attn_queries = pos_enc_at_cross_attn_queries
        self.pos_enc_at_cross_attn_keys = pos_enc_at_cross_attn_keys

    def _drop(self, x: Tensor) -> Tensor:
        # dropout is a training-time regulariser only; identity in eval
        return F.dropout(x, self.dropout_value, training=True) if self.training and self.dropout_value > 0 else x

    def forward(self, tgt: Tensor, memory: Tensor, pos: Optional[Tensor] = None,
                query_pos: Optional[Tensor] = None, num_k_exclude_rope: int = 0) -> Tensor:
        """tgt: (B, HW, C); memory: (B, M, mem_dim); pos: (B, M, mem_dim); query_pos: (B, HW, C)."""
        x = tgt
        # self-attention
        h = self.norm1(x)
        qk = h + query_pos if (self.pos_enc_at_attn and query_pos is not None) else h
        x = x + self._drop(self.self_attn(qk, qk, h))
        # cross-attention: grid memories are rotated, trailing object pointers are not
        h = self.norm2(x)
        q = h + query_pos if (self.pos_enc_at_cross_attn_queries and query_pos is not None) else h
        k = memory + pos if (self.pos_enc_at_cross_attn_keys and pos is not None) else memory
        if isinstance(self.cross_attn_image, RoPEAttention):
            attn = self.cross_attn_image(q, k, memory, num_k_exclude_rope=num_k_exclude_rope)
        elif num_k_exclude_rope > 0:
            raise ValueError("num_k_exclude_rope needs a RoPEAttention cross-attention")
        else:
            attn = self.cross_attn_image(q, k, memory)
        x = x + self._drop(attn)
        # feed-forward
        h = self.linear2(self._drop(self._act(self.linear1(self.norm3(x)))))
        return x + self._drop(h)


class MemoryAttention(nn.Module):
    """A stack of :class:`MemoryAttentionLayer` and a final LayerNorm (``layers.{i}``, ``norm``)."""

    def __init__(self, d_model: int, pos_enc_at_input: bool,
                 layer: Union[nn.Module, Sequence[nn.Module]], num_layers: Optional[int] = None,
                 batch_first: bool = True) -> None:
        """``layer`` is either a list of layers or one prototype copied ``num_layers`` times."""
        super().__init__()
        if isinstance(layer, nn.Module):
            if num_layers is None or num_layers < 1:
                raise ValueError("a single prototype layer needs num_layers >= 1")
            layers = [copy.deepcopy(layer) for _ in range(num_layers)]
        else:
            layers = list(layer)
            if num_layers is not None and num_layers != len(layers):
                raise ValueError(f"num_layers={num_layers} but {len(layers)} layers were given")
        if not batch_first:
            raise ValueError("only batch_first layers are supported (as in every official config)")
        self.d_model = d_model
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(self.layers)
        self.norm = nn.LayerNorm(d_model)
        self.pos_enc_at_input = pos_enc_at_input
        self.batch_first = batch_first

    def forward(self, curr: Union[Tensor, List[Tensor]], memory: Tensor,
                curr_pos: Optional[Union[Tensor, List[Tensor]]] = None,
                memory_pos: Optional[Tensor] = None, num_obj_ptr_tokens: int = 0) -> Tensor:
        """curr, curr_pos: (HW, B, C); memory, memory_pos: (M, B, mem_dim) -> (HW, B, C).

        The last ``num_obj_ptr_tokens`` memory tokens are object pointers (no RoPE).
        """
        if isinstance(curr, (list, tuple)):
            if len(curr) != 1 or not isinstance(curr_pos, (list, tuple)) or len(curr_pos) != 1:
                raise ValueError("curr / curr_pos given as lists must each hold exactly one level")
            curr, curr_pos = curr[0], curr_pos[0]
        if curr.dim() != 3 or memory.dim() != 3:
            raise ValueError(f"curr and memory must be (seq, batch, C); got {tuple(curr.shape)} "
                             f"and {tuple(memory.shape)}")
        if curr.shape[1] != memory.shape[1]:
            raise ValueError(f"batch of curr ({curr.shape[1]}) and memory ({memory.shape[1]}) differ")
        if not 0 <= num_obj_ptr_tokens <= memory.shape[0]:
            raise ValueError(f"num_obj_ptr_tokens={num_obj_ptr_tokens} exceeds the {memory.shape[0]} memory tokens")

        x = curr
        if self.pos_enc_at_input and curr_pos is not None:
            x = x + 0.1 * curr_pos
        # sequence-first -> batch-first for the layers
        x = x.transpose(0, 1)  # (B, HW, C)
        query_pos = None if curr_pos is None else curr_pos.transpose(0, 1)
        # memories may be stored narrower (bf16 banks) than the queries: upcast them (exact),
        # which is what the official model gets whenever fp32 object pointers are concatenated
        # to them; never downcast (that would round before the position encoding is added)
        def widen(t: Tensor) -> Tensor:
            return t.transpose(0, 1).to(torch.promote_types(t.dtype, x.dtype))

        mem = widen(memory)  # (B, M, mem_dim)
        mem_pos = None if memory_pos is None else widen(memory_pos)
        for layer in self.layers:
            x = layer(x, mem, pos=mem_pos, query_pos=query_pos, num_k_exclude_rope=num_obj_ptr_tokens)
        return self.norm(x).transpose(0, 1)  # (HW, B, C)


def build_memory_attention(cfg) -> MemoryAttention:
    """The memory attention of a :class:`~sam2_fast.config.SAM2Config` (official YAML values:
    single-head RoPE attention, dropout 0.1 (training only), positions added at the input
    and to the cross-attention keys only)."""
    dim = cfg.d_model

    def rope_attn(**extra) -> RoPEAttention:
        return RoPEAttention(embedding_dim=dim, num_heads=1, downsample_rate=1, dropout=0.1,
                             rope_theta=cfg.rope_theta, feat_sizes=tuple(cfg.rope_feat_sizes), **extra)

    layers = [
        MemoryAttentionLayer(
            activation="relu", d_model=dim, dim_feedforward=cfg.mem_attn_ffn_dim, dropout=0.1,
            pos_enc_at_attn=False, pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False,
            self_attention=rope_attn(),
            cross_attention=rope_attn(rope_k_repeat=True, kv_in_dim=cfg.mem_dim),
        )
        for _ in range(cfg.mem_attn_layers)
    ]
    return MemoryAttention(d_model=dim, pos_enc_at_input=True, layer=layers)
