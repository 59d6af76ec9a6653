"""The kernel launches SAM 2 makes, captured from the real launchers (no GPU, no compile).

Each launcher (``window_attention_triton``, ``vspace_attention_triton``,
``upsample_masks_triton``) is called at SAM 2 shapes with
meta tensors while its ``@triton.jit`` kernel object is replaced by a recorder. What the
recorder sees is exactly what ``kernel[grid](*args, **kwargs)`` would hand to Triton on a
card: meta tensors report ``data_ptr() == 0`` for a fresh allocation and the byte offset for
a view, like the 256-byte aligned CUDA caching allocator, so pointer alignment is preserved.
``aot_compile.specialise`` then runs Triton's own argument binder on these arguments, so
the AOT test compiles the same specialisation (``tt.divisibility`` 16 on aligned pointers
and on integers divisible by 16, constexpr 1 for integers equal to 1 unless the kernel
lists them in ``do_not_specialize``) that a launch on the card compiles.

Card-dependent choices (tile per capability, split-KV from the SM count) are taken by the
launchers' own functions, shown a card through ``on_card`` (the module's ``card(device)``).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from sam2_fast.config import PRESETS
from sam2_fast.kernels._common import Card
from sam2_fast.kernels import connected_components as ccm
from sam2_fast.kernels import mask_upsample as mu
from sam2_fast.kernels import vspace_attention as vs
from sam2_fast.kernels import window_attention as wa
from sam2_fast.modeling import hiera as hiera_mod

META = torch.device("meta")
# Streaming multiprocessors of a representative card per capability (split-KV depends on it):
# A100 (sm_80) 108, RTX 3090 (sm_86) 82, L4 (sm_89) 58, H100 / H200 (sm_90) 132.
CARDS = {80: 108, 86: 82, 89: 58, 90: 132}
IMAGE_SIZE = 1024  # SAM 2's input side: 64x64 image tokens, 256x256 low-res masks
TOKENS = (IMAGE_SIZE // 16) ** 2  # 4096 memory / query tokens per frame


def _dtypes(configs, at: int) -> Tuple[torch.dtype, ...]:
    """The dtypes a module's ``all_configs()`` lists (what its launcher can be handed)."""
    return tuple(sorted({c[at] for c in configs}, key=str))


@dataclass
class Launch:
    """One ``kernel[grid](*args, **kwargs)`` call as the launcher made it."""

    kernel: object  # the @triton.jit function
    args: tuple
    kwargs: dict
    grid: tuple
    dtype: torch.dtype  # the launch's data dtype (what the 16-bit checks key on)
    cards: Tuple[int, ...]  # capabilities on which the launcher makes this launch
    what: str  # the SAM 2 call it stands for
    extra: dict = field(default_factory=dict)


class _Recorder:
    """Stands in for a JIT kernel: ``rec[grid](*args, **kw)`` records instead of launching."""

    def __init__(self, real, sink: List[tuple]):
        self.real, self.sink = real, sink
        self.arg_names = real.arg_names

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.real, args, kwargs, tuple(grid)))


@contextlib.contextmanager
def recording(module, *names: str) -> Iterator[List[tuple]]:
    sink: List[tuple] = []
    saved = {n: getattr(module, n) for n in names}
    try:
        for n in names:
            setattr(module, n, _Recorder(saved[n], sink))
        yield sink
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)


@contextlib.contextmanager
def on_card(cc: int, module):
    """Make the launcher of ``module`` see a card of compute capability ``cc`` with that card's
    SM count: its ``card(device)`` (through which the tile choice and split-KV see the GPU)
    answers for that card while the meta tensors stay on the meta device."""
    saved = module.card
    module.card = lambda device: Card(divmod(cc, 10), CARDS[cc])
    try:
        yield
    finally:
        module.card = saved


def _collect(sink, dtype, cards, what, **extra) -> List[Launch]:
    return [Launch(k, a, kw, g, dtype, tuple(cards), what, dict(extra)) for k, a, kw, g in sink]


# ----------------------------------------------------------------------------- window attention
def window_launches() -> List[Launch]:
    """Every Hiera block of the 8 official configs at 1024 px (batch 1; a batch only moves
    the grid), in each dtype, on each card (the tile depends on the capability; launches
    that come out the same on several cards are one variant, ``aot_compile.group``)."""
    out: List[Launch] = []
    seen = set()
    for name, cfg in sorted(PRESETS.items()):
        side = IMAGE_SIZE // 4
        for i, blk in enumerate(hiera_mod._block_plan(cfg.trunk)):
            pool = blk["q_stride"] is not None
            key = (side, blk["dim_out"], blk["num_heads"], blk["window"], pool)
            if key not in seen:
                seen.add(key)
                for cc in CARDS:
                    for dt in _dtypes(wa.all_configs([64]), 0):
                        qkv = torch.empty(1, side, side, 3 * blk["dim_out"], device=META, dtype=dt)
                        bias = torch.empty(3 * blk["dim_out"], device=META)
                        with recording(wa, "_window_attn_kernel") as sink, on_card(cc, wa):
                            wa.window_attention_triton(qkv, bias, blk["num_heads"], blk["window"], pool)
                        out += _collect(sink, dt, (cc,), f"{name} block {i} ({side}x{side}, window "
                                        f"{blk['window']}, heads {blk['num_heads']}, pool {pool})")
            if pool:
                side //= 2
    return out


