"""Specialise captured launches as Triton does at run time, compile them, read the PTX.

``specialise(launch)`` runs Triton's own argument binder (``create_function_from_signature``
with ``native_specialize_impl``: the function ``JITFunction.run`` uses) on the recorded
arguments, then packs signature / constexprs / attrs the way ``JITFunction._pack_args``
does (written out here because that private method differs between triton 3.6 and 3.8).
``compile_variant(variant, cc)`` compiles one specialisation for one target, with the ptxas
log (``-v``: registers, spills) captured from Triton's own ptxas call, so one compile per
(variant, target) gives shared memory, PTX and spills.

Compiles run in a pool of ``AOT_JOBS`` (default 2) forked workers, each with a fresh
``TRITON_CACHE_DIR`` made for this run: nothing is reused across runs.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Dict, List, Optional, Tuple

import triton
from triton.backends.compiler import GPUTarget

from aot_launches import Launch

# Shared memory per block each card allows (opt-in maximum), bytes.
SMEM_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
TL_NAME = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "uint8": "u8"}


@dataclass
class Variant:
    """One distinct compiled kernel: a specialisation and the cards that launch it."""

    kernel: object
    signature: Dict[str, str]
    constexprs: Dict[tuple, object]
    attrs: Dict[tuple, list]
    options: dict
    dtype_name: str
    cards: set = field(default_factory=set)
    whats: List[str] = field(default_factory=list)
    launches: List[Launch] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__.strip("_")

    def constexpr(self, name: str):
        names = self.kernel.arg_names
        return self.constexprs.get((names.index(name),)) if name in names else None

    def key(self) -> tuple:
        return (self.kernel.fn.__qualname__, tuple(self.signature.items()),
                tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
                tuple(sorted((k, repr(v)) for k, v in self.attrs.items())),
                self.options.get("num_warps"), self.options.get("num_stages"))

    def ident(self) -> str:
        """A short readable id: kernel, dtype, tile constexprs, specialised ints."""
        names = self.kernel.arg_names
        declared = {i for i, p in enumerate(self.kernel.params) if p.is_constexpr}
        tile = "-".join(f"{names[k[0]]}{v}" for k, v in sorted(self.constexprs.items())
                        if k[0] in declared and names[k[0]] != "DOT_PREC")
        ones = ",".join(names[k[0]] for k in sorted(self.constexprs) if k[0] not in declared)
        div = ",".join(names[k[0]] for k in sorted(self.attrs) if self.attrs[k]
                       and not self.signature[names[k[0]]].startswith("*"))
        return (f"{self.name}-{self.dtype_name}-{tile}-w{self.options.get('num_warps')}"
                f"s{self.options.get('num_stages')}" + (f"-one[{ones}]" if ones else "")
                + f"-d16[{div}]")


def _backend(cc: int):
    from triton.compiler import make_backend
    return make_backend(GPUTarget("cuda", cc, 32))


def specialise(launch: Launch) -> Variant:
    """Signature, constexprs and attrs of ``launch`` exactly as ``JITFunction.run`` builds them."""
    from triton.runtime.jit import create_function_from_signature
    fn = launch.kernel
    backend = _backend(90)  # integer / pointer specialisation is the same for every CUDA target
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    bound, spec, _ = binder(*launch.args, **kwargs)
    names = [p.name for p in fn.params]
    signature = {n: s[0] for n, s in zip(names, spec)}
    constexprs, attrs = {}, {}
    for i, (n, s) in enumerate(zip(names, spec)):
        if s[0] == "constexpr":
            constexprs[(i,)] = bound[n]
        elif isinstance(s[1], str):
            attrs[(i,)] = backend.parse_attr(s[1])
    options = {k: v for k, v in kwargs.items() if k not in names}
    return Variant(fn, signature, constexprs, attrs, options, TL_NAME[str(launch.dtype).split(".")[-1]])


def group(launches: List[Launch]) -> List[Variant]:
    """Distinct specialisations, each with the union of the cards that launch it."""
    out: Dict[tuple, Variant] = {}
    for launch in launches:
        v = specialise(launch)
        v = out.setdefault(v.key(), v)
        v.cards.update(launch.cards)
        v.whats.append(launch.what)
        v.launches.append(launch)
    return list(out.values())


def targets(v: Variant) -> Dict[int, int]:
    """{compile target: shared-memory limit it must meet}. sm_80 and sm_90 for every variant
    they launch; the sm_80 compile also answers for sm_86/89 (same code generation, checked
    by ``test_sm86_shares_sm80_codegen``) against the smallest limit of those cards; sm_86 is
    compiled only for variants launched on the small-memory cards alone."""
    small = sorted(c for c in v.cards if c in (80, 86, 89))
    out = {}
    if small:
        out[80 if 80 in small else 86] = min(SMEM_LIMIT[c] for c in small)
    if 90 in v.cards:
        out[90] = SMEM_LIMIT[90]
    return out


# ----------------------------------------------------------------------------- compile
@dataclass
class Compiled:
    shared: int
    ptx: str
    ptxas_log: str
    seconds: float
    error: Optional[str] = None

    @property
    def registers(self) -> int:
        m = re.search(r"Used (\d+) registers", self.ptxas_log)
        return int(m.group(1)) if m else -1

    @property
    def spill_bytes(self) -> Tuple[int, int]:
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", self.ptxas_log)
        if not m:
            raise AssertionError(f"no spill line in the ptxas log:\n{self.ptxas_log}")
        return int(m.group(1)), int(m.group(2))

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.ptx))


def compile_variant(v: Variant, cc: int) -> Compiled:
    """One compile of ``v`` for sm_``cc`` (sm_90 compiles as sm_90a, as on the card)."""
    from triton import knobs
    src = triton.compiler.ASTSource(fn=v.kernel, signature=v.signature, constexprs=v.constexprs,
                                    attrs=v.attrs)
    start = time.perf_counter()
    log = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # Triton runs ptxas -v; this prints its log
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(v.options))
    except Exception as exc:  # noqa: BLE001 - reported as the test failure
        return Compiled(0, "", log.getvalue(), time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
    finally:
        knobs.nvidia.dump_ptxas_log = old
    return Compiled(kernel.metadata.shared, kernel.asm["ptx"], log.getvalue(), time.perf_counter() - start)


_POOL_VARIANTS: List[Variant] = []


def _work(job: Tuple[int, int]) -> Tuple[int, int, Compiled]:
    i, cc = job
    return i, cc, compile_variant(_POOL_VARIANTS[i], cc)


def compile_all(variants: List[Variant], jobs: List[Tuple[int, int]], workers: int,
                ) -> Dict[Tuple[int, int], Compiled]:
    """Compile ``jobs`` ((variant index, cc), longest first) in forked workers."""
    global _POOL_VARIANTS
    _POOL_VARIANTS = variants
    out: Dict[Tuple[int, int], Compiled] = {}
    saved = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="sam2_fast_aot_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: no result carried over from a run
        try:
            if workers <= 1:
                for job in jobs:
                    i, cc, res = _work(job)
                    out[(i, cc)] = res
            else:
                with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
                    for i, cc, res in pool.map(_work, jobs, chunksize=1):
                        out[(i, cc)] = res
        finally:
            if saved is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved
    return out


# ----------------------------------------------------------------------------- PTX facts
MMA_SYNC = r"\bmma\.sync\.aligned\.m16n8k(?:8|16)\.row\.col\.f32\.(?:f16|bf16)"
WGMMA = r"\bwgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.(?:f16|bf16)"
# A global load of one 16-bit element (vector loads carry .v2/.v4 and move >= 4 bytes).
SCALAR_B16_LOAD = r"\bld\.global(?:\.[a-zA-Z0-9_:]+)*?\.(?:b16|u16|s16|f16|bf16)\s"


def scalar_b16_loads(ptx: str) -> List[str]:
    return [m.group(0).strip() for m in re.finditer(SCALAR_B16_LOAD, ptx)
            if not re.search(r"\.v\d", m.group(0))]
