"""Ahead-of-time GPU compile of every kernel launch SAM 2 makes (no GPU needed).

What is compiled is captured, not written out by hand: each launcher is called at SAM 2
shapes with meta tensors and its kernel replaced by a recorder (``aot_launches.py``), and
Triton's own binder specialises the recorded arguments (``aot_compile.py``): 16-byte
aligned pointers and integers divisible by 16 get ``tt.divisibility`` 16, integers equal
to 1 become constexpr 1 (unless the kernel lists them in ``do_not_specialize``). So each
distinct specialisation the runtime would compile is compiled here, once per target:
sm_80 and sm_90 (as sm_90a) for every variant those cards launch, sm_86 only for variants
launched on the small-shared-memory cards alone (the sm_80 compile answers for sm_86/89:
same code generation, ``test_sm86_shares_sm80_codegen``).

Checks, per compiled variant:
  * shared memory within the card's limit (every variant);
  * 16-bit variants: tensor-core instructions in the PTX (``mma.sync`` on sm_80,
    ``wgmma`` on sm_90 where the tile allows it: BLOCK_M >= 64), zero register spills in the
    ptxas log (Triton's own ``ptxas -v``), and for the memory kernels no scalar 16-bit
    global loads (``ld.global.b16``). Known failures are xfails with the measured reason
    (``known_failure``); strict ones turn into a failure to remove once fixed.

Run WITHOUT TRITON_INTERPRET (with it, @triton.jit gives interpreted functions):
    env -u TRITON_INTERPRET .venv/bin/python -m pytest -q tests/kernels -m aot
and under triton 3.6 (the lent GPU machines) with scripts/triton36_venv.sh. AOT_JOBS sets
the number of compile processes (default 2). Every run compiles from scratch into a fresh
TRITON_CACHE_DIR.
"""

from __future__ import annotations

import os
import resource
import time

import pytest
import torch

pytestmark = [
    pytest.mark.aot,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="AOT compile needs a process without TRITON_INTERPRET"),
]

if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    import aot_compile as C  # noqa: E402
    import aot_launches as L  # noqa: E402

    VARIANTS = C.group(L.all_launches())
    JOBS = sorted(((i, cc) for i, v in enumerate(VARIANTS) for cc in C.targets(v)),
                  key=lambda j: VARIANTS[j[0]].name.startswith("vspace_attn"), reverse=True)
    # One 16-bit variant per dot kernel, also compiled for sm_86 (test_sm86_shares_sm80_codegen).
    SM86_SAMPLES = {k: next(i for i, v in enumerate(VARIANTS) if v.name == k and v.dtype_name != "fp32"
                            and 80 in C.targets(v))
                    for k in ("window_attn_kernel", "vspace_attn_kernel")}
else:  # collected in the interpreter pass, then skipped
    VARIANTS, JOBS, SM86_SAMPLES = [], [], {}

DOT_KERNELS = ("window_attn_kernel", "vspace_attn_kernel")
try:  # ptxas differs between triton releases: 3.6 (the lent GPUs) spills a little more
    import triton as _triton
    _TRITON_36 = _triton.__version__.startswith("3.6")
except Exception:  # noqa: BLE001
    _TRITON_36 = False
MEMORY_KERNELS = ("vspace_attn_kernel",)


def known_failure(v, check: str, cc: int):
    """(reason, strict) for a variant measured to fail ``check`` (commit 499c2fc, triton 3.8),
    else None. Strict: a fix makes the test fail until the entry is removed. Spill counts move
    with the ptxas version (triton 3.6 bundles another), so spill entries are not strict."""
    tile = {n: v.constexpr(n) for n in ("D", "DV", "BLOCK_M")}
    return None


@pytest.fixture(scope="session")
def compiled(request):
    """One compile per (variant, target) that a selected test reads (all of them in a full run)."""
    wanted = set()
    for item in request.session.items:
        params = getattr(item, "callspec", None) and item.callspec.params
        if params and "i" in params:
            wanted.add((params["i"], params["cc"]))
        elif params and params.get("kernel") in SM86_SAMPLES:
            wanted |= {(SM86_SAMPLES[params["kernel"]], 80), (SM86_SAMPLES[params["kernel"]], 86)}
    jobs = [j for j in JOBS + [(i, 86) for i in SM86_SAMPLES.values()] if j in wanted]
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = C.compile_all(VARIANTS, jobs, int(os.environ.get("AOT_JOBS", "2")))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(r.seconds for r in out.values())
    # CPU seconds of the compile workers and their ptxas runs: on a shared machine the wall
    # time follows the load; this (/ AOT_JOBS) is what an idle machine would take
    used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    print(f"\nAOT: {len(VARIANTS)} variants, {len(jobs)} compiles in {wall:.0f} s wall "
          f"({cpu:.0f} s of compile time, {used:.0f} CPU s in the workers)")
    rows = {}
    for (i, cc), r in out.items():
        key = (VARIANTS[i].name, VARIANTS[i].dtype_name, cc)
        n, secs, regs, spill = rows.get(key, (0, 0.0, 0, 0))
        st = r.spill_bytes[0] if r.error is None else -1
        rows[key] = (n + 1, secs + r.seconds, max(regs, r.registers), max(spill, st))
    for (name, dt, cc), (n, secs, regs, spill) in sorted(rows.items()):
        print(f"  {name:26s} {dt} sm_{cc}: {n:3d} compiles {secs:6.1f} s, max {regs} registers, "
              f"max {spill} B spill stores")
    return out


