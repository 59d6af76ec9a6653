"""One typed, frozen configuration for every SAM 2 / SAM 2.1 model, with named presets.

The official project describes its models with Hydra YAML files; we describe them with
frozen dataclasses so that a config is hashable, printable and checked when it is built.
``resolve_config`` accepts the names users pass to the official ``build_sam2`` (a YAML
path such as ``configs/sam2.1/sam2.1_hiera_l.yaml``, a bare file name, or a short
preset name such as ``sam2.1_hiera_large``) and ``apply_overrides`` gives the
``++model.KEY=VALUE`` strings of ``hydra_overrides_extra`` their usual meaning.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable, Optional, Tuple


class ConfigError(ValueError):
    """A model name or an override that does not describe a SAM 2 model."""


@dataclass(frozen=True)
class HieraConfig:
    """The Hiera trunk (hierarchical ViT with windowed attention)."""

    embed_dim: int = 96  # channels of stage 1; doubled at every stage transition
    num_heads: int = 1  # heads of stage 1; doubled at every stage transition
    stages: Tuple[int, ...] = (1, 2, 7, 2)  # blocks per stage
    global_att_blocks: Tuple[int, ...] = (5, 7, 9)  # block indices with global attention
    window_spec: Tuple[int, ...] = (8, 4, 14, 7)  # window side per stage
    window_pos_embed_bkg_spatial_size: Tuple[int, int] = (7, 7)
    q_pool: int = 3  # number of stage transitions that pool the queries
    q_stride: Tuple[int, int] = (2, 2)
    dim_mul: float = 2.0
    head_mul: float = 2.0
    drop_path_rate: float = 0.0  # training only; kept for config fidelity

    @property
    def stage_dims(self) -> Tuple[int, ...]:
        return tuple(int(self.embed_dim * self.dim_mul**i) for i in range(len(self.stages)))


@dataclass(frozen=True)
class MaskDecoderExtraArgs:
    """What ``sam_mask_decoder_extra_args`` sets (``apply_postprocessing`` turns these on)."""

    dynamic_multimask_via_stability: bool = False
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98


@dataclass(frozen=True)
class SAM2Config:
    """A whole SAM 2 model: image encoder, memory attention/encoder, SAM heads, tracking."""

    name: str = "sam2.1_hiera_tiny"
    trunk: HieraConfig = field(default_factory=HieraConfig)
    # FPN neck
    d_model: int = 256  # neck / transformer width (``hidden_dim`` of SAM2Base)
    fpn_top_down_levels: Tuple[int, ...] = (2, 3)
    fpn_interp_model: str = "nearest"
    scalp: int = 1  # number of lowest-resolution FPN levels dropped
    # memory attention
    mem_attn_layers: int = 4
    mem_attn_ffn_dim: int = 2048
    rope_theta: float = 10000.0
    rope_feat_sizes: Tuple[int, int] = (64, 64)
    # memory encoder
    mem_dim: int = 64
    fuser_layers: int = 2
    # SAM2Base
    num_maskmem: int = 7
    image_size: int = 1024
    backbone_stride: int = 16
    sigmoid_scale_for_mem_enc: float = 20.0
    sigmoid_bias_for_mem_enc: float = -10.0
    binarize_mask_from_pts_for_mem_enc: bool = False
    use_mask_input_as_output_without_sam: bool = True
    max_cond_frames_in_attn: int = -1
    directly_add_no_mem_embed: bool = True
    use_high_res_features_in_sam: bool = True
    multimask_output_in_sam: bool = True
    multimask_min_pt_num: int = 0
    multimask_max_pt_num: int = 1
    multimask_output_for_tracking: bool = True
    use_multimask_token_for_obj_ptr: bool = True
    iou_prediction_use_sigmoid: bool = True
    memory_temporal_stride_for_eval: int = 1
    non_overlap_masks_for_mem_enc: bool = False
    use_obj_ptrs_in_encoder: bool = True
    max_obj_ptrs_in_encoder: int = 16
    add_tpos_enc_to_obj_ptrs: bool = True
    proj_tpos_enc_in_obj_ptrs: bool = True
    use_signed_tpos_enc_to_obj_ptrs: bool = True
    only_obj_ptrs_in_the_past_for_eval: bool = True
    pred_obj_scores: bool = True
    pred_obj_scores_mlp: bool = True
    fixed_no_obj_ptr: bool = True
    soft_no_obj_ptr: bool = False
    use_mlp_for_obj_ptr_proj: bool = True
    no_obj_embed_spatial: bool = True
    sam_mask_decoder_extra_args: Optional[MaskDecoderExtraArgs] = None
    compile_image_encoder: bool = False
    # video predictor (SAM2VideoPredictor constructor arguments)
    fill_hole_area: int = 0
    non_overlap_masks: bool = False
    clear_non_cond_mem_around_input: bool = False
    clear_non_cond_mem_for_multi_obj: bool = False
    add_all_frames_to_correct_as_cond: bool = False

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.image_size % 32 != 0:
            raise ConfigError(
                f"image_size must be a positive multiple of 32 (the Hiera stride), got {self.image_size}"
            )
        if self.proj_tpos_enc_in_obj_ptrs and not self.add_tpos_enc_to_obj_ptrs:
            raise ConfigError("proj_tpos_enc_in_obj_ptrs needs add_tpos_enc_to_obj_ptrs")
        if self.fixed_no_obj_ptr and not (self.pred_obj_scores and self.use_obj_ptrs_in_encoder):
            raise ConfigError("fixed_no_obj_ptr needs pred_obj_scores and use_obj_ptrs_in_encoder")

    @property
    def hidden_dim(self) -> int:
        return self.d_model

    @property
    def backbone_channel_list(self) -> Tuple[int, ...]:
        """Trunk output channels, lowest resolution first (as the FPN neck lists them)."""
        return tuple(reversed(self.trunk.stage_dims))

    @property
    def feat_sizes(self) -> Tuple[Tuple[int, int], ...]:
        """(H, W) of the three backbone levels the SAM heads use, highest resolution first."""
        s = self.image_size
        return ((s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16))


# ----------------------------------------------------------------------------- presets
_TINY = HieraConfig(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9))
_SMALL = HieraConfig(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13))
_BASE_PLUS = HieraConfig(
    embed_dim=112, num_heads=2, stages=(2, 3, 16, 3), global_att_blocks=(12, 16, 20),
    window_pos_embed_bkg_spatial_size=(14, 14),
)
_LARGE = HieraConfig(
    embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
    window_spec=(8, 4, 16, 8),
)
_TRUNKS = {"tiny": _TINY, "small": _SMALL, "base_plus": _BASE_PLUS, "large": _LARGE}
_SIZE_LETTER = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}

# SAM 2.0 differs from 2.1 only in how object pointers and absent objects are encoded.
_SAM20_CHANGES = dict(
    no_obj_embed_spatial=False,
    add_tpos_enc_to_obj_ptrs=False,
    proj_tpos_enc_in_obj_ptrs=False,
    use_signed_tpos_enc_to_obj_ptrs=False,
)


def _make_presets() -> dict:
    presets = {}
    for size, trunk in _TRUNKS.items():
        presets[f"sam2.1_hiera_{size}"] = SAM2Config(name=f"sam2.1_hiera_{size}", trunk=trunk)
        presets[f"sam2_hiera_{size}"] = SAM2Config(name=f"sam2_hiera_{size}", trunk=trunk, **_SAM20_CHANGES)
    return presets


PRESETS: dict = _make_presets()


def _aliases() -> dict:
    table = {}
    for size, letter in _SIZE_LETTER.items():
        for ver, prefix in (("sam2.1", "sam2.1_hiera_"), ("sam2", "sam2_hiera_")):
            key = f"{prefix}{size}"
            for alias in (
                key,
                f"{prefix}{letter}",
                f"{prefix}{letter}.yaml",
                f"configs/{ver}/{prefix}{letter}.yaml",
                f"{ver}/{prefix}{letter}.yaml",
                f"facebook/{ver.replace('_', '-')}-hiera-{size.replace('_', '-')}",
                f"{prefix}{size}.pt",
            ):
                table[alias] = key
    return table


_ALIASES = _aliases()


def resolve_config(name: "str | SAM2Config") -> SAM2Config:
    """The preset a user-supplied config name refers to (YAML path, file name or short name),
    or the config of a user's own YAML file (see ``sam2_fast.config_yaml``)."""
    if isinstance(name, SAM2Config):
        return name
    if not isinstance(name, (str, os.PathLike)):
        raise ConfigError(f"config must be a name or a SAM2Config, got {type(name).__name__}")
    text = os.fspath(name).strip()
    for cand in (text, text.lstrip("/")):
        if cand in _ALIASES:  # official names win, as Hydra finds them inside the package
            return PRESETS[_ALIASES[cand]]
    if text.lower().endswith((".yaml", ".yml")) and os.path.isfile(text):
        from .config_yaml import config_from_yaml  # a user's own YAML (PyYAML imported there)

        return config_from_yaml(text)
    if os.path.basename(text) in _ALIASES:
        return PRESETS[_ALIASES[os.path.basename(text)]]
    if text.lower().endswith((".yaml", ".yml")):
        raise ConfigError(f"config file {text!r} does not exist, and it is not an official SAM 2 config "
                          f"name (known: {', '.join(sorted(PRESETS))})")
    known = ", ".join(sorted(PRESETS))
    raise ConfigError(
        f"unknown SAM 2 config {text!r}; known configs: {known} "
        f"(official YAML names such as 'configs/sam2.1/sam2.1_hiera_l.yaml' work too)"
    )


