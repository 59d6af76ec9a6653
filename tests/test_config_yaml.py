"""A user's own YAML config (a modified copy of an official one) in build_sam2 / resolve_config.

The 8 official YAMLs of ``sam2==1.1.0`` are the spec: each, read as a custom file, must give
exactly its preset, and the table's defaults must be the official constructors' defaults.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys

import numpy as np
import pytest
import torch
import yaml

from image_harness import random_image, ref_image_predictor
from support import sensitize_
from test_image_predictor import _compare_embeddings, _compare_predict

from sam2_fast import config_yaml
from sam2_fast.build_sam import build_sam2, make_config
from sam2_fast.checkpoint import save_checkpoint
from sam2_fast.config import (PRESETS, VIDEO_POSTPROCESSING_OVERRIDES, ConfigError, HieraConfig,
                              MaskDecoderExtraArgs, SAM2Config, resolve_config)
from sam2_fast.config_yaml import LEAVES, REQUIRED, Leaf
from sam2_fast.sam2_image_predictor import SAM2ImagePredictor

OFFICIAL = os.path.join(os.path.dirname(importlib.import_module("sam2").__file__), "configs")
SIZES = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}
OFFICIAL_FILES = [(f"{v}/{v}_hiera_{letter}.yaml", f"{v}_hiera_{size}")
                  for v in ("sam2", "sam2.1") for letter, size in SIZES.items()]


def _load(rel: str) -> dict:
    with open(os.path.join(OFFICIAL, rel)) as fh:
        return yaml.safe_load(fh)


def _write(tmp_path, doc, name="my_model.yaml") -> str:
    path = tmp_path / name
    # the header Hydra needs to read the file's keys at the top level, as the official files do
    path.write_text("# @package _global_\n" + yaml.safe_dump(doc) if isinstance(doc, dict) else doc)
    return str(path)


def _round_trip_mismatches(tmp_path) -> list:
    """Official YAMLs (copied under another name) whose config differs from their preset."""
    bad = []
    for rel, preset in OFFICIAL_FILES:
        path = tmp_path / ("copy_of_" + os.path.basename(rel))
        path.write_text(open(os.path.join(OFFICIAL, rel)).read())  # byte copy: comments, 1e-6, ...
        try:
            got = resolve_config(str(path))
        except ConfigError as exc:
            bad.append(f"{rel}: {exc}")
            continue
        if got != PRESETS[preset]:
            bad.append(f"{rel}: {got} != {PRESETS[preset]}")
    return bad


# ---------------------------------------------------------------- the table is the spec
def test_every_official_yaml_resolves_to_its_preset(tmp_path):
    assert _round_trip_mismatches(tmp_path) == []


def test_mutation_wrong_table_entry_fails_round_trip(tmp_path, monkeypatch):
    # a wrong official default: b+ does not write window_pos_embed_bkg_spatial_size (Hiera: 14x14)
    monkeypatch.setitem(LEAVES, "image_encoder.trunk.window_pos_embed_bkg_spatial_size",
                        Leaf(field="trunk.window_pos_embed_bkg_spatial_size", default=(7, 7)))
    bad = _round_trip_mismatches(tmp_path)
    assert len(bad) == 2 and all("b+" in b for b in bad), bad
    monkeypatch.undo()
    # a leaf routed to the wrong field: the memory encoder's width read as the FFN width
    monkeypatch.setitem(LEAVES, "memory_encoder.out_dim", Leaf(field="mem_attn_ffn_dim"))
    assert len(_round_trip_mismatches(tmp_path)) == 8


def _official_default(key: str):
    """The default of ``key``'s argument in the official class its parent's _target_ names."""
    from sam2.modeling.sam.mask_decoder import MaskDecoder
    from sam2.modeling.sam.transformer import Attention
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    parent, _, arg = key.rpartition(".")
    if parent == "sam_mask_decoder_extra_args":
        classes = [MaskDecoder]
    else:
        target = LEAVES[f"{parent}._target_" if parent else "_target_"].supported(None)[0]
        mod, _, name = target.rpartition(".")
        classes = [getattr(importlib.import_module(mod), name)]
        classes += [SAM2VideoPredictor] if not parent else [Attention] if name == "RoPEAttention" else []
    for cls in classes:
        params = inspect.signature(cls.__init__).parameters
        if arg in params:
            d = params[arg].default
            return REQUIRED if d is inspect.Parameter.empty else d
    raise AssertionError(f"{key}: no argument {arg!r} in {classes}")


def test_table_defaults_are_the_official_constructor_defaults():
    """An absent key means what Hydra builds: the official constructor's default (or an error)."""
    checked = 0
    for key, leaf in LEAVES.items():
        if key.endswith("_target_") or key in ("sam_mask_decoder_extra_args", "clear_non_cond_mem_for_multi_obj"):
            continue  # _target_: required by Hydra; the last is ours (no official argument)
        expected = _official_default(key)
        got = leaf.default
        assert got is expected if expected is REQUIRED else config_yaml._same(got, tuple(expected)
               if isinstance(expected, list) else expected), f"{key}: table {got!r}, official {expected!r}"
        checked += 1
    assert checked > 100


