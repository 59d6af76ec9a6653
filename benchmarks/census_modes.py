"""The counting half of ``op_census.py``: a ``TorchDispatchMode`` that files every aten op
under the stage open at the time (with its category: compute, cast, copy, cat/pad, factory,
sync, view), a ``TorchFunctionMode`` for Python-level host reads, and the CUDA autocast
policy emulated on a CPU (Python kernels at the AutocastCPU key for every op whose
AutocastCUDA/AutocastCPU registrations differ). See op_census.py for how they are used."""

from __future__ import annotations

import collections
import contextlib
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from sam2_fast.profiling import OTHER

Counts = Dict[str, collections.Counter]  # stage -> op -> calls

CASTS = {"_to_copy", "to", "_autocast_to_reduced_precision", "_autocast_to_full_precision", "type_as"}
COPIES = {"clone", "contiguous", "copy_", "copy"}
FACTORY = {"zeros", "ones", "full", "arange", "zeros_like", "ones_like", "full_like", "fill_", "zero_",
           "scalar_tensor", "linspace", "lift_fresh", "new_zeros", "new_ones", "new_full"}
NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach",
             "detach_", "_local_scalar_dense", "item", "is_nonzero", "sym_size", "sym_stride", "sym_numel", "dim",
             "promote_types", "result_type", "can_cast"}
HOST_ONLY = {"promote_types", "result_type", "can_cast", "sym_size", "sym_stride", "sym_numel", "dim"}
SYNC_OPS = {"item", "_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2",
            "unique_consecutive", "equal", "allclose"}
HOST_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}


def _name(func) -> str:
    return func._schema.name.split("::")[-1]


def category(func, args, out=None) -> str:
    name = _name(func)
    if name in ("to", "contiguous", "type_as") and args and out is args[0]:
        return "view"  # a no-op conversion returns its input: no kernel
    if name == "repeat_interleave":  # syncs only when the repeats are a tensor and no output_size
        tensor_repeats = func._overloadname in ("Tensor", "self_Tensor") and isinstance(args[-1] if
                                                                                     len(args) > 1 else args[0], torch.Tensor)
        return "sync" if tensor_repeats else "cat/pad"
    if name in SYNC_OPS:
        return "sync"
    if name in ("index", "index_put", "index_put_") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_flatten(args)[0][1:]):
        return "sync"  # boolean-mask indexing: nonzero + a device->host read of the count
    if name in CASTS:
        return "cast"
    if name in COPIES:
        return "copy"
    if getattr(func, "is_view", False) or name in ("detach", "detach_", "alias", "_unsafe_view") or name in HOST_ONLY:
        return "view"  # views and dtype queries: host work only
    if name in FACTORY or "empty" in name:
        return "factory"
    if name in ("cat", "stack", "constant_pad_nd", "pad", "repeat", "expand_copy", "roll", "flip"):
        return "cat/pad"
    return "compute"


def _site() -> str:
    """First frame of model code (ours or the reference) on the Python stack."""
    f = sys._getframe(2)
    while f is not None:
        fn = f.f_code.co_filename
        if ("/sam2_fast/" in fn or "/sam2/" in fn) and "profiling.py" not in fn and "/bench/" not in fn:
            cut = fn.rfind("/sam2_fast/") if "/sam2_fast/" in fn else fn.rfind("/sam2/")
            return f"{fn[cut + 1:]}:{f.f_lineno}"
        f = f.f_back
    return "?"