# ----------------------------------------------------------------------------- overrides
def _parse_value(raw: str) -> Any:
    low = raw.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        return float(raw)
    except ValueError:
        pass
    if raw.startswith("[") and raw.endswith("]"):
        return tuple(_parse_value(p) for p in raw[1:-1].split(",") if p.strip())
    return raw.strip().strip("'\"")


def _coerce(current: Any, value: Any, key: str) -> Any:
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"override {key} expects true/false, got {value!r}")
        return value
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"override {key} expects an integer, got {value!r}")
        return int(value)
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"override {key} expects a number, got {value!r}")
        return float(value)
    if isinstance(current, tuple):
        if not isinstance(value, tuple):
            raise ConfigError(f"override {key} expects a list like [1, 2], got {value!r}")
        return value
    return value


# Hydra keys of the official YAML that name nested modules; we map the ones users touch.
_TRUNK_PREFIX = "image_encoder.trunk."


def apply_overrides(cfg: SAM2Config, overrides: Iterable[str]) -> SAM2Config:
    """Apply ``++model.KEY=VALUE`` strings as the official builder's Hydra overrides do."""
    if isinstance(overrides, str):
        overrides = [overrides]
    for item in overrides:
        text = str(item).strip()
        body = text.lstrip("+~")
        if "=" not in body:
            raise ConfigError(f"override {text!r} is not of the form ++model.KEY=VALUE")
        key, raw = body.split("=", 1)
        key = key.strip()
        if not key.startswith("model."):
            raise ConfigError(f"override {text!r}: only keys under 'model.' are supported")
        cfg = _apply_key(cfg, key[len("model."):], _parse_value(raw))
    return cfg


