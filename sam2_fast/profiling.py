"""Named stages of a tracked frame: NVTX ranges, profiler labels and per-stage timing.

Model code marks its stages with a tiny context manager::

    from sam2_fast.profiling import stage

    with stage("memory_attention"):
        ...

Nothing is recorded unless someone asked for it, so the call costs well under a
microsecond in normal use and nothing at all inside ``torch.compile`` (it returns a
``nullcontext`` while Dynamo traces, so it never causes a graph break):

* NVTX ranges (``nvtx`` package, else ``torch.cuda.nvtx``) when :func:`enable_nvtx` is
  on; Nsight Systems shows them. It is on by default when CUDA is available.
* ``torch.profiler.record_function("stage::<name>")`` labels while
  :func:`profiler_labels` is active, so the profiler's tables and traces group by stage.
* Any :class:`StageListener` pushed with :func:`listening` gets ``enter``/``exit`` calls;
  the benchmark runner uses one to time stages with CUDA events or ``perf_counter``.

The reference implementation does not call :func:`stage`; :func:`instrument` wraps its
methods (or ours, where our code has not adopted :func:`stage` yet) from outside.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Dict, Iterator, List, Optional, Protocol

import torch

# Stages of one tracked frame, in the order they run.
STAGES = ("image_encoder", "memory_attention", "sam_heads", "memory_encoder", "upsampling")
OTHER = "other"  # time between stages (Python bookkeeping, state updates, ...)

# Method name -> stage, tried on the predictor when it is instrumented from outside.
# These are the reference's method names; their bodies hold each stage's whole work
# (e.g. gathering and concatenating the memory bank belongs to memory attention).
METHOD_STAGES: Dict[str, str] = {
    "forward_image": "image_encoder",
    "_prepare_memory_conditioned_features": "memory_attention",
    "_forward_sam_heads": "sam_heads",
    "_encode_new_memory": "memory_encoder",
    "_get_orig_video_res_output": "upsampling",
}
# Fallback: submodule attribute -> stage, used when a method above does not exist.
MODULE_STAGES: Dict[str, str] = {
    "image_encoder": "image_encoder",
    "memory_attention": "memory_attention",
    "sam_mask_decoder": "sam_heads",
    "memory_encoder": "memory_encoder",
}


class StageListener(Protocol):
    def enter(self, name: str) -> None: ...

    def exit(self, name: str) -> None: ...


class _Switches:
    """Process-wide switches; plain attributes so the fast path is one lookup each."""

    nvtx: bool = False
    labels: int = 0  # nesting depth of profiler_labels()
    listeners: List[StageListener] = []


_SW = _Switches()
_NULL = contextlib.nullcontext()


def _nvtx_backend() -> Optional[tuple]:
    try:
        import nvtx  # type: ignore

        return (nvtx.push_range, nvtx.pop_range)
    except Exception:  # noqa: BLE001 - optional dependency, any import failure means "absent"
        pass
    if torch.cuda.is_available():
        return (torch.cuda.nvtx.range_push, lambda: torch.cuda.nvtx.range_pop())
    return None


_NVTX = _nvtx_backend()


def enable_nvtx(on: bool = True) -> bool:
    """Turn NVTX ranges on or off; returns whether they are on (False without a backend)."""
    _SW.nvtx = bool(on) and _NVTX is not None
    return _SW.nvtx


# NVTX ranges cost ~0.1 us when no tool listens; default on where a GPU could be profiled.
enable_nvtx(torch.cuda.is_available() and os.environ.get("SAM2_FAST_NVTX", "1") != "0")


class _Stage:
    __slots__ = ("name", "_label")

    def __init__(self, name: str) -> None:
        self.name = name
        self._label = None

    def __enter__(self) -> "_Stage":
        if _SW.nvtx:
            _NVTX[0](self.name)
        if _SW.labels:
            self._label = torch.profiler.record_function("stage::" + self.name)
            self._label.__enter__()
        for lis in _SW.listeners:
            lis.enter(self.name)
        return self

    def __exit__(self, *exc) -> None:
        for lis in reversed(_SW.listeners):
            lis.exit(self.name)
        if self._label is not None:
            self._label.__exit__(None, None, None)
            self._label = None
        if _SW.nvtx:
            _NVTX[1]()


def stage(name: str):
    """Context manager marking one stage of a frame (see the module docstring)."""
    if torch.compiler.is_compiling():
        return _NULL
    if not (_SW.nvtx or _SW.labels or _SW.listeners):
        return _NULL
    return _Stage(name)


def staged(name: str) -> Callable:
    """Decorator form of :func:`stage` for a method that is one whole stage."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with stage(name):
                return fn(*args, **kwargs)

        return inner

    return wrap


@contextlib.contextmanager
def profiler_labels() -> Iterator[None]:
    """While active, every stage is also a ``torch.profiler.record_function`` range."""
    _SW.labels += 1
    try:
        yield
    finally:
        _SW.labels -= 1


@contextlib.contextmanager
def listening(listener: StageListener) -> Iterator[StageListener]:
    """Send stage enter/exit events to ``listener`` while the block runs."""
    _SW.listeners = _SW.listeners + [listener]
    try:
        yield listener
    finally:
        _SW.listeners = [x for x in _SW.listeners if x is not listener]


@contextlib.contextmanager
def instrument(predictor: torch.nn.Module) -> Iterator[List[str]]:
    """Wrap a predictor's stage methods (or submodules) in :func:`stage` from outside.

    Yields the stages that could be located. Everything is undone on exit. Stages the
    model code already marks itself are harmless to wrap again: listeners ignore a
    re-entry of the stage that is already open.
    """
    found: List[str] = []
    _MISSING = object()
    patched: Dict[str, object] = {}  # method -> what the instance dict held before (or _MISSING)
    hooks = []
    for meth, name in METHOD_STAGES.items():
        bound = getattr(predictor, meth, None)
        if bound is None or not callable(bound):
            continue
        # Someone (e.g. the fast runtime) may have patched the method on the instance already:
        # wrap whatever is in effect, and put exactly that back afterwards.
        patched[meth] = predictor.__dict__.get(meth, _MISSING)
        setattr(predictor, meth, staged(name)(bound))
        found.append(name)
    for attr, name in MODULE_STAGES.items():
        if name in found:
            continue
        mod = getattr(predictor, attr, None)
        if not isinstance(mod, torch.nn.Module):
            continue
        holder: Dict[int, _Stage] = {}

        def pre(m, args, _name=name, _holder=holder):
            ctx = stage(_name)
            _holder[id(m)] = ctx
            ctx.__enter__()

        def post(m, args, out, _holder=holder):
            _holder.pop(id(m)).__exit__(None, None, None)

        hooks.append(mod.register_forward_pre_hook(pre))
        hooks.append(mod.register_forward_hook(post))
        found.append(name)
    try:
        yield found
    finally:
        for meth, before in patched.items():
            if before is _MISSING:
                predictor.__dict__.pop(meth, None)  # the class method shows through again
            else:
                predictor.__dict__[meth] = before
        for h in hooks:
            h.remove()
