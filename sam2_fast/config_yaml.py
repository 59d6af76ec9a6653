"""A user's own SAM 2 YAML config (a modified copy of an official one) as a ``SAM2Config``.

People who fine-tuned or adapted SAM 2 keep a copy of an official YAML with a few values
changed (``image_size: 768``, ``num_maskmem``, a trunk's ``window_spec``, ...) and pass its
path to ``build_sam2``. We read the file's ``model:`` section, flatten it to dotted leaf keys
(``image_encoder.trunk.embed_dim``) and look every leaf up in ``LEAVES``, which says what the
leaf means here:

* a *setting*: the ``SAM2Config`` field it sets (``num_maskmem``, ``trunk.window_spec``);
* a *fixed* value our implementation is built for (``_target_`` class names, dropout 0.1,
  one memory-attention head), or a value *derived* from the config (the neck's
  ``backbone_channel_list`` from the trunk, every ``embedding_dim`` = ``d_model``).

A key absent from the file takes the official constructor's default, exactly as Hydra would
build it (``LEAVES`` records those defaults; ``REQUIRED`` where the official class has none).
A fixed or derived leaf with another value, an unknown key or a missing required key is a
``ConfigError`` that names the key, the file's value and the supported one: we never build a
silently different model. ``LEAVES`` covers every leaf of the 8 official model sections; a
test reads each official YAML as a custom file and gets exactly its preset back.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Dict, Optional, Tuple

from .config import PRESETS, ConfigError, HieraConfig, MaskDecoderExtraArgs, SAM2Config, _coerce


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # the official constructor has no default for this argument


@dataclass(frozen=True)
class Leaf:
    """What one dotted key of a YAML ``model:`` section means for our implementation."""

    field: Optional[str] = None  # SAM2Config field it sets: "num_maskmem", "trunk.stages", ...
    supported: Optional[Callable[[SAM2Config], Tuple[Any, ...]]] = None  # allowed values
    default: Any = REQUIRED  # the official value when the key is absent


def _set(field: str, default: Any = REQUIRED) -> Leaf:
    return Leaf(field=field, default=default)


def _fixed(*values: Any, default: Any = REQUIRED) -> Leaf:
    return Leaf(supported=lambda cfg: values, default=default)


def _derived(fn: Callable[[SAM2Config], Any], default: Any = REQUIRED) -> Leaf:
    return Leaf(supported=lambda cfg: (fn(cfg),), default=default)


def _under(prefix: str, table: Dict[str, Leaf]) -> Dict[str, Leaf]:
    return {f"{prefix}.{k}": v for k, v in table.items()}


_M = "sam2.modeling."
_d_model = _derived(lambda c: c.d_model)


def _sine(dim: Callable[[SAM2Config], int]) -> Dict[str, Leaf]:
    """PositionEmbeddingSine: ours is the official normalized sine with temperature 1e4."""
    return {
        "_target_": _fixed(_M + "position_encoding.PositionEmbeddingSine"),
        "num_pos_feats": _derived(dim),
        "normalize": _fixed(True, default=True),
        "scale": _fixed(None, default=None),
        "temperature": _fixed(10000, default=10000),
    }


def _rope(cross: bool) -> Dict[str, Leaf]:
    """RoPEAttention of a memory-attention layer; rope_theta / feat_sizes are set by the
    self-attention's keys (one value each in our config), the cross-attention must agree."""
    theta = _derived(lambda c: c.rope_theta, default=10000.0) if cross else _set("rope_theta", 10000.0)
    sizes = (_derived(lambda c: c.rope_feat_sizes, default=(64, 64)) if cross
             else _set("rope_feat_sizes", (64, 64)))
    return {
        "_target_": _fixed(_M + "sam.transformer.RoPEAttention"),
        "rope_theta": theta,
        "feat_sizes": sizes,
        "rope_k_repeat": _fixed(cross, default=False),
        "embedding_dim": _d_model,
        "num_heads": _fixed(1),
        "downsample_rate": _fixed(1, default=1),
        "dropout": _fixed(0.1, default=0.0),
        # cross-attention reads the memories' mem_dim channels; None = embedding_dim
        "kv_in_dim": _derived(lambda c: c.mem_dim, default=None) if cross else _fixed(None, default=None),
    }