def test_every_config_field_is_reachable():
    set_fields = {leaf.field for leaf in LEAVES.values() if leaf.field}
    wanted = {f.name for f in dataclasses.fields(SAM2Config)} - {"name", "trunk", "sam_mask_decoder_extra_args"}
    wanted |= {f"trunk.{f.name}" for f in dataclasses.fields(HieraConfig)}
    wanted |= {f"sam_mask_decoder_extra_args.{f.name}" for f in dataclasses.fields(MaskDecoderExtraArgs)}
    assert wanted <= set_fields, sorted(wanted - set_fields)


# ---------------------------------------------------------------- changed values
def test_changed_values_give_the_preset_with_those_fields(tmp_path):
    doc = _load("sam2.1/sam2.1_hiera_t.yaml")
    m = doc["model"]
    m.update(image_size=512, num_maskmem=5, memory_temporal_stride_for_eval=2, fill_hole_area=4)
    m["image_encoder"]["trunk"]["window_spec"] = [8, 4, 7, 7]
    cfg = resolve_config(_write(tmp_path, doc))
    base = PRESETS["sam2.1_hiera_tiny"]
    expected = dataclasses.replace(base, name=cfg.name, image_size=512, num_maskmem=5, fill_hole_area=4,
                                   memory_temporal_stride_for_eval=2,
                                   trunk=dataclasses.replace(base.trunk, window_spec=(8, 4, 7, 7)))
    assert cfg == expected
    assert cfg.name == "custom:my_model.yaml (from sam2.1_hiera_tiny)"


def test_absent_keys_take_the_official_defaults(tmp_path):
    doc = _load("sam2/sam2_hiera_l.yaml")
    del doc["model"]["image_size"]  # SAM2Base's default is 512
    del doc["model"]["image_encoder"]["scalp"]  # ImageEncoder's default 0 keeps all 4 levels
    cfg = resolve_config(_write(tmp_path, doc))
    assert (cfg.image_size, cfg.scalp) == (512, 0) and cfg.name.endswith("(from sam2_hiera_large)")


def test_interpolations_in_the_same_file(tmp_path):
    doc = _load("sam2.1/sam2.1_hiera_s.yaml")
    doc["scratch"] = {"resolution": 768}
    doc["model"]["image_size"] = "${scratch.resolution}"
    assert resolve_config(_write(tmp_path, doc)).image_size == 768
    doc["model"]["image_size"] = "${times:${scratch.resolution},1}"
    with pytest.raises(ConfigError, match=r"model.image_size: interpolation .* not supported"):
        resolve_config(_write(tmp_path, doc))
    doc["model"]["image_size"] = "${scratch.size}"
    with pytest.raises(ConfigError, match="refers to a key the file does not have"):
        resolve_config(_write(tmp_path, doc))


def test_overrides_and_postprocessing_order_as_for_official_names(tmp_path):
    path = _write(tmp_path, _load("sam2.1/sam2.1_hiera_t.yaml"))
    for name in (path, "configs/sam2.1/sam2.1_hiera_t.yaml"):
        cfg = make_config(name, ["++model.fill_hole_area=0", "++model.image_size=256"], VIDEO_POSTPROCESSING_OVERRIDES)
        assert (cfg.fill_hole_area, cfg.image_size, cfg.binarize_mask_from_pts_for_mem_enc) == (0, 256, True)
        assert cfg.sam_mask_decoder_extra_args == MaskDecoderExtraArgs(dynamic_multimask_via_stability=True)
    with pytest.raises(ConfigError, match="unknown override key model.num_maskmemm"):
        make_config(path, ["++model.num_maskmemm=3"])


# ---------------------------------------------------------------- what is rejected
def _edit(doc, dotted, value):
    node = doc["model"]
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return doc


