"""Loading official SAM 2 checkpoints safely and strictly.

An official checkpoint is a ``torch.save``d dict ``{"model": state_dict}``; plain state
dicts are accepted too. Files are opened with ``weights_only=True`` (a checkpoint must
never run code) and memory-mapped where the file format allows it, so the tensors are
paged in from the file while they are copied into the model instead of being read into a
second full copy in anonymous memory (a large checkpoint is ~900 MB).
"""

from __future__ import annotations

import functools
import os
import pickle
import zipfile
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .config import PRESETS, SAM2Config

StateDict = Dict[str, torch.Tensor]
_SHOWN = 8  # how many key names an error message lists before summarising


class CheckpointError(RuntimeError):
    """A file that is not a usable SAM 2 checkpoint for the requested model."""


def read_state_dict(path: Union[str, os.PathLike]) -> StateDict:
    """Read a checkpoint file into a flat ``name -> tensor`` dict (no code is executed)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path!r} is a directory, expected a .pt file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes)")
    # mmap needs the zip format of torch.save (>= 1.6); legacy pickles are read normally.
    use_mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path!r}: it is not a plain tensor checkpoint "
            f"(weights_only loading rejected it, so it may contain code): {exc}"
        ) from exc
    except Exception as exc:  # torch raises many types for damaged files (IndexError, EOFError, ...)
        raise CheckpointError(
            f"cannot read checkpoint {path!r}: the file is truncated, corrupt or not a "
            f"PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    return extract_state_dict(obj, source=path)


def extract_state_dict(obj: object, source: str = "checkpoint") -> StateDict:
    """The model state dict inside an official checkpoint dict, or ``obj`` if it is one."""
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{source} does not hold a SAM 2 state dict: expected {{'model': state_dict}} or a "
            f"state dict, got {type(obj).__name__}"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{source} is not a state dict: entries {bad[:_SHOWN]} are not name -> tensor pairs"
        )
    return dict(obj)


@functools.lru_cache(maxsize=None)
def preset_signature(name: str) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    """Sorted (key, shape) pairs of a preset's state dict, computed on the meta device."""
    from .modeling.sam2_base import SAM2Base

    with torch.device("meta"):
        model = SAM2Base(PRESETS[name])
    return tuple(sorted((k, tuple(v.shape)) for k, v in model.state_dict().items()))


def guess_config(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The preset whose parameter names and shapes equal ``state_dict``'s, if any."""
    sig = tuple(sorted((k, tuple(v.shape)) for k, v in state_dict.items()))
    for name in PRESETS:
        try:
            if preset_signature(name) == sig:
                return name
        except Exception:  # a preset that cannot be built on meta must not hide the real error
            continue
    return None


def _list(keys) -> str:
    keys = sorted(keys)
    head = ", ".join(keys[:_SHOWN])
    return head + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def check_compatible(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                     config_name: Optional[str] = None) -> None:
    """Raise a CheckpointError naming missing/unexpected/mis-shaped keys (and the fitting config)."""
    expected = model.state_dict()
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    misshaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or misshaped):
        return
    parts = [f"checkpoint {source} does not fit the model"
             + (f" config {config_name!r}" if config_name else "") + ":"]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_list(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_list(unexpected)}")
    if misshaped:
        parts.append(f"shape mismatches ({len(misshaped)}): " + "; ".join(sorted(misshaped)[:_SHOWN]))
    fits = guess_config(state_dict)
    if fits is not None and fits != config_name:
        parts.append(f"these weights fit the config {fits!r}; build the model with that config")
    raise CheckpointError("\n  ".join(parts))


def load_checkpoint(model: nn.Module, ckpt: Union[str, os.PathLike, Mapping, None],
                    config_name: Optional[str] = None) -> nn.Module:
    """Load ``ckpt`` (path, official dict or state dict) into ``model`` strictly."""
    if ckpt is None:
        return model
    if isinstance(ckpt, (str, os.PathLike)):
        source = repr(os.fspath(ckpt))
        state_dict = read_state_dict(ckpt)
    else:
        source = "state dict"
        state_dict = extract_state_dict(ckpt, source="the given object")
    check_compatible(model, state_dict, source, config_name)
    # strict=True after the check above: it can no longer fail on keys, and it copies
    # each (memory-mapped) tensor into the model's own parameter storage.
    model.load_state_dict(state_dict, strict=True)
    return model


def save_checkpoint(model_or_state: Union[nn.Module, Mapping[str, torch.Tensor]],
                    path: Union[str, os.PathLike]) -> None:
    """Write ``{"model": state_dict}`` exactly as the official checkpoints are laid out."""
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    torch.save({"model": {k: v.detach().cpu() for k, v in sd.items()}}, os.fspath(path))


def describe(cfg: SAM2Config) -> str:
    return f"{cfg.name} (image_size={cfg.image_size})"
