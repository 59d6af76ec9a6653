"""Which implementation runs a kernel slot, chosen by measurement on the user's own card.

A slot ("memory_attention", "window_attention", "mask_upsample") has candidates (our Triton
kernel, PyTorch's SDPA with a forced backend, the plain PyTorch path) that compute the same
function. The first eager call of a (card, versions, dtype, shape bucket) times every
candidate that takes the inputs, checks each against the slot's fp32 reference, keeps the
fastest one that passes, and stores the choice (with the times) in a JSON cache, so later
processes on the same card and versions skip the measurement. Why: on an H200 the Triton
window kernel is 1.3-5.3x faster than SDPA on windowed Hiera blocks but 2.3-3.2x slower on
global blocks, and the upsampling kernel loses at 480p but wins at 1080p (benchmarks/NOTES.md);
no fixed rule is right on every card, and a slower "fast path" is a defect.

Rules:
  * Forced: ``SAM2_FAST_BACKEND_<SLOT>=<candidate>`` (e.g. ``SAM2_FAST_BACKEND_MEMORY_ATTENTION
    =sdpa-efficient``) skips the measurement; an unknown name is an error naming the valid ones;
    a forced candidate that cannot take the inputs falls back to the default with a warning.
  * Never measured inside CUDA-graph capture or while torch.compile traces: there the cached
    choice, else the slot's static default, runs (warm up eagerly first).
  * Off CUDA nothing is measured: the slot's CPU candidate runs (the PyTorch path, or the
    Triton kernel under the interpreter when a test forces kernels).
  * Numerics: a candidate passes when its error against the fp32 reference is at most twice
    that of the plain PyTorch candidate in the same dtype (the bar the kernel tests use), so
    a fast but wrong backend is never kept; slots with integer outputs (``exact``: connected
    components) pass only when equal to the reference.
Cache: ``$SAM2_FAST_CACHE_DIR/backend_choices.json`` (default ``~/.cache/sam2_fast``),
written atomically (temporary file + rename); an unreadable cache is ignored, not fatal.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

ENV_PREFIX = "SAM2_FAST_BACKEND_"
ENV_CACHE_DIR = "SAM2_FAST_CACHE_DIR"
# Numerics bar: at most this many times the plain PyTorch candidate's own error.
ERROR_FACTOR = 2.0
# Timed repetitions per candidate (median of CUDA-event timings) after WARMUP calls.
REPEATS, WARMUP = 10, 3


@dataclass(frozen=True)
class Candidate:
    """One implementation of a slot: ``run(*args)`` and why it cannot take them (None = it can)."""

    name: str
    run: Callable[..., object]
    unsupported: Callable[..., Optional[str]] = lambda *args: None


@dataclass(frozen=True)
class Slot:
    """A kernel slot: candidates, the fp32 reference, how calls are bucketed, the defaults.

    bucket(*args) -> tuple of ints/strings: calls in one bucket share a choice (shapes that
    matter for speed, dtype). default(*args) -> candidate name when nothing is measured (on
    CUDA inside capture/compile); cpu(*args) -> candidate name off CUDA. baseline: the plain
    PyTorch candidate whose own error sets the numerics bar.
    """

    name: str
    candidates: Tuple[Candidate, ...]
    reference: Callable[..., torch.Tensor]
    bucket: Callable[..., tuple]
    default: Callable[..., str]
    cpu: Callable[..., str]
    baseline: str
    first_output: Callable[[object], torch.Tensor] = lambda out: out  # the tensor to compare
    exact: bool = False  # integer outputs (labels): a candidate passes only if equal to the reference

    def candidate(self, name: str) -> Candidate:
        for c in self.candidates:
            if c.name == name:
                return c
        raise ValueError(f"{self.name}: unknown backend {name!r}; valid: {[c.name for c in self.candidates]}")


@dataclass
class _State:
    choices: Dict[str, dict] = field(default_factory=dict)  # key -> {"choice", "times_us", "errors"}
    loaded: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


_STATE = _State()


def cache_path() -> str:
    root = os.environ.get(ENV_CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "sam2_fast")
    return os.path.join(root, "backend_choices.json")


@functools.lru_cache(maxsize=None)
def _versions() -> str:
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional
        tv = "none"
    return f"torch{torch.__version__}|triton{tv}"


def _card(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return _cuda_card_name(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_card_name(index: int) -> str:
    """Asked once per device: the key is built on every call (host time, issue 8 item 8)."""
    props = torch.cuda.get_device_properties(index)
    return f"{props.name}|sm{props.major}{props.minor}|{props.multi_processor_count}sm"


def key_for(slot: Slot, device: torch.device, *args) -> str:
    return "|".join([slot.name, _card(device), _versions()] + [str(x) for x in slot.bucket(*args)])


def _load() -> None:
    if _STATE.loaded:
        return
    _STATE.loaded = True
    try:
        with open(cache_path()) as fh:
            data = json.load(fh)
        if isinstance(data, dict):
            _STATE.choices.update({k: v for k, v in data.items() if isinstance(v, dict) and "choice" in v})
    except (OSError, ValueError):
        pass  # no cache yet, or unreadable: measure again


def _save() -> None:
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".backend_choices.", dir=os.path.dirname(path))
        with os.fdopen(fd, "w") as fh:
            json.dump(_STATE.choices, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not break inference
        warnings.warn(f"sam2_fast: could not write the backend cache {path}: {exc}", stacklevel=3)


def choices() -> Dict[str, dict]:
    """Every choice made or loaded in this process: key -> {choice, times_us, errors}."""
    _load()
    return {k: dict(v) for k, v in _STATE.choices.items()}


def reset(forget_file: bool = False) -> None:
    """Forget in-process choices (tests); ``forget_file`` also deletes the cache file."""
    with _STATE.lock:
        _STATE.choices.clear()
        _STATE.loaded = False
        if forget_file:
            try:
                os.remove(cache_path())
            except OSError:
                pass


def _forced(slot: Slot) -> Optional[str]:
    name = os.environ.get(ENV_PREFIX + slot.name.upper(), "").strip()
    if not name:
        return None
    slot.candidate(name)  # raises on an unknown name
    return name


def _timer(fn: Callable[[], object]) -> float:
    """Median microseconds of ``fn`` with CUDA events (tests replace this off the GPU)."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def measure(slot: Slot, *args, timer: Optional[Callable] = None) -> dict:
    """Time and check every candidate that takes ``args``: {"times_us", "errors", "choice"}."""
    timer = timer or _timer
    ref = slot.reference(*args)
    errors, times, skipped = {}, {}, {}
    for c in slot.candidates:
        reason = c.unsupported(*args)
        if reason:
            skipped[c.name] = reason
            continue
        try:
            got = slot.first_output(c.run(*args))
            errors[c.name] = (0.0 if torch.equal(got, ref) else float("inf")) if slot.exact else _rel(got, ref)
            times[c.name] = timer(lambda c=c: c.run(*args))
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run is skipped, named
            skipped[c.name] = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:120]}"
    bar = ERROR_FACTOR * max(errors.get(slot.baseline, 0.0), 1e-6)
    ok = {n: t for n, t in times.items() if errors[n] <= bar}
    choice = min(ok, key=ok.get) if ok else slot.baseline
    return {"choice": choice, "times_us": times, "errors": errors, "error_bar": bar, "skipped": skipped}