@pytest.mark.parametrize("key,value,match", [
    ("memory_attention.layer.self_attention.num_heads", 2, r"num_heads = 2 is not supported.* 1 only"),
    ("memory_attention.layer.activation", "gelu", r"activation = 'gelu' is not supported.* 'relu' only"),
    ("memory_attention.layer.cross_attention.rope_theta", 500.0, r"cross_attention.rope_theta = 500.0 .* 10000.0"),
    ("image_encoder.neck.backbone_channel_list", [768, 384, 192, 48], r"backbone_channel_list = \(768, 384, 192, 48\)"),
    ("image_encoder.trunk._target_", "mypkg.MyHiera", r"trunk._target_ = 'mypkg.MyHiera' .*hieradet.Hiera"),
    ("_target_", "mypkg.MySAM2", r"model._target_ = 'mypkg.MySAM2' .*SAM2Base' or"),
    ("memory_encoder.fuser.layer.use_dwconv", 1, r"use_dwconv = 1 is not supported.* True only"),
    ("num_maskmemm", 5, r"model.num_maskmemm = 5 is not a setting .*did you mean model.num_maskmem"),
    ("sam_mask_decoder_extra_args.iou_head_depth", 2, r"sam_mask_decoder_extra_args.iou_head_depth = 2"),
    ("image_size", "large", r"model.image_size in .* expects an integer, got 'large'"),
    ("image_size", 100, r"multiple of 32"),
])
def test_unsupported_values_name_the_key(tmp_path, key, value, match):
    doc = _edit(_load("sam2.1/sam2.1_hiera_t.yaml"), key, value)
    with pytest.raises(ConfigError, match=match):
        build_sam2(_write(tmp_path, doc), device="cpu")


def test_nested_override_keys_go_through_the_same_table():
    """``++model.<nested official key>=v`` in hydra_overrides_extra: a setting sets its field,
    a fixed value equal to ours changes nothing, another value or an unknown key is named."""
    from sam2_fast.config import apply_overrides
    tiny = PRESETS["sam2.1_hiera_tiny"]
    got = apply_overrides(tiny, ["++model.memory_attention.layer.dim_feedforward=1024",
                                 "++model.image_encoder.trunk.window_spec=[8,4,7,7]"])
    assert got == dataclasses.replace(tiny, mem_attn_ffn_dim=1024,
                                      trunk=dataclasses.replace(tiny.trunk, window_spec=(8, 4, 7, 7)))
    assert apply_overrides(tiny, ["++model.memory_attention.layer.dropout=0.1"]) == tiny
    with pytest.raises(ConfigError, match=r"self_attention\.num_heads=2 is not supported.*1 only"):
        apply_overrides(tiny, ["++model.memory_attention.layer.self_attention.num_heads=2"])
    with pytest.raises(ConfigError, match=r"unknown override key model\.memory_attention\.layer\.ffn"):
        apply_overrides(tiny, ["++model.memory_attention.layer.ffn=1024"])


def test_missing_keys_and_wrong_files(tmp_path):
    doc = _load("sam2.1/sam2.1_hiera_t.yaml")
    del doc["model"]["memory_attention"]["layer"]["cross_attention"]["rope_k_repeat"]
    with pytest.raises(ConfigError, match=r"rope_k_repeat = absent \(official default False\).* True only"):
        resolve_config(_write(tmp_path, doc))
    del doc["model"]["memory_encoder"]["out_dim"]
    with pytest.raises(ConfigError, match=r"model.memory_encoder.out_dim is missing"):
        resolve_config(_write(tmp_path, doc))
    training = os.path.join(OFFICIAL, "sam2.1_training", "sam2.1_hiera_b+_MOSE_finetune.yaml")
    with pytest.raises(ConfigError, match=r"training config .*'trainer.model'.* top-level 'model:'"):
        build_sam2(_write(tmp_path, open(training).read()), device="cpu")
    with pytest.raises(ConfigError, match=r"has no 'model:' section \(top-level keys: \['scratch'\]\)"):
        resolve_config(_write(tmp_path, {"scratch": {"a": 1}}))
    with pytest.raises(ConfigError, match="defaults:' composition is not supported"):
        resolve_config(_write(tmp_path, {"defaults": ["sam2.1/sam2.1_hiera_t"], "model": {}}))
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(_write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="duplicate key 'image_size'"):
        resolve_config(_write(tmp_path, "model:\n  image_size: 512\n  image_size: 1024\n"))
    with pytest.raises(ConfigError, match=r"config file '.*nowhere.yaml' does not exist"):
        resolve_config(str(tmp_path / "nowhere.yaml"))