_FLAT_EXCLUDED = ("name", "trunk", "sam_mask_decoder_extra_args")


def _apply_key(cfg: SAM2Config, key: str, value: Any, nested: bool = True) -> SAM2Config:
    """One override: a flat model key, a trunk or decoder-extra key, or (``nested``) a nested
    key of the official YAML read through ``config_yaml.LEAVES``."""
    model_fields = {f.name for f in fields(SAM2Config)}
    if key == "_target_":
        return cfg  # which predictor class to build is chosen by the builder, not by a string
    if key.startswith("sam_mask_decoder_extra_args."):
        sub = key.split(".", 1)[1]
        extra_fields = {f.name for f in fields(MaskDecoderExtraArgs)}
        if sub not in extra_fields:
            raise ConfigError(f"unknown override key model.{key}; known: {sorted(extra_fields)}")
        base = cfg.sam_mask_decoder_extra_args or MaskDecoderExtraArgs()
        return replace(cfg, sam_mask_decoder_extra_args=replace(base, **{sub: _coerce(getattr(base, sub), value, key)}))
    if key.startswith(_TRUNK_PREFIX):
        sub = key[len(_TRUNK_PREFIX):]
        trunk_fields = {f.name for f in fields(HieraConfig)}
        if sub not in trunk_fields:
            raise ConfigError(f"unknown override key model.{key}; known trunk keys: {sorted(trunk_fields)}")
        return replace(cfg, trunk=replace(cfg.trunk, **{sub: _coerce(getattr(cfg.trunk, sub), value, key)}))
    if key in model_fields and key not in _FLAT_EXCLUDED:
        return replace(cfg, **{key: _coerce(getattr(cfg, key), value, key)})
    if nested:
        return _apply_nested(cfg, key, value)
    raise ConfigError(f"override model.{key} cannot be applied on its own; edit it in a YAML file")


def _apply_nested(cfg: SAM2Config, key: str, value: Any) -> SAM2Config:
    """A nested key of the official YAML (``memory_attention.layer.dim_feedforward``), read
    through the custom-config table: a setting sets its field (routed as the key that names
    the field directly), a fixed or derived value must equal what we build (then it changes
    nothing), anything else is an error naming the key."""
    from sam2_fast import config_yaml  # lazy: config_yaml imports this module

    leaf = config_yaml.LEAVES.get(key)
    if leaf is None:
        known = sorted(f.name for f in fields(SAM2Config) if f.name not in ("name", "trunk"))
        raise ConfigError(f"unknown override key model.{key}; known keys: {', '.join(known)} "
                          "and the nested keys of the official YAML files")
    if leaf.field is None:
        ok = leaf.supported(cfg)
        if not any(config_yaml._same(value, v) for v in ok):
            shown = " or ".join(repr(v) for v in ok)
            raise ConfigError(f"override model.{key}={value!r} is not supported: sam2_fast builds this "
                              f"part with {shown} only (for this config)")
        return cfg
    direct = (_TRUNK_PREFIX + leaf.field[len("trunk."):]) if leaf.field.startswith("trunk.") else leaf.field
    return _apply_key(cfg, direct, value, nested=False)


POSTPROCESSING_OVERRIDES: Tuple[str, ...] = (
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
)
VIDEO_POSTPROCESSING_OVERRIDES: Tuple[str, ...] = POSTPROCESSING_OVERRIDES + (
    "++model.binarize_mask_from_pts_for_mem_enc=true",
    "++model.fill_hole_area=8",
)


def with_image_size(cfg: SAM2Config, image_size: int) -> SAM2Config:
    """A copy of ``cfg`` at another input resolution (a multiple of 32)."""
    return replace(cfg, image_size=int(image_size))


def as_dict(cfg: SAM2Config) -> dict:
    return dataclasses.asdict(cfg)
