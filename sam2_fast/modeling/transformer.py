"""Multi-head attention and the two-way transformer of the SAM mask decoder.

All attention in sam2_fast (mask decoder and memory attention) funnels through
:func:`attention_core`, looked up as a module global at call time, so a faster kernel can
be swapped in by replacing ``sam2_fast.modeling.transformer.attention_core``.

State-dict keys follow the official checkpoints: ``{q,k,v,out}_proj`` in every attention,
``layers.{i}.{self_attn,cross_attn_token_to_image,cross_attn_image_to_token,mlp,norm1..4}``
and ``final_attn_token_to_image`` / ``norm_final_attn`` in the transformer.
"""

from __future__ import annotations

from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sam2_fast.modeling.common import MLP


def attention_core(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(D)) v for already projected (and rotated) heads.

    Shapes:
      q: (B, heads, Nq, D)
      k: (B, heads, Nk, D)
      v: (B, heads, Nk, Dv)
      returns (B, heads, Nq, Dv)
    ``dropout_p`` is the attention-probability dropout (0 at inference).
    This is the single dispatch point for attention kernels (SDPA here).
    """
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


class Attention(nn.Module):
    """Multi-head attention whose q/k/v live in ``embedding_dim // downsample_rate`` channels.

    Keys and values may come from a space of another width (``kv_in_dim``), as the memory
    attention's cross-attention does with 64-channel memories.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1,
                 dropout: float = 0.0, kv_in_dim: Optional[int] = None) -> None:
        super().__init__()
        if downsample_rate < 1 or embedding_dim % downsample_rate != 0:
            raise ValueError(f"downsample_rate {downsample_rate} must divide embedding_dim {embedding_dim}")
        inner = embedding_dim // downsample_rate
        if inner % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide the inner width {inner}")
        self.embedding_dim = embedding_dim
        self.kv_in_dim = embedding_dim if kv_in_dim is None else kv_in_dim
        self.internal_dim = inner
        self.num_heads = num_heads
        self.dropout_p = dropout
        self.q_proj = nn.Linear(embedding_dim, inner)
        self.k_proj = nn.Linear(self.kv_in_dim, inner)
        self.v_proj = nn.Linear(self.kv_in_dim, inner)
        self.out_proj = nn.Linear(inner, embedding_dim)

    @property
    def head_dim(self) -> int:
        return self.internal_dim // self.num_heads

    def _split(self, x: Tensor) -> Tensor:
        # (B, N, heads*D) -> (B, heads, N, D)
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _project(self, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        if q.shape[-1] != self.embedding_dim:
            raise ValueError(f"queries have {q.shape[-1]} channels, expected {self.embedding_dim}")
        if k.shape[-1] != self.kv_in_dim or v.shape[-1] != self.kv_in_dim:
            raise ValueError(
                f"keys/values have {k.shape[-1]}/{v.shape[-1]} channels, expected {self.kv_in_dim}")
        return self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))

    @property
    def active_dropout(self) -> float:
        return self.dropout_p if self.training else 0.0

    def _merge(self, heads: Tensor) -> Tensor:
        # (B, heads, Nq, D) -> (B, Nq, heads*D) -> out_proj -> (B, Nq, C)
        b, _, n, _ = heads.shape
        return self.out_proj(heads.transpose(1, 2).reshape(b, n, self.internal_dim))

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: (B, Nq, C); k, v: (B, Nk, kv_in_dim) -> (B, Nq, C)."""
        qh, kh, vh = self._project(q, k, v)
        return self._merge(attention_core(qh, kh, vh, dropout_p=self.active_dropout))


class TwoWayAttentionBlock(nn.Module):
    """Tokens attend to themselves and to the image, then the image attends to the tokens.

    Post-norm residual order: self-attn, token->image, MLP, image->token. The first block
    of the stack feeds the raw tokens (no positional term) to its self-attention and does
    not keep a residual around it.
    """

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int = 2048,
                 activation: Type[nn.Module] = nn.ReLU, attention_downsample_rate: int = 2,
                 skip_first_layer_pe: bool = False) -> None:
        super().__init__()
        dim = embedding_dim
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate=attention_downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dim, num_layers=2, activation=activation)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate=attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> Tuple[Tensor, Tensor]:
        # queries: (B, Nt, C) sparse tokens; keys: (B, HW, C) image tokens
        if self.skip_first_layer_pe:
            tokens = self.self_attn(queries, queries, queries)
        else:
            qk = queries + query_pe
            tokens = queries + self.self_attn(qk, qk, queries)
        tokens = self.norm1(tokens)

        keyed_image = keys + key_pe  # the image with its position, used as key twice below
        tokens = self.norm2(tokens + self.cross_attn_token_to_image(tokens + query_pe, keyed_image, keys))
        tokens = self.norm3(tokens + self.mlp(tokens))

        image = keys + self.cross_attn_image_to_token(keyed_image, tokens + query_pe, tokens)
        return tokens, self.norm4(image)


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks followed by one last token->image attention."""

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int,
                 activation: Type[nn.Module] = nn.ReLU, attention_downsample_rate: int = 2) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, activation,
                                 attention_downsample_rate, skip_first_layer_pe=(idx == 0))
            for idx in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads,
                                                   downsample_rate=attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> Tuple[Tensor, Tensor]:
        """image_embedding, image_pe: (B, C, H, W); point_embedding: (B, Nt, C).

        Returns (tokens (B, Nt, C), image tokens (B, H*W, C)).
        """
        if image_embedding.shape != image_pe.shape:
            raise ValueError(f"image_pe shape {tuple(image_pe.shape)} must equal the image "
                             f"embedding shape {tuple(image_embedding.shape)}")
        image = image_embedding.flatten(2).transpose(1, 2)  # (B, HW, C)
        image_pos = image_pe.flatten(2).transpose(1, 2)  # (B, HW, C)
        tokens = point_embedding
        for block in self.layers:
            tokens, image = block(tokens, image, point_embedding, image_pos)
        final = self.final_attn_token_to_image(tokens + point_embedding, image + image_pos, image)
        return self.norm_final_attn(tokens + final), image
