"""Builders, configs, checkpoints and the image predictor's bad-input errors."""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from image_harness import SMALL, cached_pair, random_image
from support import assert_close_rel

from sam2_fast.build_sam import build_sam2, build_sam2_hf, find_checkpoint
from sam2_fast.checkpoint import CheckpointError, load_checkpoint, read_state_dict, save_checkpoint
from sam2_fast.config import PRESETS, ConfigError, apply_overrides, resolve_config
from sam2_fast.image_prompts import PromptError
from sam2_fast.sam2_image_predictor import SAM2ImagePredictor

T21 = "configs/sam2.1/sam2.1_hiera_t.yaml"
SMALL_OVR = [f"++model.image_size={SMALL}"]


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize("name,expected", [
    ("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large"),
    ("sam2_hiera_l.yaml", "sam2_hiera_large"),
    ("sam2.1_hiera_large", "sam2.1_hiera_large"),
    ("configs/sam2/sam2_hiera_b+.yaml", "sam2_hiera_base_plus"),
    ("sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small"),
    ("facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny"),
])
def test_config_names(name, expected):
    assert resolve_config(name).name == expected


def test_presets_match_official_yaml():
    """Every preset field we keep equals the official YAML value (read with OmegaConf)."""
    from omegaconf import OmegaConf
    import sam2

    root = os.path.dirname(sam2.__file__)
    for ver in ("sam2", "sam2.1"):
        for size, letter in (("tiny", "t"), ("small", "s"), ("base_plus", "b+"), ("large", "l")):
            y = OmegaConf.load(os.path.join(root, "configs", ver, f"{ver}_hiera_{letter}.yaml")).model
            cfg = PRESETS[f"{ver}_hiera_{size}"]
            trunk = y.image_encoder.trunk
            assert cfg.trunk.embed_dim == trunk.embed_dim and cfg.trunk.num_heads == trunk.num_heads
            assert list(cfg.trunk.stages) == list(trunk.get("stages", [2, 3, 16, 3]))
            assert list(cfg.trunk.global_att_blocks) == list(trunk.get("global_att_blocks", [12, 16, 20]))
            assert list(cfg.trunk.window_spec) == list(trunk.get("window_spec", [8, 4, 14, 7]))
            assert list(cfg.trunk.window_pos_embed_bkg_spatial_size) == list(
                trunk.get("window_pos_embed_bkg_spatial_size", [14, 14]))
            assert list(cfg.backbone_channel_list) == list(y.image_encoder.neck.backbone_channel_list)
            for key, value in y.items():
                if key.startswith("_") or isinstance(value, (dict,)) or OmegaConf.is_config(value):
                    continue
                assert getattr(cfg, key) == value, f"{ver} {size}: {key} = {getattr(cfg, key)} vs YAML {value}"


def test_unknown_config_is_named():
    with pytest.raises(ConfigError, match="unknown SAM 2 config 'sam3_hiera_huge'"):
        build_sam2("sam3_hiera_huge", device="cpu")


def test_overrides_map_and_unknown_key_rejected():
    cfg = apply_overrides(PRESETS["sam2.1_hiera_tiny"], [
        "++model.image_size=512", "++model.fill_hole_area=0", "++model.non_overlap_masks=true",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.1",
        "model.add_all_frames_to_correct_as_cond=true"])
    assert cfg.image_size == 512 and cfg.non_overlap_masks and cfg.add_all_frames_to_correct_as_cond
    assert cfg.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta == 0.1
    with pytest.raises(ConfigError, match="unknown override key model.fill_hole_areaa"):
        build_sam2(T21, device="cpu", hydra_overrides_extra=["++model.fill_hole_areaa=3"])
    with pytest.raises(ConfigError, match="multiple of 32"):
        build_sam2(T21, device="cpu", hydra_overrides_extra=["++model.image_size=100"])