def test_without_pyyaml_the_error_says_what_to_install(tmp_path, monkeypatch):
    path = _write(tmp_path, _load("sam2.1/sam2.1_hiera_t.yaml"))
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` raises ImportError
    with pytest.raises(ConfigError, match="pip install pyyaml"):
        resolve_config(path)


# ---------------------------------------------------------------- one model from a custom file
def test_custom_yaml_model_matches_the_reference_built_from_it(tmp_path):
    """The reference builds the same file (Hydra's '//abs/path' form, which sam2 1.1.0 accepts);
    its weights, saved as a checkpoint, load strictly into ours and give the same masks."""
    from sam2.build_sam import build_sam2 as ref_build

    doc = _load("sam2.1/sam2.1_hiera_t.yaml")
    m = doc["model"]
    m.update(image_size=128, num_maskmem=5, memory_temporal_stride_for_eval=2, max_obj_ptrs_in_encoder=8)
    m["image_encoder"]["trunk"].update(window_spec=[4, 4, 7, 7], global_att_blocks=[4, 8, 9])
    m["memory_attention"]["layer"]["dim_feedforward"] = 1024  # shapes checked by the strict load
    path = _write(tmp_path, doc)
    torch.manual_seed(0)
    ref = ref_build("//" + os.path.abspath(path), None, device="cpu")
    sensitize_(ref, seed=0)
    ckpt = tmp_path / "finetuned.pt"
    save_checkpoint(ref, ckpt)
    ours = build_sam2(path, str(ckpt), device="cpu")
    for name in ("image_size", "num_maskmem", "memory_temporal_stride_for_eval", "max_obj_ptrs_in_encoder",
                 "sam_mask_decoder_extra_args", "use_signed_tpos_enc_to_obj_ptrs"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.cfg.name == "custom:my_model.yaml (from sam2.1_hiera_tiny)"
    ref_p, our_p = ref_image_predictor(ref.eval()), SAM2ImagePredictor(ours)
    img = random_image(90, 117, seed=5)
    ref_p.set_image(img)
    our_p.set_image(img)
    _compare_embeddings(ref_p, our_p)
    masks, _, _ = _compare_predict(ref_p, our_p, point_coords=np.array([[40, 30]]), point_labels=np.array([1]))
    assert (masks > 0).any() and (masks < 0).any()
    _compare_predict(ref_p, our_p, box=np.array([5, 8, 80, 70]), multimask_output=False)


def test_custom_yaml_video_matches_the_reference_built_from_it(tmp_path):
    """Video tracking from a file that changes the memory side: d_model 128 and mem_dim 32
    everywhere they occur (pointers split into 4 tokens), 2 memory-attention layers with a
    1024 FFN, 5 memories at temporal stride 2, at most 4 pointers. fp32 memory banks as in
    test_video_predictor's network-parity test (1e-4 there; measured here 7.3e-7). Built with a
    stride of 1, or with 16 or 3 pointers, ours fails this comparison (checked by hand)."""
    import video_utils as V
    from sam2.build_sam import build_sam2_video_predictor as ref_build

    from sam2_fast.build_sam import build_sam2_video_predictor

    doc = _load("sam2.1/sam2.1_hiera_t.yaml")
    m = doc["model"]
    m.update(image_size=128, num_maskmem=5, memory_temporal_stride_for_eval=2, max_obj_ptrs_in_encoder=4)
    d, md = 128, 32
    for key, value in [("image_encoder.neck.d_model", d), ("image_encoder.neck.position_encoding.num_pos_feats", d),
                       ("memory_attention.d_model", d), ("memory_attention.num_layers", 2),
                       ("memory_attention.layer.d_model", d), ("memory_attention.layer.dim_feedforward", 1024),
                       ("memory_attention.layer.self_attention.embedding_dim", d),
                       ("memory_attention.layer.cross_attention.embedding_dim", d),
                       ("memory_attention.layer.cross_attention.kv_in_dim", md), ("memory_encoder.out_dim", md),
                       ("memory_encoder.position_encoding.num_pos_feats", md), ("memory_encoder.in_dim", d),
                       ("memory_encoder.mask_downsampler.embed_dim", d), ("memory_encoder.fuser.layer.dim", d)]:
        _edit(doc, key, value)
    path = _write(tmp_path, doc)
    torch.manual_seed(0)
    ref = ref_build("//" + os.path.abspath(path), None, device="cpu", apply_postprocessing=False)
    sensitize_(ref, 0, obj_score_bias=1.5)  # the object stays present (asserted)
    V._float32_memory(ref.memory_attention)
    ckpt = tmp_path / "finetuned.pt"
    save_checkpoint(ref, ckpt)
    ours = build_sam2_video_predictor(path, str(ckpt), device="cpu", apply_postprocessing=False)
    assert (ours.hidden_dim, ours.mem_dim, ours.num_maskmem) == (ref.hidden_dim, ref.mem_dim, ref.num_maskmem)
    clip = str(tmp_path / "clip")
    V.write_jpeg_folder(V.make_clip(8, 75, 101, seed=0), clip)
    steps = [("points", dict(frame_idx=0, obj_id=1, points=[[30, 35]], labels=[1])), ("propagate", {})]
    with V.single_thread():
        undo = V.float32_memory_bank(ref.eval(), ours)
        try:
            got, expect = V.run_script(ours, clip, steps), V.run_script(ref, clip, steps)
        finally:
            undo()
    present, absent = V.presence(expect)
    assert present == 8 and absent == 0, (present, absent)  # absent frames would hide memory bugs
    print(f"worst rel err {V.compare_records(got, expect, 1e-4):.2e}")