# ----------------------------------------------------------------------------- value-space attention
def vspace_launches() -> List[Launch]:
    """Value-space cross-attention (d_qk 256, d_v 64 and the 256-wide comparison): from the
    first frames (4100 keys: not a multiple of 16) to a full bank (7 x 4096 + 64 keys), with
    and without per-batch key ranges, 1 and 3 objects; tiles and splits per card."""
    out: List[Launch] = []
    for cc in CARDS:
        for dt in _dtypes(vs.all_configs(), 1):
            for dk, dv in vs.HEAD_DIMS:
                for nk, b, ranged in ((TOKENS + 4, 1, False), (7 * TOKENS + 64, 1, False),
                                      (7 * TOKENS + 64, 3, True), (7 * TOKENS + 64, 1, True)):
                    q = torch.empty(b, TOKENS, dk, device=META, dtype=dt)
                    k = torch.empty(b, nk, dk, device=META, dtype=dt)
                    v = torch.empty(b, nk, dv, device=META, dtype=dt)
                    rng = torch.empty(b, 4, dtype=torch.int32, device=META) if ranged else None
                    with recording(vs, "_vspace_attn_kernel", "_vspace_merge_kernel") as sink, \
                            on_card(cc, vs):
                        vs.vspace_attention_triton(q, k, v, rng)
                    out += _collect(sink, dt, (cc,), f"{b} object(s), {nk} keys, ranges {ranged}",
                                    config=vs.pick_config(dk, dv, divmod(cc, 10)))
    return out


# ----------------------------------------------------------------------------- mask upsampling
def upsample_launches() -> List[Launch]:
    """Low-res logits (N, C, 256, 256) to frame sizes: 480p, 720p, 1080p video (one mask per
    object) and an odd photo with 3 multimask outputs; each output choice the launcher offers
    (mask, logits or both; mask always where it has no ``want_mask``)."""
    params = inspect.signature(mu.upsample_masks_triton).parameters
    outputs = [dict(want_logits=lg, **({"want_mask": m} if "want_mask" in params else {}))
               for m, lg in ((True, False), (False, True), (True, True)) if m or "want_mask" in params]
    out: List[Launch] = []
    for dt in _dtypes(mu.all_configs(), 0):
        for (n, c), hw in (((2, 1), (480, 854)), ((2, 1), (720, 1280)), ((1, 1), (1080, 1920)),
                           ((1, 3), (1200, 1600)), ((1, 3), (375, 500))):
            for kw in outputs:
                x = torch.empty(n, c, 256, 256, device=META, dtype=dt)
                with recording(mu, "_upsample_threshold_kernel") as sink:
                    mu.upsample_masks_triton(x, hw, 0.0, **kw)
                out += _collect(sink, dt, CARDS, f"{n}x{c} masks to {hw[0]}x{hw[1]}, {kw}")
    return out


# ----------------------------------------------------------------------------- connected components
def components_launches() -> List[Launch]:
    """Hole filling's labelling: (N, 1, S/4, S/4) bool masks for S = 512, 1024 (the video
    predictor's low-res masks, 1 and 8 objects) and 1024 x 1024 high-res masks; H and W are
    not specialised, so every size is one variant."""
    out: List[Launch] = []
    for n, side in ((1, 256), (8, 256), (2, 128), (1, 1024)):
        m = torch.empty(n, 1, side, side, device=META, dtype=torch.bool)
        with recording(ccm, "_cc_kernel") as sink:
            ccm.connected_components_triton(m, check=False)
        out += _collect(sink, torch.uint8, CARDS, f"{n} mask(s) of {side}x{side}")
    return out


LAUNCHERS: Dict[str, Callable[[], List[Launch]]] = {
    "window": window_launches, "vspace": vspace_launches,
    "upsample": upsample_launches, "components": components_launches,
}


def all_launches(kinds: Optional[Tuple[str, ...]] = None) -> List[Launch]:
    out: List[Launch] = []
    for kind, fn in LAUNCHERS.items():
        if kinds is None or kind in kinds:
            out += fn()
    return out
