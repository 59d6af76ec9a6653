"""Component benchmarks, ours vs the reference: one call of each stage of a tracked frame.

    .venv/bin/python -m pytest benchmarks/bench_components.py --benchmark-only

Each case feeds the official submodule call (same signature in both implementations)
with fresh random inputs of the shapes a frame produces: at image_size 256 on CPU, and
at 1024 with a full memory bank (7 memories + 16 pointers) in bf16 autocast on CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, GPU, IMAGE_SIZE, run_timed

SIDE = IMAGE_SIZE // 16  # backbone stride 16: 64 at 1024, 16 at 256
NUM_MEM = 7  # full memory bank
NUM_PTR_TOKENS = 16 * 4  # 16 object pointers, each split into 4 tokens of 64 channels


def _rand(*shape, scale=1.0):
    return torch.randn(*shape, device=DEVICE) * scale


def bench_image_encoder(benchmark, predictor):
    img = _rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    run_timed(benchmark, lambda: predictor.image_encoder(img))
    benchmark.extra_info["input"] = f"1x3x{IMAGE_SIZE}x{IMAGE_SIZE}"


@pytest.mark.parametrize("objects", [1, 3])
def bench_memory_attention(benchmark, predictor, objects):
    hw = SIDE * SIDE
    curr = _rand(hw, objects, 256)  # (HW, B, C) current frame tokens
    curr_pos = _rand(hw, objects, 256)
    mem_tokens = NUM_MEM * hw + NUM_PTR_TOKENS
    memory = _rand(mem_tokens, objects, 64)  # (7*HW + pointers, B, 64)
    memory_pos = _rand(mem_tokens, objects, 64)
    run_timed(benchmark, lambda: predictor.memory_attention(
        curr=[curr], curr_pos=[curr_pos], memory=memory, memory_pos=memory_pos, num_obj_ptr_tokens=NUM_PTR_TOKENS))
    benchmark.extra_info.update(queries=hw, keys=mem_tokens, objects=objects)


@pytest.mark.parametrize("multimask", [False, True])
def bench_mask_decoder(benchmark, predictor, multimask):
    emb = _rand(1, 256, SIDE, SIDE)
    pe = _rand(1, 256, SIDE, SIDE)
    sparse = _rand(1, 3, 256)  # one click + padding point + ... as the prompt encoder gives
    dense = _rand(1, 256, SIDE, SIDE)
    high_res = [_rand(1, 32, 4 * SIDE, 4 * SIDE), _rand(1, 64, 2 * SIDE, 2 * SIDE)]
    run_timed(benchmark, lambda: predictor.sam_mask_decoder(
        image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        multimask_output=multimask, repeat_image=False, high_res_features=high_res))


def bench_memory_encoder(benchmark, predictor):
    pix = _rand(1, 256, SIDE, SIDE)
    masks = _rand(1, 1, IMAGE_SIZE, IMAGE_SIZE, scale=4.0)
    run_timed(benchmark, lambda: predictor.memory_encoder(pix, masks, skip_mask_sigmoid=True))


UPSAMPLE = [("8obj-480p", 8, 480, 854), ("8obj-1080p", 8, 1080, 1920)] if GPU else [("8obj-240p", 8, 240, 426)]


@pytest.mark.parametrize("impl", ["torch", "sam2_fast"])
@pytest.mark.parametrize("case", UPSAMPLE, ids=[c[0] for c in UPSAMPLE])
def bench_mask_upsampling(benchmark, impl, case):
    """Low-res logits (objects, 1, S/4, S/4) to video resolution, thresholded to masks."""
    _, objects, h, w = case
    low = _rand(objects, 1, IMAGE_SIZE // 4, IMAGE_SIZE // 4, scale=8.0)
    if impl == "torch":
        def fn():
            up = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
            return up > 0
    else:
        dispatch = pytest.importorskip("sam2_fast.kernels.dispatch")
        fn = lambda: dispatch.upsample_masks(low, (h, w))  # noqa: E731
    run_timed(benchmark, fn, rounds=20)
    benchmark.extra_info["output"] = f"{objects}x{h}x{w}"
