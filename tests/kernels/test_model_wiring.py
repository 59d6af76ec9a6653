"""The Triton kernels wired into the model: every seam reaches its kernel, results unchanged.

Runs in the interpreter pytest process (``TRITON_INTERPRET=1``). A tiny SAM 2.1 at input
size 64 (patch map 16x16: ragged stage-3/4 windows, q pooling, global blocks; memory grid
4x4) with ``sensitize_`` weights, fp32, is run three ways: our model with every kernel
forced on, our model with the kernels off (the CPU default, i.e. the PyTorch paths), and
the reference ``sam2`` package. Checked: image-encoder outputs, video tracking masks at
video resolution (several memory frames plus object pointers, so memory cross-attention,
RoPE self-attention and mask upsampling all run), the launch counter (every kernel ran,
nothing fell back), each environment switch turning its kernel off, and mutations of the
wiring (padding bias dropped, pointer tokens dropped) failing by a wide margin.
"""

from __future__ import annotations

import copy

import os
import sys

import pytest
import torch
from ktest_util import needs_interp

from sam2_fast.kernels import dispatch as K
from sam2_fast.video import outputs as O

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import video_utils as V  # noqa: E402  (tests/ helper)
from support import rel_err  # noqa: E402

pytestmark = [pytest.mark.interp, needs_interp]

TOL = 1e-4
S = 64  # input size: the interpreter runs a 5-frame clip in ~20 s at this size
CONFIG = "sam2.1_hiera_tiny"
SEED = 0
OBJ_BIAS = 1.0  # keeps both objects present with non-empty masks on every frame
NUM_FRAMES = 5
VIDEO_HW = (37, 51)  # odd frame size for the upsampling
TINY_BLOCKS = 12  # Hiera-T: 1 + 2 + 7 + 2 blocks
KERNELS = ("window_attention", "vspace_attention", "mask_upsample", "connected_components")
# which launch-counter names each environment switch turns off
SWITCHED = {"window_attention": ("window_attention",),
            "memory_attention": ("vspace_attention",),
            "mask_upsample": ("mask_upsample",),
            "connected_components": ("connected_components",)}

STEPS = [
    ("points", dict(frame_idx=0, obj_id=1, points=[[15, 18]], labels=[1])),
    ("points", dict(frame_idx=0, obj_id=2, box=[30, 4, 45, 16])),
    ("propagate", {}),
]
SHORT_STEPS = [STEPS[0], ("propagate", dict(max_frame_num_to_track=3))]


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for name in [K.ENV_ALL, "SAM2_FAST_FORCE_KERNELS", *K.ENV_SWITCHES.values()]:
        monkeypatch.delenv(name, raising=False)
    K.reset_launch_counts()
    yield
    K.reset_launch_counts()


@pytest.fixture(scope="module")
def models():
    with V.single_thread():
        undo_cc = V.install_scipy_components()
        ref = V.build_reference(CONFIG, S, SEED, OBJ_BIAS)
        ours = V.build_ours_from(ref, CONFIG, S)
        yield ref, ours
        undo_cc()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    clip = V.make_clip(NUM_FRAMES, *VIDEO_HW, seed=1)
    return V.write_jpeg_folder(clip, str(tmp_path_factory.mktemp("wiring_clip")))


def _track(models, predictor, clip_dir, steps):
    """Records of one scripted session, memories kept in fp32 on both sides (exact parity)."""
    undo = V.float32_memory_bank(*models)
    try:
        with V.single_thread():
            return V.run_script(predictor, clip_dir, steps)
    finally:
        undo()


@pytest.fixture(scope="module")
def tracked(models, clip_dir):
    """(ref records, kernels-off records, kernels-on records, launches, fallbacks, cross calls)."""
    ref, ours = models
    ref_rec = _track(models, ref, clip_dir, STEPS)
    off_rec = _track(models, ours, clip_dir, STEPS)
    assert K.launch_counts() == {}, "the CPU default must not launch kernels"
    cross_calls = []
    inner = K.memory_attention_vspace

    def spy(q, k, v, ranges=None):
        # (query tokens, keys, value width): the cross-attention attends in the 64-d space
        cross_calls.append((q.shape[1], k.shape[1], v.shape[-1]))
        return inner(q, k, v, ranges)

    K.reset_launch_counts()
    K.memory_attention_vspace = spy
    try:
        with K.force_kernels():
            on_rec = _track(models, ours, clip_dir, STEPS)
    finally:
        K.memory_attention_vspace = inner
    return ref_rec, off_rec, on_rec, K.launch_counts(), K.fallback_counts(), cross_calls