def test_apply_postprocessing_sets_stability_fields():
    on = build_sam2(T21, device="cpu", hydra_overrides_extra=SMALL_OVR)
    off = build_sam2(T21, device="cpu", hydra_overrides_extra=SMALL_OVR, apply_postprocessing=False)
    assert on.sam_mask_decoder.dynamic_multimask_via_stability is True
    assert off.sam_mask_decoder.dynamic_multimask_via_stability is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        build_sam2(T21)


# ---------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    ref, _ = cached_pair(T21)
    path = tmp_path_factory.mktemp("ckpt") / "sam2.1_hiera_tiny.pt"
    save_checkpoint(ref, path)
    return path


def test_official_format_round_trip(official_ckpt):
    ref, ours = cached_pair(T21)
    raw = torch.load(official_ckpt, weights_only=True)
    assert set(raw) == {"model"}
    model = build_sam2(T21, str(official_ckpt), device="cpu", hydra_overrides_extra=SMALL_OVR)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # a plain state dict works too
    load_checkpoint(build_sam2(T21, device="cpu", hydra_overrides_extra=SMALL_OVR), raw["model"])


def test_checkpoint_of_another_model_names_the_fitting_config(official_ckpt):
    with pytest.raises(CheckpointError) as info:
        build_sam2("configs/sam2.1/sam2.1_hiera_s.yaml", str(official_ckpt), device="cpu",
                   hydra_overrides_extra=SMALL_OVR)
    msg = str(info.value)
    assert "missing keys" in msg and "sam2.1_hiera_tiny" in msg
    with pytest.raises(CheckpointError, match="unexpected keys") as info:
        build_sam2("configs/sam2/sam2_hiera_t.yaml", str(official_ckpt), device="cpu", hydra_overrides_extra=SMALL_OVR)
    assert "fit the config 'sam2.1_hiera_tiny'" in str(info.value)


