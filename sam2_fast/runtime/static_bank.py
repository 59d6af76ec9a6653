"""A fixed-shape memory bank in front of the memory attention.

The memory attention's keys change length on every frame: 1..7 spatial memories of HW
tokens (more with several conditioning frames) followed by 0..16 object pointers of
``hidden_dim / mem_dim`` tokens each. Every new length recompiles ``torch.compile`` code
and cannot be replayed from a CUDA graph. :class:`StaticMemoryBank` copies the memory into
a preallocated buffer of fixed capacity, laid out as

    [ spatial slots: F frames x HW tokens | pointer slots: P tokens (+ alignment) ]

and attends with a key-validity mask. Padded keys get a score of -inf, so their softmax
weight is exactly 0 and the result equals the unpadded attention up to summation order.

RoPE: spatial keys are rotated with the query grid's table applied to each of the F
frames (the frame period is HW, as ``rope_k_repeat`` does); the whole pointer region is
left unrotated, so the excluded count is the pointer capacity, not the number of pointers
present. This is the cross-attention module's own call (``rope.apply_axial_rope``, value
space), with the padded keys masked: it agrees with the unpadded call on the valid keys
because a key's rotation depends only on its position within its frame.

Capacity: F comes in two buckets, ``num_maskmem`` frames (one conditioning frame plus
``num_maskmem - 1`` recent ones: the steady state of tracking) and ``num_maskmem +
extra_cond_frames`` (more prompted frames). Each bucket is its own static shape (one
compiled graph / CUDA graph each); the small bucket keeps the steady state free of
padding cost. Memories beyond the largest bucket, training mode, or a spatial length that
is not a whole number of frames go to the plain module, and the fallback is counted.
"""

from __future__ import annotations

import collections
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from sam2_fast.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
from sam2_fast.modeling.rope import RoPEAttention

_MAX_BUFFER_SETS = 8  # (bucket, batch, dtype, ...) combinations kept before the cache is reset


def _attention_mask(key_ok: Tensor) -> Optional[Tensor]:
    """The cross-attention's key mask (Nk,) from the key-validity flags (False -> score -inf)."""
    return key_ok


def key_ranges(key_ok: Tensor, num_spatial_slots: int, batch: int) -> Tensor:
    """(B, 4) int32 ranges of the valid keys: [0, n_spatial) and [S, S + n_ptr), computed on
    the device from the flags (no host sync, so a CUDA graph replays it with new counts).
    ``key_ok``: (Nk,) shared by the batch, or (B, Nk) per row (objects with their own
    layouts). Valid only for the bank's layout, where each region's valid keys are a prefix
    (_stage, memory_gather.build_memory)."""
    flags = key_ok if key_ok.dim() == 2 else key_ok.unsqueeze(0)
    n_sp = flags[:, :num_spatial_slots].sum(dim=1, dtype=torch.int32)  # (B or 1,)
    n_ptr = flags[:, num_spatial_slots:].sum(dim=1, dtype=torch.int32)
    zero = torch.zeros_like(n_sp)
    start = torch.full_like(n_sp, num_spatial_slots)
    return torch.stack([zero, n_sp, start, start + n_ptr], dim=1).expand(batch, 4).contiguous()


def _layer_step(layer: MemoryAttentionLayer, x: Tensor, mem: Tensor, mem_pos: Optional[Tensor],
                query_pos: Optional[Tensor], key_ok: Optional[Tensor], num_spatial_slots: int,
                ranges: Optional[Tensor] = None) -> Tensor:
    """One memory-attention layer (eval) over the padded bank; x: (B, HW, C), mem (B, Nk, mem_dim).

    The cross-attention is the module's own (value space, RoPE broadcast over frames) with
    the whole region after the spatial slots left unrotated and padded keys masked.
    """
    h = layer.norm1(x)
    qk = h + query_pos if (layer.pos_enc_at_attn and query_pos is not None) else h
    x = x + layer.self_attn(qk, qk, h)  # the frame's own tokens: already a static shape
    h = layer.norm2(x)
    q = h + query_pos if (layer.pos_enc_at_cross_attn_queries and query_pos is not None) else h
    k = mem + mem_pos if (layer.pos_enc_at_cross_attn_keys and mem_pos is not None) else mem
    x = x + layer.cross_attn_image(q, k, mem, num_k_exclude_rope=mem.shape[1] - num_spatial_slots,
                                   key_mask=key_ok, key_ranges=ranges)
    return x + layer.linear2(layer._act(layer.linear1(layer.norm3(x))))