# Official constructor defaults of the flat keys (SAM2Base, then SAM2VideoPredictor).
_FLAT_DEFAULTS: Dict[str, Any] = dict(
    num_maskmem=7, image_size=512, backbone_stride=16, sigmoid_scale_for_mem_enc=1.0,
    sigmoid_bias_for_mem_enc=0.0, binarize_mask_from_pts_for_mem_enc=False,
    use_mask_input_as_output_without_sam=False, max_cond_frames_in_attn=-1,
    directly_add_no_mem_embed=False, use_high_res_features_in_sam=False, multimask_output_in_sam=False,
    multimask_min_pt_num=1, multimask_max_pt_num=1, multimask_output_for_tracking=False,
    use_multimask_token_for_obj_ptr=False, iou_prediction_use_sigmoid=False,
    memory_temporal_stride_for_eval=1, non_overlap_masks_for_mem_enc=False, use_obj_ptrs_in_encoder=False,
    max_obj_ptrs_in_encoder=16, add_tpos_enc_to_obj_ptrs=True, proj_tpos_enc_in_obj_ptrs=False,
    use_signed_tpos_enc_to_obj_ptrs=False, only_obj_ptrs_in_the_past_for_eval=False,
    pred_obj_scores=False, pred_obj_scores_mlp=False, fixed_no_obj_ptr=False, soft_no_obj_ptr=False,
    use_mlp_for_obj_ptr_proj=False, no_obj_embed_spatial=False, compile_image_encoder=False,
    fill_hole_area=0, non_overlap_masks=False, clear_non_cond_mem_around_input=False,
    clear_non_cond_mem_for_multi_obj=False, add_all_frames_to_correct_as_cond=False,
)
# Hiera's constructor defaults (every HieraConfig field is a trunk key of the same name).
_TRUNK_DEFAULTS: Dict[str, Any] = dict(
    embed_dim=96, num_heads=1, drop_path_rate=0.0, q_pool=3, q_stride=(2, 2), stages=(2, 3, 16, 3),
    dim_mul=2.0, head_mul=2.0, window_pos_embed_bkg_spatial_size=(14, 14), window_spec=(8, 4, 14, 7),
    global_att_blocks=(12, 16, 20),
)
_TOP_TARGETS = (_M + "sam2_base.SAM2Base", "sam2.sam2_video_predictor.SAM2VideoPredictor",
                "sam2.sam2_video_predictor.SAM2VideoPredictorVOS")  # the builder picks the class

LEAVES: Dict[str, Leaf] = {
    "_target_": _fixed(*_TOP_TARGETS),
    **{k: _set(k, v) for k, v in _FLAT_DEFAULTS.items()},
    **{f"sam_mask_decoder_extra_args.{f.name}": _set(f"sam_mask_decoder_extra_args.{f.name}", f.default)
       for f in fields(MaskDecoderExtraArgs)},
    # image encoder: Hiera trunk + FPN neck
    "image_encoder._target_": _fixed(_M + "backbones.image_encoder.ImageEncoder"),
    "image_encoder.scalp": _set("scalp", 0),
    "image_encoder.trunk._target_": _fixed(_M + "backbones.hieradet.Hiera"),
    **{f"image_encoder.trunk.{k}": _set(f"trunk.{k}", v) for k, v in _TRUNK_DEFAULTS.items()},
    "image_encoder.trunk.weights_path": _fixed(None, default=None),
    "image_encoder.trunk.return_interm_layers": _fixed(True, default=True),
    **_under("image_encoder.neck", {
        "_target_": _fixed(_M + "backbones.image_encoder.FpnNeck"),
        **_under("position_encoding", _sine(lambda c: c.d_model)),
        "d_model": _set("d_model"),
        "backbone_channel_list": _derived(lambda c: c.backbone_channel_list),
        "fpn_top_down_levels": _set("fpn_top_down_levels", None),  # None: every level
        "fpn_interp_model": _set("fpn_interp_model", "bilinear"),
        "kernel_size": _fixed(1, default=1),
        "stride": _fixed(1, default=1),
        "padding": _fixed(0, default=0),
        "fuse_type": _fixed("sum", default="sum"),
    }),
    # memory attention
    **_under("memory_attention", {
        "_target_": _fixed(_M + "memory_attention.MemoryAttention"),
        "d_model": _d_model,
        "pos_enc_at_input": _fixed(True),
        "num_layers": _set("mem_attn_layers"),
        "batch_first": _fixed(True, default=True),
        **_under("layer", {
            "_target_": _fixed(_M + "memory_attention.MemoryAttentionLayer"),
            "activation": _fixed("relu"),
            "dim_feedforward": _set("mem_attn_ffn_dim"),
            "dropout": _fixed(0.1),
            "pos_enc_at_attn": _fixed(False),
            "d_model": _d_model,
            "pos_enc_at_cross_attn_keys": _fixed(True),
            "pos_enc_at_cross_attn_queries": _fixed(False),
            **_under("self_attention", _rope(cross=False)),
            **_under("cross_attention", _rope(cross=True)),
        }),
    }),
    # memory encoder
    **_under("memory_encoder", {
        "_target_": _fixed(_M + "memory_encoder.MemoryEncoder"),
        "out_dim": _set("mem_dim"),
        "in_dim": _derived(lambda c: c.d_model, default=256),
        **_under("position_encoding", _sine(lambda c: c.mem_dim)),
        "mask_downsampler._target_": _fixed(_M + "memory_encoder.MaskDownSampler"),
        "mask_downsampler.embed_dim": _derived(lambda c: c.d_model, default=256),
        "mask_downsampler.kernel_size": _fixed(3, default=4),
        "mask_downsampler.stride": _fixed(2, default=4),
        "mask_downsampler.padding": _fixed(1, default=0),
        "mask_downsampler.total_stride": _derived(lambda c: c.backbone_stride, default=16),
        "fuser._target_": _fixed(_M + "memory_encoder.Fuser"),
        "fuser.num_layers": _set("fuser_layers"),
        "fuser.dim": _fixed(None, default=None),
        "fuser.input_projection": _fixed(False, default=False),
        **_under("fuser.layer", {
            "_target_": _fixed(_M + "memory_encoder.CXBlock"),
            "dim": _d_model,
            "kernel_size": _fixed(7, default=7),
            "padding": _fixed(3, default=3),
            "drop_path": _fixed(0.0, default=0.0),
            "layer_scale_init_value": _fixed(1e-6, default=1e-6),
            "use_dwconv": _fixed(True, default=True),
        }),
    }),
}
LEAVES["sam_mask_decoder_extra_args"] = _set("sam_mask_decoder_extra_args", None)  # null / {}