def _params(check: str):
    out = []
    for i, cc in JOBS:
        v = VARIANTS[i]
        if check in ("tensor_cores", "spills", "b16"):
            if v.dtype_name == "fp32":
                continue
            if check == "tensor_cores" and v.name not in DOT_KERNELS:
                continue
            if check == "b16" and v.name not in MEMORY_KERNELS:
                continue
        marks = []
        known = known_failure(v, check, cc)
        if known:
            marks.append(pytest.mark.xfail(reason=known[0], strict=known[1]))
        out.append(pytest.param(i, cc, id=f"{v.ident()}-sm{cc}", marks=marks))
    return out


def _result(compiled, i, cc):
    res = compiled[(i, cc)]
    v = VARIANTS[i]
    assert res.error is None, f"{v.ident()} does not compile for sm_{cc} ({v.whats[0]}): {res.error}"
    return v, res


@pytest.mark.parametrize("i,cc", _params("shared"))
def test_shared_memory_within_card_limit(compiled, i, cc):
    v, res = _result(compiled, i, cc)
    limit = C.targets(v)[cc]
    assert res.shared <= limit, (f"{v.ident()} needs {res.shared} B of shared memory on sm_{cc}; "
                                 f"cards {sorted(v.cards)} allow {limit} ({v.whats[0]})")


def _wgmma_possible(v) -> bool:
    # wgmma: one warpgroup (4 warps) computes 64 rows of the tile.
    return v.constexpr("BLOCK_M") >= 64 and v.options.get("num_warps", 4) % 4 == 0


@pytest.mark.parametrize("i,cc", _params("tensor_cores"))
def test_16bit_dots_use_tensor_cores(compiled, i, cc):
    v, res = _result(compiled, i, cc)
    mma, wgmma = res.count(C.MMA_SYNC), res.count(C.WGMMA)
    if cc >= 90 and _wgmma_possible(v):
        assert wgmma > 0, f"{v.ident()} sm_{cc}: no wgmma in the PTX ({mma} mma.sync)"
    else:
        assert mma + wgmma > 0, f"{v.ident()} sm_{cc}: no tensor-core instruction in the PTX"


@pytest.mark.parametrize("i,cc", _params("spills"))
def test_16bit_variants_do_not_spill(compiled, i, cc):
    v, res = _result(compiled, i, cc)
    stores, loads = res.spill_bytes
    assert stores == loads == 0, (f"{v.ident()} sm_{cc}: {stores} B spill stores, {loads} B spill "
                                  f"loads at {res.registers} registers")


@pytest.mark.parametrize("i,cc", _params("b16"))
def test_memory_kernels_have_no_scalar_16bit_loads(compiled, i, cc):
    v, res = _result(compiled, i, cc)
    loads = C.scalar_b16_loads(res.ptx)
    assert not loads, f"{v.ident()} sm_{cc}: {len(loads)} scalar 16-bit global loads, e.g. {loads[0]}"


# ----------------------------------------------------------------------------- the capture itself
def _declared(v) -> tuple:
    names = v.kernel.arg_names
    return tuple(sorted((names[k[0]], v.constexprs[k]) for k in v.constexprs
                        if v.kernel.params[k[0]].is_constexpr))