class Census(TorchDispatchMode):
    """Counts aten ops per stage; also a StageListener (see sam2_fast.profiling)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: List[str] = []
        self.frames: List[Tuple[Counts, collections.Counter]] = []
        self.new_frame()

    def new_frame(self) -> None:
        self.counts: Counts = collections.defaultdict(collections.Counter)
        self.sites: collections.Counter = collections.Counter()
        self.wall: collections.Counter = collections.Counter()  # stage -> seconds (exclusive)
        self.in_ops: collections.Counter = collections.Counter()  # stage -> seconds inside aten ops
        self.frames.append((self.counts, self.sites, self.wall, self.in_ops))
        self.t_last = time.perf_counter()

    def _mark(self) -> None:
        t = time.perf_counter()
        self.wall[self.stack[-1] if self.stack else OTHER] += t - self.t_last
        self.t_last = t

    def enter(self, name: str) -> None:
        self._mark()
        self.stack.append(name)

    def exit(self, name: str) -> None:
        self._mark()
        if name in self.stack:
            del self.stack[len(self.stack) - 1 - self.stack[::-1].index(name)]

    def note(self, key: str) -> None:
        self.counts[self.stack[-1] if self.stack else OTHER][key] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.in_ops[self.stack[-1] if self.stack else OTHER] += time.perf_counter() - t0
        cat = category(func, args, out)
        self.note(f"{cat}|{_name(func)}")
        if cat == "sync" or _name(func) == "lift_fresh":
            self.sites[f"{_name(func)} @ {_site()}"] += 1
        return out


class HostReads(TorchFunctionMode):
    """Python-level host reads (item/tolist/bool/cpu/numpy), counted into a Census."""

    def __init__(self, census: Census) -> None:
        super().__init__()
        self.census = census

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS and args and isinstance(args[0], torch.Tensor):
            self.census.note(f"host-read|{name}")
            self.census.sites[f".{name}() @ {_site()}"] += 1
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------- CUDA autocast on a CPU
LOWER = {"einsum", "addmv", "mv", "addr", "chain_matmul", "linalg_multi_dot"}
PROMOTE = {"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
           "tensordot", "scatter_add"}
SET_OPT_DTYPE = {"prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm", "linalg_matrix_norm",
                 "sum"}
_LOW = (torch.bfloat16, torch.float16)


def _registrations(op: str) -> Tuple[Optional[bool], Optional[bool]]:
    cpu = cuda = None
    for line in torch._C._dispatch_dump_table(op).splitlines():
        if line.startswith("AutocastCPU:"):
            cpu = "fallthrough" not in line
        elif line.startswith("AutocastCUDA:"):
            cuda = "fallthrough" not in line
    return cpu, cuda


@contextlib.contextmanager
def cuda_autocast_policy(report: Optional[List[str]] = None):
    """Make CPU autocast cast like CUDA autocast, for every op whose registrations differ."""
    lib = torch.library.Library("aten", "IMPL")
    guard = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
    names = sorted({n.split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("aten::")})
    for base in names:
        short = base.split("::")[1]
        packet = getattr(torch.ops.aten, short, None)
        if packet is None:
            continue
        for ov in packet.overloads():
            full = base if ov == "default" else f"{base}.{ov}"
            cpu, cuda = _registrations(full)
            if cpu is None or cpu == cuda:
                continue
            op = getattr(packet, ov)
            if cpu and not cuda:
                policy = "none"
            elif short in LOWER:
                policy = "lower"
            elif short in PROMOTE:
                policy = "promote"
            elif short in SET_OPT_DTYPE:
                policy = "opt_dtype"
            else:
                policy = "fp32"
            lib.impl(full.split("::")[1], _autocast_kernel(op, policy, guard), "AutocastCPU")
            if report is not None:
                report.append(f"{full}: {policy}")
    try:
        yield
    finally:
        lib._destroy()


def _autocast_kernel(op, policy: str, guard) -> Callable:
    def kernel(*args, **kwargs):
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
        to = None
        if policy == "fp32":
            to = torch.float32
        elif policy == "lower":
            to = torch.get_autocast_dtype("cpu")
        elif policy == "promote" and len({t.dtype for t in tensors}) > 1:
            to = torch.float32
        elif policy == "opt_dtype" and any(a.name == "dtype" for a in op._schema.arguments) \
                and kwargs.get("dtype") is None \
                and any(t.dtype in _LOW for t in tensors):
            kwargs = dict(kwargs, dtype=torch.float32)
        if to is not None:
            def cast(t):
                ok = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != to
                return t.to(to) if ok and (policy != "fp32" or t.dtype in _LOW) else t
            args, kwargs = tree_map(cast, (args, kwargs))
        with torch._C._ExcludeDispatchKeyGuard(guard):
            return op(*args, **kwargs)

    return kernel