def _image(seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- image encoder
def test_image_encoder_with_window_kernel_matches(models):
    ref, ours = models
    img = _image()
    with torch.no_grad(), V.single_thread():
        expect = ref.image_encoder(img)
        off = ours.image_encoder(img)
        with K.force_kernels():
            on = ours.image_encoder(img)
    assert K.launch_counts() == {"window_attention": TINY_BLOCKS}, K.launch_counts()
    assert K.fallback_counts() == {}
    for level, (a, b, r) in enumerate(zip(on["backbone_fpn"], off["backbone_fpn"], expect["backbone_fpn"])):
        assert rel_err(a, b) <= TOL, f"fpn level {level}: kernels on vs off {rel_err(a, b):.2e}"
        assert rel_err(a, r) <= TOL, f"fpn level {level}: kernels on vs reference {rel_err(a, r):.2e}"
    assert rel_err(on["vision_features"], expect["vision_features"]) <= TOL


def test_mutation_window_kernel_without_padding_bias_fails(models, monkeypatch):
    """Padded tokens' k/v must be the qkv bias: passing no bias moves the output widely."""
    _, ours = models
    img = _image()
    inner = K.window_attention
    monkeypatch.setattr(K, "window_attention", lambda qkv, bias, *a: inner(qkv, None, *a))
    with torch.no_grad(), V.single_thread():
        off = ours.image_encoder(img)["vision_features"]
        with K.force_kernels():
            bad = ours.image_encoder(img)["vision_features"]
    assert K.launch_counts()["window_attention"] == TINY_BLOCKS
    assert rel_err(bad, off) > 100 * TOL, f"mutation not caught: {rel_err(bad, off):.2e}"


# ----------------------------------------------------------------------------- video tracking
def test_tracking_with_all_kernels_matches(tracked):
    ref_rec, off_rec, on_rec, launches, fallbacks, cross_calls = tracked
    assert V.presence(on_rec)[0] > 0
    worst_off = V.compare_records(on_rec, off_rec, TOL)
    worst_ref = V.compare_records(on_rec, ref_rec, TOL)
    print(f"kernels on vs off: {worst_off:.2e}; vs reference: {worst_ref:.2e}")


def test_every_kernel_ran_and_nothing_fell_back(tracked):
    *_, launches, fallbacks, cross_calls = tracked
    for name in KERNELS:
        assert launches.get(name, 0) > 0, f"{name} never ran: {launches}"
    assert fallbacks == {}, f"kernels declined calls: {fallbacks}"
    # the cross-attention saw several memory frames together with object pointers (keys
    # beyond a whole number of frames), in the 64-d value space
    assert any(dv == 64 and nk >= 2 * nq and nk % nq for nq, nk, dv in cross_calls), cross_calls


def test_mutation_dropping_pointer_tokens_fails(models, clip_dir, tracked, monkeypatch):
    """Pointer tokens must reach the kernel: leaving them out moves the masks widely."""
    _, ours = models
    off_rec = _track(models, ours, clip_dir, SHORT_STEPS)
    inner = K.memory_attention_vspace

    def no_pointers(q, k, v, ranges=None):
        n_sp = (k.shape[1] // q.shape[1]) * q.shape[1]  # whole memory frames; pointers after
        return inner(q, k[:, :n_sp], v[:, :n_sp], ranges)

    monkeypatch.setattr(K, "memory_attention_vspace", no_pointers)
    with K.force_kernels():
        bad_rec = _track(models, ours, clip_dir, SHORT_STEPS)
    worst = max(rel_err(a[3], b[3]) for a, b in zip(bad_rec, off_rec))
    assert worst > 100 * TOL, f"mutation not caught: {worst:.2e}"


# ----------------------------------------------------------------------------- switches
def _exercise_every_seam(models):
    """One call through each model seam: image encoder, memory attention, video resize,
    hole filling."""
    _, ours = models
    g = torch.Generator().manual_seed(5)
    hw, n_mem, n_ptr, batch = 16, 2, 8, 2
    curr = torch.randn(hw, batch, 256, generator=g)
    curr_pos = torch.randn(hw, batch, 256, generator=g)
    memory = torch.randn(n_mem * hw + n_ptr, batch, 64, generator=g)
    memory_pos = torch.randn(n_mem * hw + n_ptr, batch, 64, generator=g)
    with torch.no_grad(), V.single_thread():
        ours.image_encoder(_image())
        ours.memory_attention(curr, memory, curr_pos, memory_pos, num_obj_ptr_tokens=n_ptr)
        O.resize_to_video(torch.randn(3, 1, 16, 16, generator=g), *VIDEO_HW)
        O.fill_holes(torch.randn(2, 1, 16, 16, generator=g), 8)  # hole filling (2.1 configs)


@pytest.mark.parametrize("kernel", sorted(K.ENV_SWITCHES))
def test_each_switch_turns_its_kernel_off(models, monkeypatch, kernel):
    monkeypatch.setenv(K.ENV_SWITCHES[kernel], "1")
    with K.force_kernels():
        _exercise_every_seam(models)
    counts = K.launch_counts()
    for name in KERNELS:
        if name in SWITCHED[kernel]:
            assert counts.get(name, 0) == 0, f"{K.ENV_SWITCHES[kernel]}=1 but {name} ran: {counts}"
        else:
            assert counts.get(name, 0) > 0, f"{name} should still run: {counts}"


def test_disable_all_switch(models, monkeypatch):
    monkeypatch.setenv(K.ENV_ALL, "1")
    with K.force_kernels():
        _exercise_every_seam(models)
    assert K.launch_counts() == {}


def test_memory_attention_module_with_kernels_matches_reference(models):
    """The memory-attention stack alone (2 memory frames + 8 pointer tokens, batch 2)."""
    ref, ours = models
    g = torch.Generator().manual_seed(11)
    hw, n_mem, n_ptr, batch = 16, 3, 8, 2
    args = (torch.randn(hw, batch, 256, generator=g), torch.randn(n_mem * hw + n_ptr, batch, 64, generator=g),
            torch.randn(hw, batch, 256, generator=g), torch.randn(n_mem * hw + n_ptr, batch, 64, generator=g))
    with torch.no_grad(), V.single_thread():
        expect = ref.memory_attention(args[0], args[1], args[2], args[3], num_obj_ptr_tokens=n_ptr)
        with K.force_kernels():
            got = ours.memory_attention(*args, num_obj_ptr_tokens=n_ptr)
    assert K.launch_counts() == {"vspace_attention": 8}  # 4 layers x (self + cross)
    assert K.backend_counts() == {"memory_attention: sdpa": 8}  # fp32: never a Triton path
    err = rel_err(got, expect)
    assert err <= TOL, f"memory attention with kernels vs reference: {err:.2e}"


def test_memory_attention_module_fp16_runs_the_vspace_kernel(models):
    """In 16-bit the selection layer runs the Triton kernels (interpreter on CPU): the stack's
    error against the fp32 reference is at most 2x that of the PyTorch path in fp16."""
    ref, ours = models
    g = torch.Generator().manual_seed(17)
    hw, n_mem, n_ptr, batch = 16, 3, 8, 2
    args = (torch.randn(hw, batch, 256, generator=g), torch.randn(n_mem * hw + n_ptr, batch, 64, generator=g),
            torch.randn(hw, batch, 256, generator=g), torch.randn(n_mem * hw + n_ptr, batch, 64, generator=g))
    half = copy.deepcopy(ours.memory_attention).half()
    with torch.no_grad(), V.single_thread():
        expect = ref.memory_attention(*args, num_obj_ptr_tokens=n_ptr)
        plain = half(*(a.half() for a in args), num_obj_ptr_tokens=n_ptr)
        with K.force_kernels():
            got = half(*(a.half() for a in args), num_obj_ptr_tokens=n_ptr)
    assert K.backend_counts() == {"memory_attention: triton": 8}, K.backend_counts()
    e_kernel, e_plain = rel_err(got, expect), rel_err(plain, expect)
    assert e_kernel <= 2 * e_plain, f"fp16 with kernels {e_kernel:.2e} vs PyTorch fp16 {e_plain:.2e}"


def test_seams_trace_fullgraph_with_kernels(models):
    """torch.compile(fullgraph=True) traces each wired seam through the custom ops."""
    _, ours = models
    g = torch.Generator().manual_seed(13)
    hw, n_mem, n_ptr, batch = 16, 2, 4, 1
    args = (torch.randn(hw, batch, 256, generator=g), torch.randn(n_mem * hw + n_ptr, batch, 64, generator=g),
            torch.randn(hw, batch, 256, generator=g), torch.randn(n_mem * hw + n_ptr, batch, 64, generator=g))
    low_res = torch.randn(2, 1, 16, 16, generator=g)
    torch._dynamo.reset()
    with torch.no_grad(), V.single_thread():
        eager = (ours.image_encoder.trunk(_image())[-1], ours.memory_attention(*args, num_obj_ptr_tokens=n_ptr),
                 O.resize_to_video(low_res, *VIDEO_HW), O.fill_holes(low_res, 8))
        with K.force_kernels():
            trunk = torch.compile(ours.image_encoder.trunk, fullgraph=True, backend="eager")
            mem = torch.compile(lambda *a: ours.memory_attention(*a, num_obj_ptr_tokens=n_ptr),
                                fullgraph=True, backend="eager")
            resize = torch.compile(lambda m: O.resize_to_video(m, *VIDEO_HW), fullgraph=True, backend="eager")
            fill = torch.compile(lambda m: O.fill_holes(m, 8), fullgraph=True, backend="eager")
            traced = (trunk(_image())[-1], mem(*args), resize(low_res), fill(low_res))
    torch._dynamo.reset()
    assert set(K.launch_counts()) == set(KERNELS), K.launch_counts()
    for name, a, b in zip(("trunk", "memory attention", "resize", "hole filling"), traced, eager):
        assert rel_err(a, b) <= TOL, f"{name}: compiled with kernels vs eager PyTorch {rel_err(a, b):.2e}"