def test_launches_cover_every_listed_config():
    """The launchers' captured launches and their modules' ``all_configs()`` agree: every
    listed (dtype, tile) is launched at some SAM 2 shape and every launch uses a listed tile
    (num_warps included; num_stages where the launch passes it)."""
    from sam2_fast.config import PRESETS
    from sam2_fast.kernels import connected_components as ccm
    from sam2_fast.kernels import mask_upsample as mu
    from sam2_fast.kernels import vspace_attention as vs
    from sam2_fast.kernels import window_attention as wa

    head_dims = sorted({c // int(t.num_heads * t.head_mul**i) for t in (p.trunk for p in PRESETS.values())
                        for i, c in enumerate(t.stage_dims)})
    listed = {
        "window_attn_kernel": [(dt, c, cfg) for dt, c, cfg, _ in wa.all_configs(head_dims)],
        "vspace_attn_kernel": [(dt, c, cfg) for kind, dt, c, cfg, _ in vs.all_configs() if kind == "attn"],
        "vspace_merge_kernel": [(dt, c, cfg) for kind, dt, c, cfg, _ in vs.all_configs() if kind == "merge"],
        "upsample_threshold_kernel": list(mu.all_configs()),
        "cc_kernel": [(torch.uint8, c, cfg) for c, cfg in ccm.all_configs()],
    }
    want = {(k, C.TL_NAME[str(dt).split(".")[-1]], tuple(sorted(c.items())), cfg.num_warps)
            for k, items in listed.items() for dt, c, cfg in items}
    got = {(v.name, v.dtype_name, _declared(v), v.options.get("num_warps", 4)) for v in VARIANTS}
    assert not (want - got), f"listed by all_configs() but never launched: {sorted(want - got)}"
    assert not (got - want), f"launched with a tile all_configs() does not list: {sorted(got - want)}"
    staged = {w + (cfg.num_stages,) for k, items in listed.items() for dt, c, cfg in items
              for w in [(k, C.TL_NAME[str(dt).split(".")[-1]], tuple(sorted(c.items())), cfg.num_warps)]}
    for v in VARIANTS:
        if "num_stages" in v.options:
            key = (v.name, v.dtype_name, _declared(v), v.options.get("num_warps", 4), v.options["num_stages"])
            assert key in staged, f"{v.ident()}: num_stages {v.options['num_stages']} not listed"


def test_capture_sees_runtime_specialisation():
    """Integers equal to 1 are constexpr, multiples of 16 carry divisibility, views keep
    their alignment, except the arguments a kernel lists in ``do_not_specialize`` (per-call
    counts and geometry that feed no vector access): as on the card."""
    window = [v for v in VARIANTS if v.name == "window_attn_kernel"]
    names = window[0].kernel.arg_names
    ones = {names[k[0]] for v in window for k in v.constexprs if not v.kernel.params[k[0]].is_constexpr}
    assert ones == {"pool"}, ones  # geometry, window counts, heads: do_not_specialize
    div = {names[k[0]] for v in window for k, a in v.attrs.items() if a}
    assert {"qkv_ptr", "C", "s_qkv_h", "s_qkv_w"} <= div and not div & {"H", "W", "n_win"}, div
    up = [v for v in VARIANTS if v.name == "upsample_threshold_kernel"]
    names = up[0].kernel.arg_names
    assert all(v.signature["H"] == "i32" and v.signature["C"] == "i32" for v in up)
    assert any(v.attrs.get((names.index("W"),)) for v in up)  # 1280, 1920: 16-byte rows
    # vspace: n_splits and Nk are do_not_specialize, so 1 and 8 splits, 4100 and 28,736 keys
    # share one variant; the strides keep their divisibility (16-byte vector loads)
    vsp = [v for v in VARIANTS if v.name == "vspace_attn_kernel"]
    assert all(v.signature["n_splits"] == "i32" and v.signature["Nk"] == "i32" for v in vsp)
    names = vsp[0].kernel.arg_names
    assert all(not v.attrs.get((names.index("Nk"),)) for v in vsp)
    assert all(v.attrs.get((names.index("s_kt"),)) for v in vsp)


def _vspace_attn_jobs():
    return [pytest.param(i, cc, id=f"{VARIANTS[i].ident()}-sm{cc}") for i, cc in JOBS
            if VARIANTS[i].name == "vspace_attn_kernel"]


@pytest.mark.parametrize("i,cc", _vspace_attn_jobs())
def test_vspace_occupancy_is_documented(compiled, i, cc):
    """Split-KV sizes its waves with ``vs.PROGRAMS_PER_SM``: it must be what the compiled
    kernel's shared memory and registers allow on every card that launches it."""
    from sam2_fast.kernels import vspace_attention as vs
    from sam2_fast.kernels._common import ctas_per_sm
    v, res = _result(compiled, i, cc)
    for card in sorted(v.cards):
        got = ctas_per_sm(res.shared, res.registers, v.options.get("num_warps", 4), divmod(card, 10))
        assert got == vs.PROGRAMS_PER_SM, (f"{v.ident()} on sm_{card}: {got} resident programs per SM "
                                           f"({res.shared} B shared, {res.registers} registers), "
                                           f"PROGRAMS_PER_SM = {vs.PROGRAMS_PER_SM}")


@pytest.mark.parametrize("kernel", ["window_attn_kernel", "vspace_attn_kernel"])
def test_sm86_shares_sm80_codegen(compiled, kernel):
    """The sm_80 compile stands for sm_86/89 in the shared-memory check: same shared memory
    (one sample 16-bit variant per kernel, compiled for sm_86 here). Registers are not
    compared: ptxas allocates per target (measured 166 on sm_80 vs 156 on sm_86, vspace)."""
    idx = SM86_SAMPLES[kernel]
    ours, base = compiled[(idx, 86)], compiled[(idx, 80)]
    assert ours.error is None and base.error is None
    assert ours.shared == base.shared, f"{VARIANTS[idx].ident()}: sm_86 {ours.shared} B, sm_80 {base.shared} B"
