"""Counted FLOPs and bytes of one frame's memory attention, before and after the value space.

    PYTHONPATH=. .venv/bin/python benchmarks/count_memory_attention.py [--image-size 1024]

Tiny's memory attention (4 layers) with a full bank: 7 memory frames of (S/16)² tokens plus
16 object pointers (64 tokens), one object. Counted, not estimated: FLOPs with
``torch.utils.flop_counter`` (plus our formulas for the attention ops it lacks,
``sam2_fast.bench.flops``), bytes with ``ByteCounter`` (tensor inputs + outputs of every
non-view aten op: what an unfused eager run moves). Everything runs under
``FakeTensorMode``, so no arithmetic is done and 1024 px takes seconds on a CPU.

Rows: the reference (sam2 1.1.0), ours with projected values (``value_space = False``, the
arithmetic of the reference), ours in the value space (the default), and the static bank
(masked, padded to 7 frames + 64 pointer slots) both ways.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import replace
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from sam2_fast.bench.flops import ByteCounter, attention_flops, missing_attention_ops
from sam2_fast.modeling import value_space as vs
from sam2_fast.config import PRESETS
from sam2_fast.modeling.memory_attention import build_memory_attention
from sam2_fast.runtime.static_bank import StaticMemoryBank

CFG = PRESETS["sam2.1_hiera_tiny"]


def _reference():
    from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
    from sam2.modeling.sam.transformer import RoPEAttention

    def attn(**extra):
        return RoPEAttention(rope_theta=10000.0, feat_sizes=[64, 64], embedding_dim=256, num_heads=1,
                             downsample_rate=1, dropout=0.1, **extra)

    layer = MemoryAttentionLayer(activation="relu", cross_attention=attn(rope_k_repeat=True, kv_in_dim=64),
                                 d_model=256, dim_feedforward=2048, dropout=0.1, pos_enc_at_attn=False,
                                 pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False,
                                 self_attention=attn())
    return MemoryAttention(d_model=256, pos_enc_at_input=True, layer=layer, num_layers=4).eval()


def _set_value_space(module, on: bool) -> None:
    for layer in module.layers:
        layer.cross_attn_image.value_space = on


@torch.library.custom_op("sam2_fast_count::attend", mutates_args=())
def _attend_as_one_op(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@_attend_as_one_op.register_fake
def _(q, k, v, mask):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@contextlib.contextmanager
def value_attention_as_one_op():
    """``attend_value_space`` counted as one fused kernel (what SDPA's memory-efficient /
    cuDNN kernels or a Triton kernel do on a GPU: read q, k, v, write the output), instead
    of the query-chunked CPU product that materialises each block of scores."""
    real = vs.attend_value_space

    def one_op(q, k, v, key_mask=None):
        mask = None if key_mask is None else key_mask.view(-1, 1, key_mask.shape[-1])
        return _attend_as_one_op(q, k, v, mask)

    vs.attend_value_space = one_op
    try:
        yield
    finally:
        vs.attend_value_space = real


def count(fn: Callable[[], torch.Tensor]) -> Dict[str, float]:
    flops = FlopCounterMode(display=False, custom_mapping={
        **missing_attention_ops(), torch.ops.sam2_fast_count.attend: attention_flops})
    moved = ByteCounter()
    with FakeTensorMode(allow_non_fake_inputs=True), torch.inference_mode(), flops, moved:
        fn()
    return {"gflop": flops.get_total_flops() / 1e9, "gb": moved.total / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image-size", type=int, default=1024)
    args = ap.parse_args(argv)
    side = args.image_size // 16
    hw, n_ptr = side * side, 64
    m = 7 * hw + n_ptr
    g = torch.Generator().manual_seed(0)
    x = dict(curr=torch.randn(hw, 1, 256, generator=g), memory=torch.randn(m, 1, 64, generator=g),
             curr_pos=torch.randn(hw, 1, 256, generator=g), memory_pos=torch.randn(m, 1, 64, generator=g),
             num_obj_ptr_tokens=n_ptr)
    ref = _reference()
    ours = build_memory_attention(replace(CFG)).eval()
    ours.load_state_dict(ref.state_dict())
    bank = StaticMemoryBank(ours, num_maskmem=7, max_obj_ptrs=16, tokens_per_ptr=4)
    bank_args = (x["curr"], x["memory"], x["curr_pos"], x["memory_pos"], n_ptr)

    rows = {}
    rows["reference (sam2 1.1.0)"] = count(lambda: ref(**x))
    _set_value_space(ours, False)
    rows["ours, projected values"] = count(lambda: ours(**x))
    rows["static bank, projected values"] = count(lambda: bank(*bank_args))
    _set_value_space(ours, True)
    rows["ours, value space (CPU chunked path, as run here)"] = count(lambda: ours(**x))
    with value_attention_as_one_op():
        rows["ours, value space (attention as one fused op)"] = count(lambda: ours(**x))
        rows["static bank, value space (one fused op)"] = count(lambda: bank(*bank_args))
    base = rows["reference (sam2 1.1.0)"]
    print(f"memory attention, tiny, {args.image_size} px: {hw} queries x (7 x {hw} + {n_ptr}) keys, 1 object")
    print(f"| what | GFLOP | vs ref | GB moved (op boundaries) | vs ref |\n|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['gflop']:.1f} | {r['gflop'] / base['gflop']:.3f} | {r['gb']:.2f} | "
              f"{r['gb'] / base['gb']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
