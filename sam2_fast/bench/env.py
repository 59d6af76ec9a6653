"""Where a measurement was taken: card, driver, library versions, commit and date."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from typing import Any, Dict, Optional

import torch


def _git(*args: str) -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _driver() -> Optional[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def card_slug(device: torch.device) -> str:
    """Folder-safe card name: 'cpu', 'nvidia-h100-80gb-hbm3', ..."""
    return re.sub(r"[^a-z0-9]+", "-", card_name(device).lower()).strip("-") or "unknown"


def environment(device: torch.device) -> Dict[str, Any]:
    try:
        import triton  # type: ignore

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional on CPU machines
        triton_version = None
    try:
        import sam2  # type: ignore  # noqa: F401
        from importlib.metadata import version

        ref_version = version("sam2")
    except Exception:  # noqa: BLE001
        ref_version = None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    info: Dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "card": card_name(device),
        "device": str(device),
        "driver": _driver() if device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "sam2_reference": ref_version,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "commit": _git("rev-parse", "--short=12", "HEAD"),
        "commit_dirty": bool(dirty) if dirty is not None else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["sm_count"] = props.multi_processor_count
        info["capability"] = f"{props.major}.{props.minor}"
        info["device_mem_gib"] = round(props.total_memory / 2**30, 1)
    return info


def host_rss_mib() -> float:
    """Resident memory of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0