# ----------------------------------------------------------------------------- reading
def _yaml_loader():
    """PyYAML's safe loader with OmegaConf's number rules (``1e-6`` is a float, as Hydra reads it)."""
    try:
        import yaml
    except ImportError:
        raise ConfigError("reading a custom YAML config needs PyYAML: pip install pyyaml") from None

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if not isinstance(key_node.value, str):
                    continue  # a non-scalar key: PyYAML reports it itself
                if key_node.value in seen:  # OmegaConf refuses these too; PyYAML keeps the last
                    raise ConfigError(f"duplicate key {key_node.value!r} ({key_node.start_mark})")
                seen.add(key_node.value)
            return super().construct_mapping(node, deep=deep)

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"""^(?:
         [-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
        |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))
    return yaml, Loader


def read_model_section(path: str) -> Dict[str, Any]:
    """The file's ``model:`` mapping with ``${a.b}`` interpolations resolved."""
    yaml, loader = _yaml_loader()
    try:
        with open(path, encoding="utf-8") as fh:
            root = yaml.load(fh, Loader=loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(root, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'model:' section, got {type(root).__name__}")
    if "defaults" in root:
        raise ConfigError(f"{path}: Hydra 'defaults:' composition is not supported; write the whole "
                          "'model:' section (copy an official config such as configs/sam2.1/sam2.1_hiera_t.yaml)")
    if "model" not in root:
        if isinstance(root.get("trainer"), dict) and "model" in root["trainer"]:
            raise ConfigError(f"{path} is a training config (the model is under 'trainer.model'); "
                              "build_sam2 expects a top-level 'model:' section, as in configs/sam2.1/*.yaml")
        raise ConfigError(f"{path} has no 'model:' section (top-level keys: {sorted(map(str, root))}); "
                          "expected a SAM 2 model config like configs/sam2.1/sam2.1_hiera_t.yaml")
    if not isinstance(root["model"], dict):
        raise ConfigError(f"{path}: 'model:' must be a mapping, got {root['model']!r}")
    return _resolve(root["model"], root, "model", 0)


_INTERP = re.compile(r"\$\{([^}]*)\}")
_REF = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def _resolve(value: Any, root: Dict[str, Any], where: str, depth: int) -> Any:
    """Resolve Hydra's plain ``${a.b}`` references (absolute, within this file); refuse the rest."""
    if isinstance(value, dict):
        return {k: _resolve(v, root, f"{where}.{k}", depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root, f"{where}[{i}]", depth) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    if depth > 20:
        raise ConfigError(f"{where}: interpolation {value!r} does not resolve (a reference loop?)")

    def lookup(ref: str) -> Any:
        if not _REF.fullmatch(ref.strip()):
            raise ConfigError(f"{where}: interpolation ${{{ref}}} is not supported; only plain references "
                              "to keys of the same file (${scratch.resolution}) are resolved, not resolvers "
                              "(${times:...}, ${oc.env:...}) or relative keys (${.x}): write the value")
        node: Any = root
        for part in ref.strip().split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{where}: interpolation ${{{ref}}} refers to a key the file does not have")
            node = node[part]
        return _resolve(node, root, where, depth + 1)

    whole = _INTERP.fullmatch(value)
    if whole:
        return lookup(whole.group(1))
    return _INTERP.sub(lambda m: str(lookup(m.group(1))), value)


def flatten(section: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Dotted leaf keys of a nested mapping; lists become tuples, an empty mapping is a leaf."""
    out: Dict[str, Any] = {}
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


# ----------------------------------------------------------------------------- resolving
def _same(a: Any, b: Any) -> bool:
    """Equal as config values: bools only equal bools (``True == 1`` must not pass)."""
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return (isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b)))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _unknown(key: str, value: Any, path: str) -> ConfigError:
    near = difflib.get_close_matches(key, LEAVES, n=1)
    hint = f" (did you mean model.{near[0]}?)" if near else ""
    return ConfigError(f"{path}: model.{key} = {value!r} is not a setting of SAM 2 that sam2_fast "
                       f"implements{hint}")


def config_from_leaves(leaves: Dict[str, Any], path: str = "<config>") -> SAM2Config:
    """The SAM2Config a flattened ``model:`` section describes (see the module docstring)."""
    for key, value in leaves.items():
        if key not in LEAVES:
            raise _unknown(key, value, path)
    flat: Dict[str, Any] = {}
    trunk: Dict[str, Any] = {}
    extra: Dict[str, Any] = {}
    for key, leaf in LEAVES.items():
        if leaf.field is None:
            continue
        value = leaves.get(key, leaf.default)
        if value is REQUIRED:
            raise ConfigError(f"{path}: model.{key} is missing (the official builder needs it too)")
        field = leaf.field
        if field == "sam_mask_decoder_extra_args":
            if value not in (None, {}):
                raise ConfigError(f"{path}: model.{key} must be a mapping or null, got {value!r}")
        elif field.startswith("trunk."):
            sub = field[len("trunk."):]
            trunk[sub] = _coerce(getattr(HieraConfig(), sub), value, f"model.{key} in {path}")
        elif field.startswith("sam_mask_decoder_extra_args."):
            if key in leaves:  # the official decoder's defaults equal MaskDecoderExtraArgs'
                sub = field.split(".", 1)[1]
                extra[sub] = _coerce(getattr(MaskDecoderExtraArgs(), sub), value, f"model.{key} in {path}")
        elif field == "fpn_top_down_levels" and value is None:
            flat[field] = None  # every level; filled in once the trunk is known
        else:
            flat[field] = _coerce(getattr(SAM2Config(), field), value, f"model.{key} in {path}")
    hiera = HieraConfig(**trunk)
    if flat["fpn_top_down_levels"] is None:
        flat["fpn_top_down_levels"] = tuple(range(len(hiera.stages)))
    cfg = replace(SAM2Config(), trunk=hiera, sam_mask_decoder_extra_args=(
        MaskDecoderExtraArgs(**extra) if extra else None), **flat)
    for key, leaf in LEAVES.items():
        if leaf.supported is None:
            continue
        ok = leaf.supported(cfg)
        shown = " or ".join(repr(v) for v in ok)
        if key not in leaves and leaf.default is REQUIRED:
            raise ConfigError(f"{path}: model.{key} is missing (the official builder needs it too); "
                              f"sam2_fast supports {shown} here")
        value = leaves.get(key, leaf.default)
        if not any(_same(value, v) for v in ok):
            given = repr(value) if key in leaves else f"absent (official default {value!r})"
            raise ConfigError(f"{path}: model.{key} = {given} is not supported: sam2_fast builds this "
                              f"part with {shown} only (for this config)")
    return cfg


def _field_diffs(a: SAM2Config, b: SAM2Config) -> int:
    n = sum(getattr(a.trunk, f.name) != getattr(b.trunk, f.name) for f in fields(HieraConfig))
    return n + sum(getattr(a, f.name) != getattr(b, f.name) for f in fields(SAM2Config)
                   if f.name not in ("name", "trunk"))


def config_from_yaml(path: "str | os.PathLike") -> SAM2Config:
    """Our config for a user's YAML file: the closest preset's name if it equals one exactly,
    else ``custom:<file> (from <closest preset>)``."""
    path = os.fspath(path)
    cfg = config_from_leaves(flatten(read_model_section(path)), path)
    closest = min(PRESETS.values(), key=lambda p: _field_diffs(cfg, p))
    if _field_diffs(cfg, closest) == 0:
        return closest
    return replace(cfg, name=f"custom:{os.path.basename(path)} (from {closest.name})")