def test_truncated_and_foreign_files(official_ckpt, tmp_path):
    data = open(official_ckpt, "rb").read()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a PyTorch checkpoint"):
        read_state_dict(cut)
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_state_dict(text)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_state_dict(empty)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_state_dict(tmp_path / "missing.pt")
    other = tmp_path / "list.pt"
    torch.save([1, 2, 3], other)
    with pytest.raises(CheckpointError, match="does not hold a SAM 2 state dict"):
        read_state_dict(other)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil()}, path)
    with pytest.raises(CheckpointError, match="may contain code"):
        read_state_dict(path)
    legacy = tmp_path / "evil_legacy.pt"
    with open(legacy, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(CheckpointError):
        read_state_dict(legacy)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc to see mappings")
def test_checkpoint_is_memory_mapped(official_ckpt):
    """The loader maps the file instead of reading a second copy into anonymous memory."""
    sd = read_state_dict(official_ckpt)
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(str(official_ckpt)):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                ranges.append((lo, hi))
    assert ranges, "the checkpoint file is not mapped into memory"
    inside = sum(any(lo <= t.data_ptr() < hi for lo, hi in ranges) for t in sd.values())
    assert inside == len(sd), f"only {inside} of {len(sd)} tensors live in the file mapping"


def test_from_pretrained_offline_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("SAM2_FAST_CHECKPOINT_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(FileNotFoundError, match="no local checkpoint for 'facebook/sam2.1-hiera-tiny'"):
        SAM2ImagePredictor.from_pretrained("facebook/sam2.1-hiera-tiny", device="cpu")
    with pytest.raises(ConfigError, match="unknown model id"):
        find_checkpoint("facebook/sam3")


def test_from_pretrained_uses_local_checkpoint(monkeypatch, official_ckpt):
    monkeypatch.setenv("SAM2_FAST_CHECKPOINT_DIR", str(official_ckpt.parent))
    model = build_sam2_hf("facebook/sam2.1-hiera-tiny", device="cpu", hydra_overrides_extra=SMALL_OVR)
    ref, _ = cached_pair(T21)
    k = "sam_mask_decoder.iou_token.weight"
    assert torch.equal(model.state_dict()[k], ref.state_dict()[k])


# ---------------------------------------------------------------- predictor bad input
@pytest.fixture(scope="module")
def predictor():
    _, ours = cached_pair(T21)
    p = SAM2ImagePredictor(ours)
    p.set_image(random_image(50, 70, seed=2))
    return p


def test_predict_before_set_image():
    _, ours = cached_pair(T21)
    with pytest.raises(RuntimeError, match="set_image"):
        SAM2ImagePredictor(ours).predict(point_coords=[[1, 1]], point_labels=[1])


@pytest.mark.parametrize("image,match", [
    (np.zeros((4, 5, 6, 3), np.uint8), "shape"),
    (np.full((20, 30, 3), 200.0, np.float32), r"must be in \[0, 1\]"),  # a 0..255 float image
    (np.zeros((20, 30, 3), np.int32), "uint8 .* or float"),
    (np.zeros((20, 30, 2), np.uint8), "3 channels"),
    ("image.png", "PIL image or an HWC uint8 / float"),
])
def test_bad_images(image, match):
    _, ours = cached_pair(T21)
    with pytest.raises(ValueError, match=match):
        SAM2ImagePredictor(ours).set_image(image)


def test_grayscale_and_rgba_are_converted():
    _, ours = cached_pair(T21)
    rgb = random_image(40, 44, seed=8)
    gray = rgb[..., 0]
    p = SAM2ImagePredictor(ours)
    p.set_image(gray)
    as_gray = p.get_image_embedding().clone()
    p.set_image(np.repeat(gray[..., None], 3, axis=2))
    assert_close_rel(as_gray, p.get_image_embedding(), 1e-6, "grayscale")
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=2)
    p.set_image(rgba)
    e_rgba = p.get_image_embedding().clone()
    p.set_image(Image.fromarray(rgb))
    assert_close_rel(e_rgba, p.get_image_embedding(), 1e-6, "rgba")


@pytest.mark.parametrize("kwargs,match", [
    (dict(point_coords=[[float("nan"), 10]], point_labels=[1]), "NaN or infinite"),
    (dict(point_coords=[[-np.inf, 10]], point_labels=[1]), "NaN or infinite"),
    (dict(point_coords=[["x", 10]], point_labels=[1]), "point_coords must be numbers"),
    (dict(point_coords=[[10, 10]], point_labels=["yes"]), r"point_labels must be integers .*\['yes'\]"),
    (dict(point_coords=[[10, 10], [20, 20]], point_labels=[1]), "one label per point"),
    (dict(point_coords=[[10, 10]]), "point_labels must be given"),
    (dict(point_coords=[[10, 10, 3]], point_labels=[1]), r"\(N, 2\)"),
    (dict(point_coords=[[10, 10]], point_labels=[5]), "point_labels must be"),
    (dict(box=[1, 2, 3]), "box must have shape"),
    (dict(box=[30, 20, 10, 40]), "x0 <= x1"),
    (dict(box=[1, 2, 300, np.nan]), "box contains NaN"),
    (dict(mask_input=np.ones((1, 5, 5))), "mask_input must have shape"),
    (dict(point_coords=[[0.5, 0.5]], point_labels=[1.5], normalize_coords=False), "must be integers"),
])
def test_bad_prompts(predictor, kwargs, match):
    with pytest.raises(PromptError, match=match):
        predictor.predict(**kwargs)
    # the predictor stays usable after the error
    masks, _, _ = predictor.predict(point_coords=[[10, 10]], point_labels=[1])
    assert masks.shape[-2:] == (50, 70)


@pytest.mark.parametrize("kwargs", [
    dict(point_coords=[[80, 10]], point_labels=[1]),
    dict(point_coords=[[-1, 10]], point_labels=[1]),
    dict(box=[1, 2, 300, 40]),
    dict(point_coords=[[2.0, 0.5]], point_labels=[1], normalize_coords=False),
])
def test_prompts_outside_the_image_are_accepted(predictor, kwargs):
    """Issue 9: these were rejected; the official predictor takes them (values compared
    with it in test_drop_in.py)."""
    masks, scores, _ = predictor.predict(**kwargs)
    assert masks.shape == (3, 50, 70) and np.isfinite(scores).all()
