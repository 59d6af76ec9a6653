"""Official model names, their checkpoints' published addresses, and the download cache.

A model is named by its short name (``tiny``, ``small``, ``base_plus``, ``large``: SAM 2.1;
``sam2-tiny`` ...: SAM 2.0), its checkpoint stem (``sam2.1_hiera_large``), its Hugging Face
id (``facebook/sam2.1-hiera-large``) or its official YAML config name. Downloaded
checkpoints live in ``$SAM2_FAST_HOME`` (else ``$XDG_CACHE_HOME/sam2_fast``, else
``~/.cache/sam2_fast``), where every command finds them when ``--checkpoint`` is omitted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from sam2_fast.build_sam import DOWNLOAD_BASE, checkpoint_search_paths, download_cache_dir


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


@dataclass(frozen=True)
class ModelInfo:
    name: str  # checkpoint stem, e.g. "sam2.1_hiera_large"
    config: str  # official config name
    hf_id: str
    release: str  # the folder of the official download address

    @property
    def filename(self) -> str:
        return f"{self.name}.pt"

    @property
    def custom(self) -> bool:
        """A user's own YAML config (name = config = its absolute path): no published checkpoint."""
        return not self.release

    def url(self, base: Optional[str] = None) -> str:
        return f"{(base or default_base_url()).rstrip('/')}/{self.release}/{self.filename}"


_SIZES = (("tiny", "t"), ("small", "s"), ("base_plus", "b+"), ("large", "l"))
MODELS: Dict[str, ModelInfo] = {}
for _ver, _release in (("sam2.1", "092824"), ("sam2", "072824")):
    for _size, _letter in _SIZES:
        MODELS[f"{_ver}_hiera_{_size}"] = ModelInfo(
            f"{_ver}_hiera_{_size}", f"configs/{_ver}/{_ver}_hiera_{_letter}.yaml",
            f"facebook/{_ver}-hiera-{_size.replace('_', '-')}", _release)


def _aliases() -> Dict[str, str]:
    out: Dict[str, str] = {}
    for stem, info in MODELS.items():
        ver, _, size = stem.partition("_hiera_")
        letter = dict(_SIZES)[size]
        names = [stem, info.filename, info.hf_id, info.config, os.path.basename(info.config),
                 f"{ver}-{size}", f"{ver}_{size}", f"{ver}-{size.replace('_', '-')}"]
        if ver == "sam2.1":  # the current release answers to the bare size too
            names += [size, size.replace("_", "-"), letter]
        for n in names:
            out[n.lower()] = stem
    return out


_ALIASES = _aliases()


def resolve_model(name: str) -> ModelInfo:
    key = str(name).strip().lower()
    if key in _ALIASES:
        return MODELS[_ALIASES[key]]
    path = os.path.expanduser(str(name).strip())
    if key.endswith((".yaml", ".yml")):  # your own config (sam2_fast.config_yaml reads and checks it)
        if not os.path.isfile(path):
            raise CliError(f"config file not found: {name}")
        full = os.path.abspath(path)  # absolute: track-many's workers resolve it again
        return ModelInfo(full, full, "", "")
    raise CliError(f"unknown model {name!r}; use one of: tiny, small, base_plus, large (SAM 2.1), "
                   f"sam2-tiny, sam2-small, sam2-base_plus, sam2-large (SAM 2.0), a name such as "
                   f"sam2.1_hiera_large or facebook/sam2.1-hiera-large, or your own YAML config file "
                   f"(with --checkpoint)")


def default_base_url() -> str:
    return os.environ.get("SAM2_FAST_DOWNLOAD_BASE") or DOWNLOAD_BASE


def cache_dir() -> str:
    """Where ``sam2-fast download`` puts checkpoints (one definition, in build_sam)."""
    return download_cache_dir()


def checkpoint_places(info: ModelInfo) -> List[str]:
    """Where a checkpoint is looked for: the download cache, then the builders' places."""
    return [os.path.join(cache_dir(), info.filename)] + checkpoint_search_paths(info.filename, info.hf_id)


def find_checkpoint(info: ModelInfo, explicit: Optional[str]) -> str:
    """The checkpoint to load: ``--checkpoint`` if given (it must exist), else a local copy."""
    if explicit:
        if not os.path.exists(explicit):
            raise CliError(f"checkpoint not found: {explicit}")
        if os.path.isdir(explicit):
            raise CliError(f"--checkpoint {explicit} is a folder; give the .pt file")
        return explicit
    if info.custom:
        raise CliError(f"--model {info.name} is your own config: pass its checkpoint with --checkpoint PATH")
    for place in checkpoint_places(info):
        if os.path.isfile(place):
            return place
    raise CliError(f"no local checkpoint for {info.name}: run `sam2-fast download {info.name}` "
                   f"(or pass --checkpoint PATH); looked in {cache_dir()} and ./checkpoints")


def pick_device(name: str):
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CliError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name} asked for, but CUDA is not available here; use --device cpu")
    return dev


def overrides(image_size: Optional[int]) -> List[str]:
    """``--image-size`` as a config override (a smaller input: faster, coarser masks)."""
    if image_size is None:
        return []
    if image_size < 64 or image_size % 32:
        raise CliError(f"--image-size must be a multiple of 32 and at least 64, got {image_size}")
    return [f"++model.image_size={image_size}"]


def add_model_args(p) -> None:
    p.add_argument("--model", default="large", help="model name: tiny, small, base_plus, large (SAM 2.1; "
                   "default large), sam2-tiny ... (SAM 2.0), e.g. facebook/sam2.1-hiera-large, or your own "
                   "YAML config file (a changed copy of an official one; give --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="the .pt checkpoint (default: the one `sam2-fast download "
                   "MODEL` fetched, or ./checkpoints/NAME.pt)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--image-size", type=int, default=None,
                   help="model input size (default the model's 1024; smaller is faster and coarser)")


def explain_checkpoint_error(exc: Exception, info: ModelInfo, path: str) -> CliError:
    """A short message for a checkpoint that does not fit ``info`` (the loader lists keys)."""
    import re

    text = str(exc)
    fits = re.search(r"fit the config '([^']+)'", text)
    if fits:
        return CliError(f"checkpoint {path} is for {fits.group(1)}, not {info.name}: pass --model {fits.group(1)} "
                        f"or the {info.name} checkpoint")
    return CliError(text.splitlines()[0].rstrip(":") + f" ({info.name})")


def load_model(builder, info: ModelInfo, ckpt: str, **kwargs):
    """``builder(config, ckpt, **kwargs)`` with checkpoint problems turned into one line."""
    from sam2_fast.checkpoint import CheckpointError

    try:
        return builder(info.config, ckpt, **kwargs)
    except CheckpointError as exc:
        raise explain_checkpoint_error(exc, info, ckpt) from None
