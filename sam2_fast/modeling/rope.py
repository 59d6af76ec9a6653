"""2-D axial rotary position encoding (RoPE) and the attention that uses it.

A head of width D is read as D/2 consecutive channel pairs, each a point in the plane that
is rotated by an angle depending on the token's grid position. The first D/4 pairs turn
with the column index x, the last D/4 pairs with the row index y; pair j of either half
turns at frequency ``theta ** (-4j / D)``. Tokens are numbered row-major (x fastest), as
flattened (H, W) feature maps are.

Memory attention uses this in two ways:
* self-attention of the current frame: q and k are both the H*W frame tokens;
* cross-attention to memories: keys hold several memory frames of H*W tokens each (the
  table applies to each frame in turn, ``rope_k_repeat``) followed by object-pointer
  tokens that carry no grid position and are left unrotated (``num_k_exclude_rope``).
  The cross-attention attends in the memories' 64-d value space (``value_space.py``).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sam2_fast.modeling import kernel_gate, value_space
from sam2_fast.modeling import transformer as _tf
from sam2_fast.modeling.transformer import Attention


def axial_rope_angles(head_dim: int, width: int, height: int, theta: float = 10000.0,
                      device=None) -> Tensor:
    """Rotation angles (height*width, head_dim // 2) for a row-major grid, float32."""
    if head_dim % 4 != 0:
        raise ValueError(f"axial RoPE needs a head width divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    # float32 exponent, as the official tables are computed, so angles agree to the ulp
    rates = 1.0 / (theta ** (torch.arange(quarter, dtype=torch.float32, device=device) * 4 / head_dim))
    idx = torch.arange(width * height, dtype=torch.float32, device=device)
    col = torch.remainder(idx, width)
    row = torch.div(idx, width, rounding_mode="floor")
    return torch.cat([col[:, None] * rates[None, :], row[:, None] * rates[None, :]], dim=1)


def axial_rope_table(head_dim: int, width: int, height: int, theta: float = 10000.0,
                     device=None) -> Tuple[Tensor, Tensor]:
    """(cos, sin), each (height*width, head_dim // 2) float32.

    Taken from ``torch.polar`` rather than ``torch.cos``/``torch.sin``: the complex path
    rounds some entries one ulp differently, and it is how the official tables are made
    (measured: the memory-attention stack then matches the reference bit for bit on CPU).
    """
    ang = axial_rope_angles(head_dim, width, height, theta, device)
    unit = torch.polar(torch.ones_like(ang), ang)  # (N, D/2) complex64
    return unit.real.contiguous(), unit.imag.contiguous()


# (cos, sin) -> their complex table, for the tables RoPEAttention keeps: building it is one
# kernel per attention call (8 per tracked frame); ids are safe keys because each entry
# holds its tables alive, and an entry is only used for the very same two objects.
_CIS: Dict[int, Tuple[Tensor, Tensor, Tuple[Optional[int], Optional[int]], Tensor]] = {}
_CIS_MAX = 32  # entries (2 per RoPE module and grid); cleared when exceeded


def _table_version(t: Tensor) -> Optional[int]:
    return None if t.is_inference() else t._version  # inference tensors have no version counter


def cis_table(cos: Tensor, sin: Tensor) -> Tensor:
    """``torch.complex(cos, sin)``, kept for table objects seen before (eager inference)."""
    if (torch.compiler.is_compiling() or (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))
            or (cos.is_cuda and torch.cuda.is_current_stream_capturing())):
        return torch.complex(cos, sin)
    hit = _CIS.get(id(cos))
    version = (_table_version(cos), _table_version(sin))
    if hit is not None and hit[0] is cos and hit[1] is sin and hit[2] == version:
        return hit[3]
    if len(_CIS) >= _CIS_MAX:
        _CIS.clear()
    cis = torch.complex(cos, sin)
    _CIS[id(cos)] = (cos, sin, version, cis)
    return cis


def rotate_cis(x: Tensor, cis: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Rotate channel pairs (x[..., 2i], x[..., 2i+1]) of x (..., N, D) by the unit complex
    table ``cis`` (N, D/2) complex64, broadcast over x's leading dims.

    The official complex product on a ``view_as_complex`` view, in float32, cast back to
    x's dtype. Bitwise equal to the real formula (re*cos - im*sin, re*sin + im*cos) on this
    CPU (fp32 and bf16 inputs, tested) and 6-10x faster than it on stride-2 views.
    ``out``: an fp32 tensor shaped like x with a contiguous last dim, written in place.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., N, D/2, 2)
    misaligned = any(st % 2 for st in pairs.stride()[:-1])
    if not torch.compiler.is_compiling():  # dynamo cannot trace storage_offset(); callers slice tokens only
        misaligned = misaligned or pairs.storage_offset() % 2 == 1
    if misaligned:
        pairs = pairs.contiguous()  # view_as_complex needs complex-aligned strides and offset
    if out is not None:
        torch.mul(torch.view_as_complex(pairs), cis, out=torch.view_as_complex(out.unflatten(-1, (-1, 2))))
        return out
    rotated = torch.view_as_real(torch.view_as_complex(pairs) * cis)  # (..., N, D/2, 2), new memory
    return rotated.flatten(-2).to(x.dtype)


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs of x (..., N, D) by the tables cos/sin (N, D/2) float32."""
    return rotate_cis(x, torch.complex(cos, sin))


def apply_axial_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, repeat_k: bool = False,
                     num_k_exclude: int = 0) -> Tuple[Tensor, Tensor]:
    """Rotate q (B, h, Nq, D) and the first Nk - num_k_exclude keys of k (B, h, Nk, D).

    The table (Nq, D/2) covers the query grid. With ``repeat_k`` the rotated keys must be a
    whole number of query-sized frames and the table applies to each frame (broadcast over
    a frame axis, never tiled in memory); otherwise they must be exactly as many as the
    queries. Trailing excluded keys pass through unchanged.
    """
    nq, nk = q.shape[-2], k.shape[-2]
    if not 0 <= num_k_exclude <= nk:
        raise ValueError(f"num_k_exclude_rope={num_k_exclude} is outside [0, {nk}] (number of keys)")
    if cos.shape[0] != nq:
        raise ValueError(f"RoPE table has {cos.shape[0]} positions but there are {nq} queries")
    n_rot = nk - num_k_exclude
    cis = cis_table(cos, sin)  # (Nq, D/2) complex64
    q_out = rotate_cis(q, cis)
    if n_rot == 0:
        return q_out, k
    if not (n_rot == nq or (repeat_k and n_rot % nq == 0)):
        if repeat_k:
            raise ValueError(f"{n_rot} rotated keys are not a whole number of {nq}-token memory frames")
        raise ValueError(f"{n_rot} rotated keys for {nq} queries; set rope_k_repeat for memories")
    # with pointer keys behind the grid, rotate straight into the full key buffer instead of
    # rotating then concatenating (one pass over the keys fewer; fp32 eager inference only)
    direct = (num_k_exclude > 0 and k.dtype == torch.float32 and not torch.compiler.is_compiling()
              and not (torch.is_grad_enabled() and k.requires_grad))
    k_out = k.new_empty(k.shape) if direct else None  # (B, h, Nk, D), contiguous
    src = k[..., :n_rot, :]
    dst = None if k_out is None else k_out[..., :n_rot, :]
    if n_rot != nq:  # memory frames: (B, h, F, HW, D), frame-major, the table broadcast over F
        src = src.unflatten(-2, (n_rot // nq, nq))
        dst = None if dst is None else dst.unflatten(-2, (n_rot // nq, nq))
    k_rot = rotate_cis(src, cis, out=dst)
    if n_rot != nq:
        k_rot = k_rot.flatten(-3, -2)
    if num_k_exclude == 0:
        return q_out, k_rot
    if k_out is not None:
        k_out[..., n_rot:, :].copy_(k[..., n_rot:, :])
        return q_out, k_out
    return q_out, torch.cat([k_rot, k[..., n_rot:, :]], dim=-2)


def rope_attention_core(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, *,
                        repeat_k: bool = False, num_k_exclude: int = 0, dropout_p: float = 0.0,
                        key_mask: Optional[Tensor] = None) -> Tensor:
    """Rotate then attend.

    q (B, h, Nq, D), k (B, h, Nk, D), v (B, h, Nk, Dv): projected, NOT yet rotated;
    cos/sin (Nq, D/2) float32 tables of the query grid; key_mask None or (Nk,) bool
    (True = attend; the static bank's padded keys). Returns (B, h, Nq, Dv).
    Where the memory-attention kernels are enabled (CUDA), the unmasked inference call goes
    to the dispatcher's selection layer (the value-space Triton kernel at d_v = D, or an SDPA
    backend, whichever measured fastest on this card): the memory self-attention. (A kernel
    that rotated inside ran at 20-25 TFLOP/s on an H200, 20-35x slower than the value-space
    kernel, and was removed.)
    """
    q, k = apply_axial_rope(q, k, cos, sin, repeat_k=repeat_k, num_k_exclude=num_k_exclude)
    if (key_mask is None and dropout_p == 0.0 and not (torch.is_grad_enabled() and q.requires_grad)
            and kernel_gate.kernel_enabled("memory_attention", q.device.type)):
        b, h, nq, d = q.shape
        qf, kf, vf = (t.reshape(b * h, t.shape[-2], t.shape[-1]) for t in (q, k, v))  # views for h == 1
        out = kernel_gate.dispatch().memory_attention_vspace(qf, kf, vf)
        return out.view(b, h, nq, v.shape[-1])
    if key_mask is not None:
        mask = key_mask.view(-1, 1, 1, key_mask.shape[-1])  # (1 or B, 1, 1, Nk): per row or shared
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return _tf.attention_core(q, k, v, dropout_p=dropout_p)


class RoPEAttention(Attention):
    """:class:`Attention` with axial RoPE on queries and (grid) keys.

    ``feat_sizes`` is kept for config fidelity only: tables are built lazily (and cached per
    grid and device) from the number of queries, which must form a square feature map, as
    the official model assumes when it rebuilds its table for another resolution.
    """

    def __init__(self, *args, rope_theta: float = 10000.0, rope_k_repeat: bool = False,
                 feat_sizes: Tuple[int, int] = (64, 64), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rope_theta = float(rope_theta)
        self.rope_k_repeat = rope_k_repeat
        self.feat_sizes = tuple(feat_sizes)
        # tables are derived data, not parameters: kept out of the state dict
        self._tables: Dict[Tuple[int, int, str], Tuple[Tensor, Tensor]] = {}
        # attend over the raw kv_in-wide values and fold v_proj into out_proj (value_space.py):
        # pays off when values are narrower than a head, i.e. the memory cross-attention
        # (64-d memories, one 256-d head); a plain attribute, so a test can turn it off
        self.value_space = self.kv_in_dim < self.head_dim

    def rope_table(self, num_tokens: int, device: torch.device) -> Tuple[Tensor, Tensor]:
        """Cached (cos, sin) of shape (num_tokens, head_dim/2) for a square grid."""
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"RoPE attention needs a square feature map, got {num_tokens} query tokens")
        key = (side, side, str(device))
        table = self._tables.get(key)
        if table is None:
            table = axial_rope_table(self.head_dim, side, side, self.rope_theta, device=device)
            self._tables[key] = table
        return table

    def _project_qk(self, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        # the value-space path projects queries and keys only; values stay raw
        if q.shape[-1] != self.embedding_dim:
            raise ValueError(f"queries have {q.shape[-1]} channels, expected {self.embedding_dim}")
        if k.shape[-1] != self.kv_in_dim or v.shape[-1] != self.kv_in_dim:
            raise ValueError(
                f"keys/values have {k.shape[-1]}/{v.shape[-1]} channels, expected {self.kv_in_dim}")
        if k.shape[:2] != v.shape[:2]:
            raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} differ in batch or length")
        return self._split(self.q_proj(q)), self._split(self.k_proj(k))

    def uses_value_space(self, q: Tensor, key_mask: Optional[Tensor]) -> bool:
        """Whether this call attends over the raw values (``value_space``) and folds the value
        projection into the output. Not under attention dropout (rows would no longer sum to
        one)."""
        return self.value_space and self.active_dropout == 0.0

    def forward(self, q: Tensor, k: Tensor, v: Tensor, num_k_exclude_rope: int = 0,
                key_mask: Optional[Tensor] = None, key_ranges: Optional[Tensor] = None) -> Tensor:
        """q: (B, Nq, C); k, v: (B, Nk, kv_in_dim); the last ``num_k_exclude_rope`` keys skip RoPE.
        key_mask: None, (Nk,) or (B, Nk) bool, True where a key takes part (padded banks; per row
        when objects of one batch have their own memory layouts);
        key_ranges: None or (B, 4) int32, the same keys as two ranges (lets the kernel take it)."""
        if key_mask is not None and (key_mask.dtype != torch.bool
                                     or key_mask.shape not in ((k.shape[1],), (k.shape[0], k.shape[1]))):
            raise ValueError(f"key_mask must be a ({k.shape[1]},) or ({k.shape[0]}, {k.shape[1]}) bool tensor, "
                             f"got {tuple(key_mask.shape)} {key_mask.dtype}")
        if self.uses_value_space(q, key_mask):
            return self._forward_value_space(q, k, v, num_k_exclude_rope, key_mask, key_ranges)
        qh, kh, vh = self._project(q, k, v)  # (B, heads, N, D)
        cos, sin = self.rope_table(qh.shape[-2], qh.device)
        out = rope_attention_core(qh, kh, vh, cos, sin, repeat_k=self.rope_k_repeat,
                                  num_k_exclude=num_k_exclude_rope, dropout_p=self.active_dropout,
                                  key_mask=key_mask)
        return self._merge(out)

    def _forward_value_space(self, q: Tensor, k: Tensor, m: Tensor, num_k_exclude: int,
                             key_mask: Optional[Tensor], key_ranges: Optional[Tensor] = None) -> Tensor:
        """The same result as the plain path, attending over the raw values m (B, Nk, kv_in)."""
        qh, kh = self._project_qk(q, k, m)  # (B, heads, N, D)
        b, heads, nq, _ = qh.shape
        nk, kv_in = m.shape[1], m.shape[2]
        cos, sin = self.rope_table(nq, qh.device)
        qh, kh = apply_axial_rope(qh, kh, cos, sin, repeat_k=self.rope_k_repeat, num_k_exclude=num_k_exclude)
        # heads fold into the batch; every head reads the same raw values (a view for 1 head)
        vals = m.to(qh.dtype) if not torch.is_autocast_enabled(m.device.type) else m
        vals = vals.unsqueeze(1).expand(b, heads, nk, kv_in).reshape(b * heads, nk, kv_in)
        ranges = None if key_ranges is None or heads == 1 else key_ranges.repeat_interleave(heads, 0)
        if key_mask is not None and key_mask.dim() == 2 and heads > 1:  # per-row masks follow the heads
            key_mask = key_mask.repeat_interleave(heads, 0)
        out = value_space.attend_value_space(qh.reshape(b * heads, nq, -1), kh.reshape(b * heads, nk, -1),
                                             vals, key_mask, ranges)  # (B*heads, Nq, kv_in)
        out = out.view(b, heads, nq, kv_in).transpose(1, 2).reshape(b, nq, heads * kv_in)
        weight, bias = value_space.autocast_fused_value_output(self.v_proj, self.out_proj, heads, self)
        return F.linear(out, weight, bias)  # (B, Nq, C)
