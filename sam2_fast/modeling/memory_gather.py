"""The memory bank one tracking step attends to, for one object or many at once.

Which memories a frame reads (conditioning frames, recent frames, object pointers) is
decided per object by ``SAM2Base._memory_plan`` and described by a :class:`MemoryPlan`:
plain Python (frame numbers, temporal positions and references to the stored tensors), no
tensor work. :func:`build_memory` turns the plans of all objects of one step into one
batch-first, padded bank

    row r: [ spatial: F frames x HW tokens | pointers: P tokens ]    (rows, F*HW + P, mem_dim)

where row r holds its own plan's frames first (in plan order) and its own pointer tokens
first in the pointer region; the rest of each region is padding, marked invalid in
``key_ok`` (rows, Nk). Every row thus carries its own layout (an object added mid-video,
one with an extra conditioning frame, fewer pointers near the start). RoPE stays right:
spatial keys are rotated with the frame period HW and padding is whole frames, and the
pointer region is never rotated.

Launch economy: objects tracked together store each frame's memory as row views of one
batched tensor (``video/outputs.py``). The builder copies a slot for a run of consecutive
rows whose sources are consecutive rows of one storage in ONE op (found from storage,
strides and offset: inference tensors keep no ``_base``), so a frame of 8 objects tracked
together costs as many copies as a frame of one. Rows whose sources differ (a correction
on one object) fall back to their own copies; correctness never depends on the sharing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from sam2_fast.modeling.common import to_device_async


@dataclass(frozen=True)
class SlotSource:
    """One memory frame of a plan: which stored frame lands in the slot, with which t_pos."""

    frame: int  # the video frame the memory was encoded on
    t_pos: int  # 0: conditioning frame; num_maskmem - 1: the adjacent frame
    features: Tensor  # (b, mem_dim, H, W) as stored (bf16, maybe offloaded)
    pos_enc: Tensor  # (b, mem_dim, H, W) its spatial position encoding


@dataclass(frozen=True)
class PointerSource:
    offset: int  # temporal tag of the pointer (frames away, signed or not)
    obj_ptr: Tensor  # (b, C)


@dataclass(frozen=True)
class MemoryPlan:
    """What one object (b rows sharing one output dict) attends to on ``frame_idx``."""

    frame_idx: int
    slots: Tuple[SlotSource, ...]
    pointers: Tuple[PointerSource, ...]
    max_ptrs: int  # pointer offsets are normalised by max_ptrs - 1
    batch: int  # rows of the stored tensors (1 per object in the predictors)

    def layout_key(self) -> Hashable:
        """Equal keys: identical key layout and position encodings (rows may share one row)."""
        return (tuple(s.t_pos for s in self.slots), tuple(p.offset for p in self.pointers), self.max_ptrs)


@dataclass
class PaddedMemory:
    memory: Tensor  # (rows, Nk, mem_dim) batch-first
    memory_pos: Tensor  # (rows, Nk, mem_dim)
    key_ok: Optional[Tensor]  # (rows, Nk) bool, None when every key of every row is valid
    num_spatial: int  # F * HW: keys before it are rotated frames, keys after it pointers
    frames: int  # F
    num_ptr_tokens: int  # pointer tokens of every row (tight uniform layouts; else the capacity)
    counts: List[Tuple[int, int]]  # per row (valid spatial keys, valid pointer keys)


def _dense_row_size(t: Tensor) -> int:
    """Elements of one row if a row is laid out densely (row-major), else 0 (metadata only:
    no tensor op, this runs for every source of every step)."""
    expected = 1
    for size, st in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and st != expected:
            return 0
        expected *= size
    return expected


def _row_stride(t: Tensor) -> int:
    s0 = t.stride(0)
    if t.shape[0] == 1 and s0 != 0:
        s0 = _dense_row_size(t) or s0
    return s0


def _storage_rows(t: Tensor) -> Tuple[Hashable, int, int]:
    """(key of the row storage, first row, row step) of a (b, ...) tensor.

    Two tensors with the same key are row ranges of one strided tensor: rows of both can
    be addressed as one view. Broadcast rows (stride 0, e.g. the shared position encoding
    expanded to a batch) have step 0: every row reads the same data. A single row's dim-0
    stride is arbitrary (size-1 dim), so a dense single row takes its dense row size: two
    such rows that sit back to back in one storage then read as one two-row view, which is
    exactly their data whatever their own dim-0 strides say.
    """
    off, s0 = t.storage_offset(), _row_stride(t)
    inner = (t.untyped_storage().data_ptr(), t.device, t.dtype, tuple(t.shape[1:]), t.stride()[1:])
    if s0 == 0:
        return inner + (0, off), 0, 0
    return inner + (s0, off % s0), off // s0, 1


def row_storage(t: Tensor) -> Hashable:
    """Key of the strided row storage a (b, ...) tensor reads (equal for rows of one tensor)."""
    return _storage_rows(t)[0]


def _runs(entries: List[Tuple[int, int, Tensor, Hashable]]) -> List[Tuple[int, int, Tensor, Hashable]]:
    """Merge (bank row, rows, source, extra) entries into runs of consecutive bank rows that
    read one storage, either consecutive rows of it or one row for all (broadcast); entries
    merge only with equal ``extra``. Returns [(bank row, rows, source view (rows, ...), extra)]."""
    runs: List[list] = []  # [bank_row, n, src, key, first, mode, extra]; mode: "one", "seq", "bcast"
    for row, b, src, extra in entries:
        key, first, step = _storage_rows(src)
        mode = "bcast" if step == 0 else ("seq" if b > 1 else "one")
        if runs:
            r = runs[-1]
            if r[3] == key and r[6] == extra and r[0] + r[1] == row:
                if r[5] in ("one", "seq") and mode in ("one", "seq") and r[4] + r[1] == first:
                    r[1] += b
                    r[5] = "seq"
                    continue
                if r[5] in ("one", "bcast") and mode in ("one", "bcast") and r[4] == first and (r[5] == "bcast" or r[1] == 1):
                    r[1] += b
                    r[5] = "bcast"
                    continue
        runs.append([row, b, src, key, first, mode, extra])
    out = []
    for row, n, src, key, first, mode, extra in runs:
        if n == src.shape[0]:
            view = src
        elif mode == "bcast":
            view = src[:1].expand(n, *src.shape[1:])
        else:
            s0 = _row_stride(src)
            base_off = src.storage_offset() - _storage_rows(src)[1] * s0
            view = src.as_strided((n,) + tuple(src.shape[1:]), (s0,) + tuple(src.stride()[1:]), base_off + first * s0)
        out.append((row, n, view, extra))
    return out


def build_memory(model, plans: Sequence[MemoryPlan], rows: int, hw: int, dtype: torch.dtype,
                 device: torch.device, frames: Optional[int] = None, ptr_tokens: Optional[int] = None,
                 buffers: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
                 want_mask: bool = False) -> PaddedMemory:
    """One (rows, Nk, mem_dim) bank for the plans (stacked in order) plus padding rows.

    ``frames`` / ``ptr_tokens``: the layout's capacity (default: the largest plan's, i.e. a
    tight bank); ``buffers`` (memory, memory_pos, key_ok) persistent storage of that shape
    (the static bank's, so compiled code and CUDA graphs see one shape); ``want_mask``:
    build ``key_ok`` even when nothing is padded.
    """
    dim = model.mem_dim
    per_ptr = model.hidden_dim // dim if model.use_obj_ptrs_in_encoder else 1
    for p in plans:
        for s in p.slots:
            if s.features.shape[-2] * s.features.shape[-1] != hw:
                raise ValueError(f"memory of frame {s.frame} has {s.features.shape[-2] * s.features.shape[-1]} "
                                 f"tokens per frame, the current frame {hw}")
    need_f = max(len(p.slots) for p in plans)
    need_p = max(len(p.pointers) for p in plans) * per_ptr
    num_frames = need_f if frames is None else frames
    num_ptr = need_p if ptr_tokens is None else ptr_tokens
    if need_f > num_frames or need_p > num_ptr:
        raise ValueError(f"plans need {need_f} frames / {need_p} pointer tokens, the layout holds "
                         f"{num_frames} / {num_ptr}")
    spatial = num_frames * hw
    total = spatial + num_ptr
    used = sum(p.batch for p in plans)
    if used > rows:
        raise ValueError(f"{used} plan rows do not fit a bank of {rows} rows")
    uniform = len({p.layout_key() for p in plans}) == 1
    padded = not (uniform and used == rows and need_f == num_frames and need_p == num_ptr)
    if buffers is not None:
        memory, memory_pos, key_ok = buffers
    elif padded:
        # zeros: a padded key is masked, but 0 * NaN garbage in its value would still be NaN
        memory = torch.zeros(rows, total, dim, dtype=dtype, device=device)
        memory_pos = torch.zeros(rows, total, dim, dtype=dtype, device=device)
        key_ok = None
    else:
        memory = torch.empty(rows, total, dim, dtype=dtype, device=device)
        memory_pos = torch.empty(rows, total, dim, dtype=dtype, device=device)
        key_ok = None

    # ---- spatial slots: features, then position = spatial encoding + temporal row
    starts, r = [], 0
    for p in plans:
        starts.append(r)
        r += p.batch
    tpos_table = model.maskmem_tpos_enc  # (num_maskmem, 1, 1, dim), newest-last
    last = model.num_maskmem - 1
    for k in range(need_f):
        feat_entries = [(r0, p.batch, p.slots[k].features, None) for r0, p in zip(starts, plans) if k < len(p.slots)]
        pos_entries = [(r0, p.batch, p.slots[k].pos_enc, p.slots[k].t_pos)
                       for r0, p in zip(starts, plans) if k < len(p.slots)]
        dst_rows = slice(k * hw, (k + 1) * hw)
        for r0, n, src, _ in _runs(feat_entries):
            # copy_ casts (bf16 storage) and brings offloaded memories to the device
            memory[r0:r0 + n, dst_rows].copy_(src.flatten(2).transpose(1, 2), non_blocking=True)
        for r0, n, src, t_pos in _runs(pos_entries):
            dst = memory_pos[r0:r0 + n, dst_rows]
            dst.copy_(src.flatten(2).transpose(1, 2))
            dst.add_(tpos_table[last - t_pos].view(1, 1, dim))

    # ---- pointers: a C-wide pointer becomes per_ptr tokens of width mem_dim, pointer-major
    need_ptrs = need_p // per_ptr
    for q in range(need_ptrs):
        entries = [(r0, p.batch, p.pointers[q].obj_ptr, None) for r0, p in zip(starts, plans) if q < len(p.pointers)]
        for r0, n, src, _ in _runs(entries):
            dst = memory[r0:r0 + n, spatial + q * per_ptr:spatial + (q + 1) * per_ptr]
            dst.copy_(src.reshape(n, per_ptr, dim))
    if need_ptrs:
        _pointer_positions(model, plans, starts, memory_pos, spatial, per_ptr, device)

    counts = [(len(p.slots) * hw, len(p.pointers) * per_ptr) for p in plans for _ in range(p.batch)]
    counts += [(hw, 0)] * (rows - used)  # padding rows: one valid frame (finite outputs, never stored)
    if padded or want_mask:
        key_ok = _key_flags(counts, spatial, total, device, out=None if buffers is None else buffers[2])
    return PaddedMemory(memory, memory_pos, key_ok, spatial, num_frames, num_ptr if padded else need_p, counts)


def _pointer_positions(model, plans: Sequence[MemoryPlan], starts: List[int], memory_pos: Tensor,
                       spatial: int, per_ptr: int, device: torch.device) -> None:
    """Temporal encodings of the pointer tokens: one encoding per distinct offset list
    (all objects tracked together share one), the same for every token of a pointer."""
    dim = memory_pos.shape[-1]
    groups: Dict[Hashable, List[Tuple[int, MemoryPlan]]] = {}
    for r0, p in zip(starts, plans):
        if p.pointers:
            groups.setdefault((tuple(x.offset for x in p.pointers), p.max_ptrs), []).append((r0, p))
    for (offsets, max_ptrs), members in groups.items():
        n_tok = len(offsets) * per_ptr
        if model.add_tpos_enc_to_obj_ptrs:
            tpos = model._get_tpos_enc(list(offsets), device, max_abs_pos=max_ptrs)  # (P, dim)
            src = tpos[None, :, None, :].expand(1, len(offsets), per_ptr, dim)
        else:
            src = None
        # consecutive member rows share one write
        runs: List[List[int]] = []
        for r0, p in members:
            if runs and runs[-1][0] + runs[-1][1] == r0:
                runs[-1][1] += p.batch
            else:
                runs.append([r0, p.batch])
        for r0, n in runs:
            dst = memory_pos[r0:r0 + n, spatial:spatial + n_tok]
            if src is None:
                dst.zero_()
            else:
                dst.view(n, len(offsets), per_ptr, dim).copy_(src)


def _key_flags(counts: List[Tuple[int, int]], spatial: int, total: int, device: torch.device,
               out: Optional[Tensor] = None) -> Tensor:
    """(rows, Nk) validity: per row a prefix of each region (what ``key_ranges`` assumes)."""
    n = to_device_async(torch.tensor(counts, dtype=torch.int64), device)  # (rows, 2), no sync
    idx = torch.arange(total, device=device)
    flags = (idx < n[:, :1]) | ((idx >= spatial) & (idx < spatial + n[:, 1:]))
    if out is None:
        return flags
    out.copy_(flags)
    return out
