"""``sam2-fast download MODEL``: fetch an official checkpoint into the cache.

The file grows as ``NAME.pt.part`` next to its final place; a second run resumes it with an
HTTP range request. It becomes ``NAME.pt`` (an atomic rename) only after its size equals
the server's, its SHA-256 matches ``--sha256`` when given, and its tensors load with
``weights_only=True`` and fit the model's parameter names and shapes exactly. ``--base-url``
(or ``SAM2_FAST_DOWNLOAD_BASE``) points at a mirror of the official layout
(``BASE/092824/sam2.1_hiera_large.pt``): ``http(s)://`` or ``file://``.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from typing import Optional, Tuple

from sam2_fast.commands import outputs as O
from sam2_fast.commands.models import CliError, ModelInfo, cache_dir, resolve_model

CHUNK = 1 << 20
EXAMPLES = """examples:
  sam2-fast download large                 # SAM 2.1 large into the cache (SAM2_FAST_HOME)
  sam2-fast download sam2-tiny --dir checkpoints/
  sam2-fast download tiny --base-url file:///mnt/mirror/segment_anything_2
"""


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="tiny, small, base_plus, large (SAM 2.1), sam2-tiny ... (SAM 2.0), "
                                 "or e.g. sam2.1_hiera_large / facebook/sam2.1-hiera-large")
    p.add_argument("--dir", default=None, help=f"where to put it (default $SAM2_FAST_HOME, else {cache_dir()})")
    p.add_argument("--base-url", default=None, help="a mirror of the official download address")
    p.add_argument("--sha256", default=None, help="expected SHA-256 of the file (checked when given)")
    p.add_argument("--force", action="store_true", help="download again even if the file is there")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server")
    p.add_argument("--no-progress", action="store_true")


def _by_hand(url: str, dest: str) -> str:
    return f"fetch it by hand (e.g. curl -L -o {dest} {url}) and put it at {dest}"


def _open(url: str, have: int, timeout: float, dest: str):
    headers = {"User-Agent": "sam2-fast"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part is already whole (or the server lost it): start over
            return None
        raise CliError(f"download of {url} failed: HTTP {exc.code} {exc.reason}; {_by_hand(url, dest)}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"cannot reach {url} ({reason}); {_by_hand(url, dest)}") from None


def _total(resp, have: int) -> Tuple[int, Optional[int]]:
    """(offset the response starts at, full file size if the server says it)."""
    status = getattr(resp, "status", None)
    if status == 206:
        m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if m and int(m.group(1)) == have:
            return have, None if m.group(2) == "*" else int(m.group(2))
        return -1, None  # a range we did not ask for: start over
    length = resp.headers.get("Content-Length")
    return 0, int(length) if length is not None else None


def fetch(url: str, part: str, dest: str, timeout: float, progress: bool = True) -> int:
    """Download ``url`` into ``part`` (resuming it); returns its final size."""
    from tqdm import tqdm

    for _attempt in range(2):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        resp = _open(url, have, timeout, dest)
        if resp is None:  # 416 on a resume
            os.remove(part)
            continue
        start, total = _total(resp, have)
        if start < 0:
            resp.close()
            os.remove(part)
            continue
        got = start
        bar = tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=os.path.basename(dest),
                   disable=not progress)
        try:
            with resp, open(part, "ab" if start else "wb") as f:
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as exc:
            raise CliError(f"download interrupted after {got} of {total or '?'} bytes ({exc}); run the same "
                           f"command again to resume") from None
        finally:
            bar.close()
        if total is not None and got != total:
            raise CliError(f"download incomplete: {got} of {total} bytes; run the same command again to resume")
        return got
    raise CliError(f"the server at {url} does not resume downloads consistently; delete {part} and retry")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: str, info: ModelInfo) -> None:
    """The file's tensors load safely and are exactly the model's parameters."""
    from sam2_fast.checkpoint import CheckpointError, guess_config, preset_signature, read_state_dict

    try:
        sd = read_state_dict(path)
    except (CheckpointError, OSError) as exc:
        raise CliError(f"{path} is not a usable checkpoint: {exc}") from None
    if tuple(sorted((k, tuple(v.shape)) for k, v in sd.items())) != preset_signature(info.name):
        fits = guess_config(sd)
        raise CliError(f"the file from the server is not a {info.name} checkpoint"
                       + (f" (it fits {fits})" if fits else " (its keys fit no SAM 2 model)"))


def run(args: argparse.Namespace, log=print) -> int:
    info = resolve_model(args.model)
    if info.custom:
        raise CliError(f"{args.model} is your own config: there is no published checkpoint to download")
    folder = O.prepare_out_dir(args.dir or cache_dir())
    dest = os.path.join(folder, info.filename)
    if os.path.isfile(dest) and not args.force:
        verify(dest, info)
        log(f"{info.name} is already at {dest}")
        return 0
    url = info.url(args.base_url)
    part = dest + ".part"
    if args.force and os.path.exists(part):
        os.remove(part)
    size = fetch(url, part, dest, args.timeout, progress=not args.no_progress)
    if args.sha256:
        digest = sha256(part)
        if digest.lower() != args.sha256.strip().lower():
            os.remove(part)  # wrong bytes: resuming them would not help
            raise CliError(f"SHA-256 of the download is {digest}, expected {args.sha256}; removed it")
    try:
        verify(part, info)
    except CliError:
        os.remove(part)
        raise
    os.replace(part, dest)
    log(f"{info.name} ({size / 2**20:.1f} MiB) -> {dest}")
    return 0