def _capturing(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def choose(slot: Slot, device: torch.device, *args) -> Candidate:
    """The candidate that runs this call (see the module docstring for the rules)."""
    forced = _forced(slot)
    if forced is not None:
        cand = slot.candidate(forced)
        reason = cand.unsupported(*args)
        if reason is None:
            return cand
        warnings.warn(f"{ENV_PREFIX}{slot.name.upper()}={forced} cannot take this call ({reason}); "
                      f"using {slot.default(*args)}", stacklevel=3)
        return slot.candidate(slot.default(*args))
    if device.type != "cuda":
        return slot.candidate(slot.cpu(*args))
    _load()
    key = key_for(slot, device, *args)
    entry = _STATE.choices.get(key)
    if entry is None and not _capturing(device):
        with _STATE.lock:
            entry = _STATE.choices.get(key)
            if entry is None:
                entry = measure(slot, *args)
                _STATE.choices[key] = entry
                _save()
    name = entry["choice"] if entry is not None else slot.default(*args)
    try:
        cand = slot.candidate(name)
    except ValueError:  # a cache from another version of this package
        cand = slot.candidate(slot.default(*args))
    if cand.unsupported(*args) is not None:
        cand = slot.candidate(slot.baseline)
    return cand


def run(slot: Slot, *args):
    """Run ``args`` through the chosen candidate of ``slot``."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    return choose(slot, device, *args).run(*args)
