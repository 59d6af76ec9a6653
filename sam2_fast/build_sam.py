"""Builders with the official ``sam2.build_sam`` signatures, so that swapping the import works.

    from sam2_fast.build_sam import build_sam2, build_sam2_video_predictor

Configs are our frozen presets (see ``sam2_fast.config``); the official YAML names select
them, and a path to a user's own YAML file is read by ``sam2_fast.config_yaml``. ``hydra_overrides_extra`` keeps its meaning: ``++model.KEY=VALUE`` strings are applied
to the config, and unknown keys are rejected by name.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import warnings
from typing import Iterable, Optional, Sequence, Tuple, Type

import torch

from .checkpoint import load_checkpoint
from .config import (
    POSTPROCESSING_OVERRIDES,
    VIDEO_POSTPROCESSING_OVERRIDES,
    ConfigError,
    SAM2Config,
    apply_overrides,
    resolve_config,
)

log = logging.getLogger(__name__)

# Hugging Face model ids of the official releases -> (config name, checkpoint file name)
HF_MODEL_ID_TO_FILENAMES = {
    f"facebook/{ver}-hiera-{size.replace('_', '-')}": (
        f"configs/{ver}/{ver}_hiera_{letter}.yaml",
        f"{ver}_hiera_{size}.pt",
    )
    for ver in ("sam2", "sam2.1")
    for size, letter in (("tiny", "t"), ("small", "s"), ("base_plus", "b+"), ("large", "l"))
}
DOWNLOAD_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2"

# keyword arguments of the official builders that we accept and act on
_KNOWN_KWARGS = {"image_size"}


def _resolve_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={str(device)!r} was requested but CUDA is not available on this machine; "
            "pass device='cpu' (or 'mps') to build the model here"
        )
    return dev


def make_config(config_file, hydra_overrides_extra: Iterable[str] = (),
                postprocessing: Sequence[str] = (), image_size: Optional[int] = None) -> SAM2Config:
    """Our config for a config name or YAML file plus overrides (post-processing ones first)."""
    cfg = resolve_config(config_file)
    if isinstance(hydra_overrides_extra, str):
        hydra_overrides_extra = [hydra_overrides_extra]
    cfg = apply_overrides(cfg, list(postprocessing) + list(hydra_overrides_extra))
    if image_size is not None:
        cfg = dataclasses.replace(cfg, image_size=int(image_size))
    return cfg


def _split_kwargs(kwargs: dict) -> Optional[int]:
    unknown = sorted(set(kwargs) - _KNOWN_KWARGS)
    if unknown:
        # the official builders swallow **kwargs silently; we warn so typos are seen
        warnings.warn(f"build_sam2: ignoring unknown keyword arguments {unknown}", stacklevel=3)
    return kwargs.get("image_size")


def _finish(model: torch.nn.Module, ckpt_path, cfg: SAM2Config, device, mode: str):
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    load_checkpoint(model, ckpt_path, config_name=cfg.name)
    return model.to(device).train(mode == "train")


def build_sam2(
    config_file,
    ckpt_path=None,
    device="cuda",
    mode="eval",
    hydra_overrides_extra=(),
    apply_postprocessing=True,
    **kwargs,
):
    """The SAM 2 model (``SAM2Base``) for image prediction, as ``sam2.build_sam.build_sam2``."""
    from .modeling.sam2_base import SAM2Base

    dev = _resolve_device(device)
    post = POSTPROCESSING_OVERRIDES if apply_postprocessing else ()
    cfg = make_config(config_file, hydra_overrides_extra, post, _split_kwargs(kwargs))
    return _finish(SAM2Base(cfg), ckpt_path, cfg, dev, mode)


def build_sam2_video_predictor(
    config_file,
    ckpt_path=None,
    device="cuda",
    mode="eval",
    hydra_overrides_extra=(),
    apply_postprocessing=True,
    vos_optimized=False,
    **kwargs,
):
    """A ``SAM2VideoPredictor``, as ``sam2.build_sam.build_sam2_video_predictor``.

    ``vos_optimized=True`` asks for our fast runtime (bf16, compiled, static memory bank);
    it gives the same results as the eager predictor up to the dtype's rounding.
    """
    from .sam2_video_predictor import SAM2VideoPredictor, SAM2VideoPredictorVOS

    dev = _resolve_device(device)
    post = VIDEO_POSTPROCESSING_OVERRIDES if apply_postprocessing else ()
    cfg = make_config(config_file, hydra_overrides_extra, post, _split_kwargs(kwargs))
    cls = SAM2VideoPredictorVOS if vos_optimized else SAM2VideoPredictor
    predictor = _finish(cls(cfg), ckpt_path, cfg, dev, mode)
    if vos_optimized:
        predictor = predictor.enable_runtime_once()
    return predictor


def build_sam2_camera_predictor(
    config_file,
    ckpt_path=None,
    device="cuda",
    mode="eval",
    hydra_overrides_extra=(),
    apply_postprocessing=True,
    vos_optimized=False,
    *,
    color="rgb",
    prefetch=2,
    preprocess="auto",
    **kwargs,
):
    """A live-stream tracker (:class:`sam2_fast.stream.StreamingTracker`), with the calls of
    the real-time fork's camera predictor: ``load_first_frame``, ``add_new_prompt``, ``track``.

    It wraps the video predictor these arguments build (same model, same per-frame step).
    ``color="bgr"`` for cv2 frames; ``prefetch``: frames ``tracker.stream`` prepares ahead;
    ``preprocess``: where frames are resized ("auto": on the model's device on CUDA, exactly
    as PIL on the host would; see ``StreamingTracker``).
    """
    from .stream import StreamingTracker

    predictor = build_sam2_video_predictor(config_file, ckpt_path, device, mode, hydra_overrides_extra,
                                           apply_postprocessing, vos_optimized, **kwargs)
    return StreamingTracker(predictor, color=color, prefetch=prefetch, preprocess=preprocess)


def _enable_fast_runtime(predictor):
    try:
        from .runtime import enable_fast_runtime
    except ImportError:  # the runtime is optional; the eager predictor gives the same masks
        log.info("vos_optimized: fast runtime unavailable, using the eager predictor")
        return predictor
    return enable_fast_runtime(predictor)


# ----------------------------------------------------------------------------- checkpoints
def download_cache_dir() -> str:
    """Where ``sam2-fast download`` puts checkpoints: ``$SAM2_FAST_HOME``, else
    ``$XDG_CACHE_HOME/sam2_fast`` (``~/.cache/sam2_fast``)."""
    home = os.environ.get("SAM2_FAST_HOME")
    if home:
        return os.path.abspath(os.path.expanduser(home))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "sam2_fast")


def checkpoint_search_paths(filename: str, model_id: str) -> list:
    """Where a checkpoint is looked for before any download, in order (the download cache of
    ``sam2-fast download`` last, so ``from_pretrained`` finds what the command fetched)."""
    places = []
    env_dir = os.environ.get("SAM2_FAST_CHECKPOINT_DIR") or os.environ.get("SAM2_CHECKPOINT_DIR")
    if env_dir:
        places.append(os.path.join(env_dir, filename))
    places += [os.path.join("checkpoints", filename), filename]
    hf_home = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub"
    )
    repo_dir = os.path.join(hf_home, "models--" + model_id.replace("/", "--"), "snapshots")
    places += sorted(glob.glob(os.path.join(repo_dir, "*", filename)))
    places.append(os.path.join(download_cache_dir(), filename))
    return places


def find_checkpoint(model_id: str) -> Tuple[str, str]:
    """(config name, local checkpoint path) for an official model id; downloads if it can."""
    if model_id not in HF_MODEL_ID_TO_FILENAMES:
        raise ConfigError(
            f"unknown model id {model_id!r}; known: {', '.join(sorted(HF_MODEL_ID_TO_FILENAMES))}"
        )
    config_name, filename = HF_MODEL_ID_TO_FILENAMES[model_id]
    looked = checkpoint_search_paths(filename, model_id)
    for place in looked:
        if os.path.isfile(place):
            return config_name, place
    try:
        from huggingface_hub import hf_hub_download  # optional dependency
    except ImportError:
        hf_hub_download = None
    if hf_hub_download is not None:
        try:
            return config_name, hf_hub_download(repo_id=model_id, filename=filename)
        except Exception as exc:  # offline, or the hub refused: say where we looked
            reason = f"the Hugging Face download failed ({type(exc).__name__}: {exc})"
    else:
        reason = "huggingface_hub is not installed"
    raise FileNotFoundError(
        f"no local checkpoint for {model_id!r} and {reason}. Looked in: {looked or '(nowhere)'}. "
        f"Download {DOWNLOAD_BASE}/{'092824' if filename.startswith('sam2.1') else '072824'}/{filename} "
        f"into ./checkpoints/ or set SAM2_FAST_CHECKPOINT_DIR."
    )


def build_sam2_hf(model_id, **kwargs):
    config_name, ckpt_path = find_checkpoint(model_id)
    return build_sam2(config_file=config_name, ckpt_path=ckpt_path, **kwargs)


def build_sam2_video_predictor_hf(model_id, **kwargs):
    config_name, ckpt_path = find_checkpoint(model_id)
    return build_sam2_video_predictor(config_file=config_name, ckpt_path=ckpt_path, **kwargs)


def predictor_class(video: bool) -> Type[torch.nn.Module]:
    """The model class the builders construct (for tools that need the type)."""
    if video:
        from .sam2_video_predictor import SAM2VideoPredictor

        return SAM2VideoPredictor
    from .modeling.sam2_base import SAM2Base

    return SAM2Base