def check_supported(module: nn.Module) -> Optional[str]:
    """Why ``module`` cannot sit behind the bank (None when it can)."""
    if not isinstance(module, MemoryAttention):
        return f"memory_attention is a {type(module).__name__}, not sam2_fast's MemoryAttention"
    for i, layer in enumerate(module.layers):
        if not isinstance(layer, MemoryAttentionLayer):
            return f"layer {i} is a {type(layer).__name__}, not a MemoryAttentionLayer"
        cross = layer.cross_attn_image
        if not isinstance(cross, RoPEAttention) or not cross.rope_k_repeat:
            return f"layer {i}'s cross-attention is not a RoPE attention with rope_k_repeat"
    return None


class StaticMemoryBank(nn.Module):
    """Same call as ``MemoryAttention.forward``; runs it on a fixed-capacity, masked bank.

    ``memory_attention`` is referenced, not owned as a submodule (so installing the bank
    leaves the predictor's state dict unchanged); install with :meth:`install`.
    """

    def __init__(self, memory_attention: MemoryAttention, *, num_maskmem: int, max_obj_ptrs: int,
                 tokens_per_ptr: int, extra_cond_frames: int = 2, align: int = 16,
                 counters: Optional[collections.Counter] = None) -> None:
        super().__init__()
        reason = check_supported(memory_attention)
        if reason is not None:
            raise TypeError(f"StaticMemoryBank: {reason}")
        if num_maskmem < 1 or max_obj_ptrs < 0 or tokens_per_ptr < 1 or extra_cond_frames < 0 or align < 1:
            raise ValueError(f"bad bank capacity: num_maskmem={num_maskmem}, max_obj_ptrs={max_obj_ptrs}, "
                             f"tokens_per_ptr={tokens_per_ptr}, extra_cond_frames={extra_cond_frames}")
        self.__dict__["inner"] = memory_attention  # a plain reference: not a registered child
        self.frame_buckets: Tuple[int, ...] = tuple(sorted({num_maskmem, num_maskmem + extra_cond_frames}))
        self.pointer_tokens = max_obj_ptrs * tokens_per_ptr
        self.align = align
        self.counters = counters if counters is not None else collections.Counter()
        self._buffers_by_key: Dict[tuple, Tuple[Tensor, Tensor, Tensor]] = {}
        self._warm_grids: set = set()
        # the function run on the padded bank; enable_fast_runtime may compile / graph it
        self.core: Callable[..., Tensor] = self.padded_forward

    # ------------------------------------------------------------------ layout
    def layout(self, frames: int, hw: int) -> Tuple[int, int]:
        """(spatial slots, total keys) of the bucket holding ``frames`` frames of ``hw`` tokens."""
        spatial = frames * hw
        total = spatial + self.pointer_tokens
        total += (-total) % self.align  # alignment slots join the (unrotated, masked) pointer region
        return spatial, total

    def describe(self, hw: Optional[int] = None) -> Dict[str, object]:
        info: Dict[str, object] = {"frame_buckets": self.frame_buckets, "pointer_tokens": self.pointer_tokens}
        if hw is not None:
            info["keys_per_bucket"] = {f: self.layout(f, hw)[1] for f in self.frame_buckets}
        return info

    # ------------------------------------------------------------------ install
    def install(self) -> Callable[[], None]:
        """Route ``inner(...)`` through this bank; returns the undo function."""
        inner = self.inner
        had = "forward" in inner.__dict__
        old = inner.__dict__.get("forward")
        inner.forward = self.forward

        def undo() -> None:
            if had:
                inner.forward = old
            else:
                inner.__dict__.pop("forward", None)

        return undo

    def plain(self, *args, **kwargs) -> Tensor:
        """The unpadded module (its class forward, bypassing the installed bank)."""
        return MemoryAttention.forward(self.inner, *args, **kwargs)

    # ------------------------------------------------------------------ forward
    def forward(self, curr: Union[Tensor, List[Tensor]], memory: Tensor,
                curr_pos: Optional[Union[Tensor, List[Tensor]]] = None, memory_pos: Optional[Tensor] = None,
                num_obj_ptr_tokens: int = 0) -> Tensor:
        """curr, curr_pos: (HW, B, C); memory, memory_pos: (M, B, mem_dim) -> (HW, B, C)."""
        args = (curr, memory, curr_pos, memory_pos, num_obj_ptr_tokens)
        if isinstance(curr, (list, tuple)):
            if len(curr) != 1 or not isinstance(curr_pos, (list, tuple)) or len(curr_pos) != 1:
                return self._fallback("curr given as a list of several levels", *args)
            curr, curr_pos = curr[0], curr_pos[0]
        if curr.dim() != 3 or memory.dim() != 3 or curr.shape[1] != memory.shape[1]:
            return self._fallback("unexpected shapes", *args)
        plan = self._plan(curr, memory, num_obj_ptr_tokens)
        if isinstance(plan, str):
            return self._fallback(plan, *args)
        frames, n_spatial, n_ptr = plan
        hw, batch = curr.shape[0], curr.shape[1]
        dtype = torch.promote_types(memory.dtype, curr.dtype)  # as MemoryAttention widens
        mem, mem_pos, key_ok = self._stage(frames, hw, batch, dtype, memory, memory_pos, n_spatial, n_ptr)
        self._warm_tables(hw, curr.device)
        self.counters["bank_calls"] += 1
        self.counters[f"bank_bucket_{frames}"] += 1
        return self.core(curr, curr_pos, mem, mem_pos, key_ok, self.layout(frames, hw)[0])

    def _fallback(self, reason: str, curr, memory, curr_pos, memory_pos, num_obj_ptr_tokens) -> Tensor:
        self.counters["bank_fallbacks"] += 1
        self.counters[f"bank_fallback: {reason}"] += 1
        return self.plain(curr, memory, curr_pos=curr_pos, memory_pos=memory_pos,
                          num_obj_ptr_tokens=num_obj_ptr_tokens)

    def _plan(self, curr: Tensor, memory: Tensor, num_ptr: int) -> Union[str, Tuple[int, int, int]]:
        """(bucket frames, spatial tokens, pointer tokens) or the reason the bank cannot take it."""
        if self.inner.training:
            return "training mode (dropout)"
        if torch.is_grad_enabled() and (curr.requires_grad or memory.requires_grad):
            return "autograd"
        hw, total = curr.shape[0], memory.shape[0]
        if not 0 <= num_ptr <= total:
            return "num_obj_ptr_tokens outside the memory"
        n_spatial = total - num_ptr
        if n_spatial % hw != 0:
            return "spatial memory is not a whole number of frames"
        frames = n_spatial // hw
        bucket = next((f for f in self.frame_buckets if f >= frames), None)
        if bucket is None:
            return "more memory frames than the largest bucket"
        spatial_slots, total_slots = self.layout(bucket, hw)
        if num_ptr > total_slots - spatial_slots:
            return "more pointer tokens than the pointer capacity"
        return bucket, n_spatial, num_ptr

    def _stage(self, frames: int, hw: int, batch: int, dtype: torch.dtype, memory: Tensor,
               memory_pos: Optional[Tensor], n_spatial: int, n_ptr: int) -> Tuple[Tensor, Optional[Tensor], Tensor]:
        """Copy the variable memory into the bucket's persistent buffers (batch-first)."""
        spatial_slots, total_slots = self.layout(frames, hw)
        dim, device = memory.shape[-1], memory.device
        key = (frames, hw, batch, dim, dtype, device, torch.is_inference_mode_enabled())
        mem, mem_pos, key_ok = self._persistent(key, batch, total_slots, dim, dtype, device, (total_slots,))
        ptr_stop = spatial_slots + n_ptr
        # (M, B, dim) -> (B, M, dim) while copying; copy_ also upcasts bf16 stored memories
        mem[:, :n_spatial].copy_(memory[:n_spatial].transpose(0, 1))
        mem[:, spatial_slots:ptr_stop].copy_(memory[n_spatial:].transpose(0, 1))
        if memory_pos is not None:
            mem_pos[:, :n_spatial].copy_(memory_pos[:n_spatial].transpose(0, 1))
            mem_pos[:, spatial_slots:ptr_stop].copy_(memory_pos[n_spatial:].transpose(0, 1))
        key_ok.zero_()
        key_ok[:n_spatial] = True
        key_ok[spatial_slots:ptr_stop] = True
        return mem, (mem_pos if memory_pos is not None else None), key_ok

    def _warm_tables(self, hw: int, device: torch.device) -> None:
        """Build every layer's RoPE table of the ``hw`` grid once, before any graph capture."""
        key = (hw, str(device))
        if key in self._warm_grids:
            return
        for layer in self.inner.layers:
            layer.cross_attn_image.rope_table(hw, device)
            if isinstance(layer.self_attn, RoPEAttention):
                layer.self_attn.rope_table(hw, device)
        self._warm_grids.add(key)

    def padded_forward(self, curr: Tensor, curr_pos: Optional[Tensor], mem: Tensor,
                       mem_pos: Optional[Tensor], key_ok: Tensor, num_spatial_slots: int) -> Tensor:
        """The static-shape computation (see :func:`padded_attention`); compiled and graphed
        by the fast runtime, once per bucket."""
        return padded_attention(self.inner, curr, curr_pos, mem, mem_pos, key_ok, num_spatial_slots)

    def buffers(self, frames: int, hw: int, batch: int, dim: int, dtype: torch.dtype,
                device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
        """Persistent (memory, memory_pos, key_ok (B, Nk)) of a bucket for per-row layouts
        (the batched object step writes them in place; graphs read them in place)."""
        total = self.layout(frames, hw)[1]
        key = ("rows", frames, hw, batch, dim, dtype, device, torch.is_inference_mode_enabled())
        return self._persistent(key, batch, total, dim, dtype, device, (batch, total))

    def _persistent(self, key: tuple, batch: int, total: int, dim: int, dtype: torch.dtype,
                    device: torch.device, flags_shape: Tuple[int, ...]) -> Tuple[Tensor, Tensor, Tensor]:
        """The (memory, memory_pos, key flags) buffers of ``key``, made on first use."""
        bufs = self._buffers_by_key.get(key)
        if bufs is None:
            if len(self._buffers_by_key) >= _MAX_BUFFER_SETS:
                self._buffers_by_key.clear()
            # zeros, not empty: a padded slot is masked, but 0 * NaN garbage would still be NaN
            bufs = (torch.zeros(batch, total, dim, dtype=dtype, device=device),
                    torch.zeros(batch, total, dim, dtype=dtype, device=device),
                    torch.zeros(flags_shape, dtype=torch.bool, device=device))
            self._buffers_by_key[key] = bufs
        return bufs

    def run_rows(self, curr: Tensor, curr_pos: Optional[Tensor], mem: Tensor, mem_pos: Tensor,
                 key_ok: Tensor, frames: int) -> Tensor:
        """The bucket's core on a bank staged by the caller (``buffers``), counted like forward."""
        self._warm_tables(curr.shape[0], curr.device)
        self.counters["bank_calls"] += 1
        self.counters[f"bank_bucket_{frames}"] += 1
        return self.core(curr, curr_pos, mem, mem_pos, key_ok, self.layout(frames, curr.shape[0])[0])


def padded_attention(inner: MemoryAttention, curr: Tensor, curr_pos: Optional[Tensor], mem: Tensor,
                     mem_pos: Optional[Tensor], key_ok: Optional[Tensor], num_spatial_slots: int) -> Tensor:
    """The memory attention (eval) on a padded bank: curr, curr_pos (HW, B, C); mem, mem_pos
    (B, Nk, mem_dim); key_ok (Nk,) for the batch or (B, Nk) per row, None when every key is
    valid; ``num_spatial_slots`` = frames x HW (keys after it are never rotated; a constant
    of the bucket, so compiled code and graphs specialise on it). Returns (HW, B, C)."""
    x = curr
    if inner.pos_enc_at_input and curr_pos is not None:
        x = x + 0.1 * curr_pos
    x = x.transpose(0, 1)  # (B, HW, C)
    query_pos = None if curr_pos is None else curr_pos.transpose(0, 1)
    ranges = None
    if key_ok is not None:
        ranges = key_ranges(key_ok, num_spatial_slots, x.shape[0])  # once per frame, for every layer
        key_ok = _attention_mask(key_ok)
    for layer in inner.layers:
        x = _layer_step(layer, x, mem, mem_pos, query_pos, key_ok, num_spatial_slots, ranges)
    return inner.norm(x).transpose(0, 1)


def bank_for(model: nn.Module, *, extra_cond_frames: int = 2,
             counters: Optional[collections.Counter] = None) -> StaticMemoryBank:
    """A bank sized from a SAM2Base's tracking config (not yet installed)."""
    per_ptr = model.hidden_dim // model.mem_dim if model.use_obj_ptrs_in_encoder else 1
    max_ptrs = model.max_obj_ptrs_in_encoder if model.use_obj_ptrs_in_encoder else 0
    extra = extra_cond_frames
    if model.max_cond_frames_in_attn > 0:  # the config itself bounds the conditioning frames
        extra = min(extra, model.max_cond_frames_in_attn - 1)
    return StaticMemoryBank(model.memory_attention, num_maskmem=model.num_maskmem, max_obj_ptrs=max_ptrs,
                            tokens_per_ptr=per_ptr, extra_cond_frames=extra, counters=counters)

