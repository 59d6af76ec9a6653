"""Every candidate of each kernel slot at SAM 2's real shapes, on the card at hand.

    python benchmarks/kernel_candidates.py --out DIR [--budget S] [--quick]

For each slot (memory cross-attention in the 256-d and in the 64-d value space, memory
self-attention, Hiera window attention, mask upsampling, connected components) it times every
implementation that can run (our Triton kernels with their tile configs; SDPA forced to flash,
cuDNN, memory-efficient, math; the default dispatch; the torch loop), checks each against an
fp32/fp64 reference (relative error, NaN never passes), and prints one row per candidate:
median us, TFLOP/s of the candidate's own FLOPs, "ref-equivalent" TFLOP/s (the reference formulation's FLOPs
over this time, so value-space rows compare directly with 256-d rows), error, and for
Triton rows the compiled kernel's registers / spills / shared memory and whether it uses
wgmma/mma. Also measures the card's two ceilings (bf16 8192^3 matmul, device copy).
Writes DIR/kernel_candidates.json and .txt. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as _bench_kernels  # noqa: E402  (shares its case lists)

ROWS: List[Dict] = []
# --smoke (CPU, TRITON_INTERPRET=1): shapes divided by SCALE, fp16 for bf16, one timed call;
# checks this script's plumbing before a GPU lease, says nothing about speed.
DEV = "cuda"
SCALE = 1
LOW = torch.bfloat16
T0 = time.time()
BUDGET = [600.0]

SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def _bench(fn: Callable[[], object]) -> float:
    """Median milliseconds (CUDA events via triton.testing.do_bench)."""
    if DEV != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def triton_stats(jitfns) -> Dict[str, object]:
    """Registers / spills / shared / tensor-core use of every compiled variant of the kernels."""
    out = {}
    for jf in jitfns:
        caches = getattr(jf, "device_caches", None) or {}
        for entry in caches.values():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for ck in list(cache.values()):
                try:
                    ptx = ck.asm.get("ptx", "")
                    out[f"{jf.__name__}#{len(out)}"] = {
                        "regs": getattr(ck, "n_regs", None), "spills": getattr(ck, "n_spills", None),
                        "shared": ck.metadata.shared, "warps": ck.metadata.num_warps,
                        "stages": ck.metadata.num_stages, "wgmma": ptx.count("wgmma.mma_async"),
                        "mma": ptx.count("mma.sync"), "ld_v4": ptx.count("ld.global.v4"),
                        "ld_b16": ptx.count("ld.global.b16"), "cp_async": ptx.count("cp.async."),
                    }
                except Exception as exc:  # noqa: BLE001 - statistics are best effort
                    out[f"{jf.__name__}#{len(out)}"] = {"error": repr(exc)}
    return out


def row(slot: str, case: str, cand: str, fn: Optional[Callable], flops: float, ref_flops: float,
        golden: Optional[torch.Tensor], bytes_: float = 0.0, jitfns=()) -> None:
    if time.time() - T0 > BUDGET[0]:
        ROWS.append(dict(slot=slot, case=case, cand=cand, status="skipped: time budget"))
        _print(ROWS[-1])
        return
    rec = dict(slot=slot, case=case, cand=cand)
    try:
        out = fn()
        _sync()
        if golden is not None and out.shape[0] > golden.shape[0]:
            out = out[: golden.shape[0]]  # goldens hold batch element 0 only (memory)
        rec["err"] = rel(out, golden) if golden is not None else None
        ms = _bench(fn)
        rec.update(status="ok", us=ms * 1e3, tflops=flops / ms / 1e9 if flops else None,
                   ref_tflops=ref_flops / ms / 1e9 if ref_flops else None,
                   gbs=bytes_ / ms / 1e6 if bytes_ else None)
        if jitfns:
            rec["compiled"] = triton_stats(jitfns)
    except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is a row, not a crash
        rec.update(status=f"error: {exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}")
    ROWS.append(rec)
    _print(rec)


def _print(r: Dict) -> None:
    if r.get("status") != "ok":
        print(f"{r['slot']:<14} {r['case']:<16} {r['cand']:<28} {r['status']}", flush=True)
        return
    f = lambda x, p=1: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    err = "-" if r.get("err") is None else f"{r['err']:.1e}"
    print(f"{r['slot']:<14} {r['case']:<16} {r['cand']:<28} {f(r['us'])} us  {f(r.get('tflops'))} TF/s "
          f"ref-eq {f(r.get('ref_tflops'))} TF/s  {f(r.get('gbs'), 0)} GB/s  err {err}", flush=True)


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def ceilings() -> Dict[str, float]:
    n = 8192 // SCALE
    a = torch.randn(n, n, device=DEV, dtype=LOW)
    b = torch.randn_like(a)
    ms = _bench(lambda: a @ b)
    x = torch.randn((1 << 30) // SCALE**3, device=DEV, dtype=LOW)  # 2 GiB on the GPU
    y = torch.empty_like(x)
    ms_copy = _bench(lambda: y.copy_(x))
    out = {"matmul_bf16_tflops": 2 * n**3 / ms / 1e9, "copy_tbs": 2 * x.numel() * 2 / ms / 1e9}
    print(f"ceilings: bf16 matmul {out['matmul_bf16_tflops']:.0f} TFLOP/s, copy {out['copy_tbs']:.2f} TB/s", flush=True)
    del a, b, x, y
    return out


def memory_cross(batch: int, quick: bool) -> None:
    from sam2_fast.kernels import vspace_attention as va
    nq, hw, slots, ptr, d, dv = 4096 // SCALE**2, 4096 // SCALE**2, 7, 64, 256, 64
    nk = slots * hw + ptr
    case = f"tiny-full-b{batch}"
    g = torch.Generator(device=DEV).manual_seed(batch)
    q = torch.randn(batch, nq, d, device=DEV, generator=g).to(LOW)
    k = torch.randn(batch, nk, d, device=DEV, generator=g).to(LOW)
    v64 = torch.randn(batch, nk, dv, device=DEV, generator=g).to(LOW)
    v256 = torch.randn(batch, nk, d, device=DEV, generator=g).to(LOW)
    ref_flops = 4.0 * batch * nq * nk * d  # the reference: QK + PV at d_v 256
    vs_flops = 2.0 * batch * nq * nk * (d + dv)
    # Goldens: fp32 math on the first batch element only (memory), compared on that element.
    with sdpa_kernel(SDPBackend.MATH):
        g64 = F.scaled_dot_product_attention(q[:1].float(), k[:1].float(), v64[:1].float())
        g256 = F.scaled_dot_product_attention(q[:1].float(), k[:1].float(), v256[:1].float())
    for name, be in SDPA_BACKENDS.items():
        def run(be=be):
            with sdpa_kernel(be):
                return sdpa4(q, k, v256)
        row("mem-cross-256", case, name, (run), ref_flops, ref_flops, g256)
    for name, be in SDPA_BACKENDS.items():
        def run(be=be):
            with sdpa_kernel(be):
                return sdpa4(q, k, v64)
        row("mem-cross-64", case, name, (run), vs_flops, ref_flops, g64)
    row("mem-cross-64", case, "triton-vspace",
        (lambda: va.vspace_attention_triton(q, k, v64)), vs_flops, ref_flops, g64,
        jitfns=(va._vspace_attn_kernel, va._vspace_merge_kernel))
    configs = [] if quick else [va.LaunchConfig(128, 64, 8, 2), va.LaunchConfig(128, 128, 8, 2),
                                va.LaunchConfig(64, 64, 4, 3), va.LaunchConfig(128, 32, 8, 4),
                                va.LaunchConfig(64, 128, 4, 2)]
    # split-KV sweep around choose_splits' pick (8 on an H200 at 1 object; the first run's
    # 4-vs-8 rows were confounded by a per-call copy of the key ranges, fixed since)
    variants = [(cfg, None) for cfg in configs] + ([] if quick else [(None, s) for s in (1, 2, 4, 6, 8, 12, 16)])
    for cfg, splits in variants:
        label = "default" if cfg is None else f"{cfg.block_m}x{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}"
        row("mem-cross-64", case, f"triton-vs-{label}-sp{splits or 'auto'}",
            lambda cfg=cfg, splits=splits: va.vspace_attention_triton(q, k, v64, config=cfg, num_splits=splits),
            vs_flops, ref_flops, g64, jitfns=(va._vspace_attn_kernel,))
    row("mem-cross-256", case, "triton-vspace-dv256",
        (lambda: va.vspace_attention_triton(q, k, v256)), ref_flops, ref_flops, g256,
        jitfns=(va._vspace_attn_kernel,))
    # The static bank today: a boolean key mask (rules out flash) over 8 slots + 16 pointer slots.
    rng = torch.tensor([[0, slots * hw, slots * hw, nk]] * batch, dtype=torch.int32, device=DEV)
    mask = va.ranges_mask(rng, nk)
    row("mem-cross-64", case, "sdpa-mask-efficient(bank)",
        (lambda: _sdpa(q, k, v64, mask, SDPBackend.EFFICIENT_ATTENTION)), vs_flops, ref_flops, g64)
    row("mem-cross-256", case, "sdpa-mask-default(bank)",
        (lambda: sdpa4(q, k, v256, mask)), ref_flops, ref_flops, g256)
    row("mem-cross-64", case, "triton-vspace-ranges(bank)",
        (lambda: va.vspace_attention_triton(q, k, v64, rng)), vs_flops, ref_flops, g64)


def sdpa4(q, k, v, mask=None):
    """SDPA on (B, N, D) tensors through the (B, heads=1, N, D) layout: the fused CUDA
    backends (flash, cuDNN, memory-efficient) refuse 3-D inputs and PyTorch would quietly
    fall back to the math backend (what the first H200 run measured by mistake)."""
    m = None if mask is None else mask[:, None]  # (B, 1, Nk) -> (B, 1, 1, Nk)
    return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=m)[:, 0]


def _sdpa(q, k, v, mask, be):
    with sdpa_kernel(be):
        return sdpa4(q, k, v, mask)


def memory_layer(batch: int) -> None:
    """One whole cross-attention layer per frame: the reference's formulation (project k and v
    of every memory token, rotate q and k, SDPA, out_proj) against the value-space one (rotate
    q; keys projected+rotated once per memory and cached; attend over the raw 64-d memory;
    one fused 64->256 output matrix). Same weights; error of the layer output."""
    from sam2_fast.kernels import vspace_attention as va
    from sam2_fast.modeling.rope import axial_rope_table, rotate_pairs
    nq, hw, slots, ptr, d, dm = 4096 // SCALE**2, 4096 // SCALE**2, 7, 64, 256, 64
    nk = slots * hw + ptr
    case = f"tiny-full-b{batch}"
    mk = lambda *s, sc=1.0: (torch.randn(*s, device=DEV) * sc).to(LOW)  # noqa: E731
    tgt, mem, pos = mk(batch, nq, d), mk(batch, nk, dm), mk(batch, nk, dm)
    wq, wk, wv, wo = (mk(d, d if i in (0, 3) else dm, sc=(d if i in (0, 3) else dm) ** -0.5) for i in range(4))
    bq, bk, bv, bo = (mk(d, sc=0.1) for _ in range(4))
    side = int(math.isqrt(nq))
    cos, sin = axial_rope_table(d, side, side, device=DEV)
    cos_k = cos.repeat(slots, 1)
    sin_k = sin.repeat(slots, 1)
    n_sp = slots * hw

    def rot_k(k):
        return torch.cat([rotate_pairs(k[:, :n_sp], cos_k, sin_k), k[:, n_sp:]], 1)

    def reference():
        q = rotate_pairs(F.linear(tgt, wq, bq), cos, sin)
        k = rot_k(F.linear(mem + pos, wk, bk))
        v = F.linear(mem, wv, bv)
        return F.linear(sdpa4(q, k, v), wo, bo)

    k_cached = rot_k(F.linear(mem + pos, wk, bk)).contiguous()  # written once per memory frame
    w_ov = (wo.float() @ wv.float()).to(LOW)
    b_ov = (wo.float() @ bv.float() + bo.float()).to(LOW)

    def vspace(attend):
        q = rotate_pairs(F.linear(tgt, wq, bq), cos, sin)
        return F.linear(attend(q, k_cached, mem), w_ov, b_ov)

    def vspace_nocache(attend):
        q = rotate_pairs(F.linear(tgt, wq, bq), cos, sin)
        k = rot_k(F.linear(mem + pos, wk, bk))
        return F.linear(attend(q, k, mem), w_ov, b_ov)

    with torch.no_grad():
        f32 = lambda t: t.float()  # noqa: E731
        q = rotate_pairs(F.linear(f32(tgt), f32(wq), f32(bq)), cos, sin)
        k = torch.cat([rotate_pairs(F.linear(f32(mem + pos), f32(wk), f32(bk))[:, :n_sp], cos_k, sin_k),
                       F.linear(f32(mem + pos), f32(wk), f32(bk))[:, n_sp:]], 1)
        with sdpa_kernel(SDPBackend.MATH):
            gold = F.linear(F.scaled_dot_product_attention(q[:1], k[:1], F.linear(f32(mem), f32(wv), f32(bv))[:1]),
                            f32(wo), f32(bo))
    proj = 2.0 * batch * (nq * d * d * 2 + nk * dm * d * 2)  # q, out; k, v projections
    attn = 4.0 * batch * nq * nk * d
    ref_flops = proj + attn
    row("mem-layer", case, "reference-formulation", reference, ref_flops, ref_flops, gold)
    tri = lambda q, k, v: va.vspace_attention_triton(q, k, v)  # noqa: E731
    eff = lambda q, k, v: _sdpa(q, k, v, None, SDPBackend.EFFICIENT_ATTENTION)  # noqa: E731
    vs_flops = 2.0 * batch * (nq * d * d + nq * dm * d) + 2.0 * batch * nq * nk * (d + dm)
    row("mem-layer", case, "vspace-triton+keycache", lambda: vspace(tri), vs_flops, ref_flops, gold)
    row("mem-layer", case, "vspace-efficient+keycache", lambda: vspace(eff), vs_flops, ref_flops, gold)
    row("mem-layer", case, "vspace-triton-nocache", lambda: vspace_nocache(tri), vs_flops, ref_flops, gold)


def memory_self() -> None:
    from sam2_fast.kernels import vspace_attention as va
    n, d = 4096 // SCALE**2, 256
    q, k, v = (torch.randn(1, n, d, device=DEV).bfloat16() for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        gold = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    flops = 4.0 * n * n * d
    for name, be in SDPA_BACKENDS.items():
        row("mem-self", "tiny-4096", name, lambda be=be: _sdpa(q, k, v, None, be), flops, flops, gold)
    row("mem-self", "tiny-4096", "triton-vspace-dv256", lambda: va.vspace_attention_triton(q, k, v),
        flops, flops, gold, jitfns=(va._vspace_attn_kernel,))


# The micro-benchmark suite's Hiera blocks at 1024 px (one list), plus large's global stage 4.
WINDOW_CASES = _bench_kernels.WINDOW_CASES + [("large-s4-global", 1, 32, 32, 16, 72, 0, False)]


def window() -> None:
    from sam2_fast.kernels import window_attention as wa
    for name, b, h, w, heads, hd, win, pool in WINDOW_CASES:
        h, w = h // SCALE, w // SCALE
        win = min(win, h)
        qkv = torch.randn(b, h, w, 3 * heads * hd, device=DEV).bfloat16()
        bias = torch.randn(3 * heads * hd, device=DEV).bfloat16()
        geo = wa.window_geometry(h, w, win, pool)
        n_win = geo["n_win_y"] * geo["n_win_x"]
        nq, nk = geo["wqw"][0] * geo["wqw"][1], geo["wk"][0] * geo["wk"][1]
        flops = 4.0 * b * heads * n_win * nq * nk * hd
        gold = wa.window_attention_reference(qkv.float(), bias.float(), heads, win, pool)
        for cand, be in [("ref-default", None)] + list(SDPA_BACKENDS.items()):
            def run(be=be):
                if be is None:
                    return wa.window_attention_reference(qkv, bias, heads, win, pool)
                with sdpa_kernel(be):
                    return wa.window_attention_reference(qkv, bias, heads, win, pool)
            row("window", name, cand, run, flops, flops, gold)
        row("window", name, "triton", lambda: wa.window_attention_triton(qkv, bias, heads, win, pool),
            flops, flops, gold, jitfns=(wa._window_attn_kernel,))


def upsample() -> None:
    from sam2_fast.kernels import mask_upsample as mu
    for name, n, H, W in [("8obj-480p", 8, 480, 854), ("8obj-1080p", 8, 1080, 1920)]:
        x = torch.randn(n, 1, 256, 256, device=DEV).bfloat16()
        moved = n * (256 * 256 * 2 + H * W)
        gold = (F.interpolate(x.float(), size=(H, W), mode="bilinear", align_corners=False) > 0)
        row("upsample", name, "torch", lambda: F.interpolate(x, size=(H, W), mode="bilinear",
                                                             align_corners=False) > 0, 0, 0, gold.float(), moved)
        row("upsample", name, "triton", lambda: mu.upsample_masks_triton(x, (H, W))[0], 0, 0, gold.float(), moved,
            jitfns=(mu._upsample_threshold_kernel,))


def _sam_like_masks(n: int, side: int) -> torch.Tensor:
    """(n, 1, side, side) bool: outsides of smooth blobs with holes (``mask <= 0`` of logits)."""
    g, k = torch.Generator(device=DEV).manual_seed(n), max(3, side // 16) | 1
    x = torch.rand(n, 1, side, side, device=DEV, generator=g)
    for _ in range(2):
        x = F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)
    return (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True) <= 0.5


def components() -> None:
    """Hole filling's labelling (every frame of the 2.1 configs): torch loop vs one Triton launch."""
    from sam2_fast.kernels import connected_components as ccm
    from sam2_fast.utils.masks import connected_components_torch as loop
    side = 256 // SCALE
    for name, n in [("1obj-256", 1), ("8obj-256", 8)]:
        m = _sam_like_masks(n, side)
        gold = torch.stack(loop(m)).float()
        moved = 37.0 * n * side * side  # bytes per the kernel's roofline
        row("components", name, "torch", lambda: torch.stack(loop(m)).float(), 0, 0, gold, moved)
        row("components", name, "triton", lambda: torch.stack(ccm.connected_components_triton(m)).float(),
            0, 0, gold, moved, jitfns=(ccm._cc_kernel,))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out/kernels")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds; later rows are skipped after it")
    ap.add_argument("--quick", action="store_true", help="default tile configs only")
    ap.add_argument("--only", default="", help="comma list of steps (mem-cross-b1,mem-cross-b8,mem-layer-b1,mem-layer-b8,mem-self,window,upsample,"
                    "components)")
    ap.add_argument("--smoke", action="store_true", help="CPU plumbing check (TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    global DEV, SCALE, LOW
    if args.smoke:
        DEV, SCALE, LOW = "cpu", 4, torch.float16
    elif not torch.cuda.is_available():
        print("kernel_candidates: needs a CUDA GPU", file=sys.stderr)
        return 2
    BUDGET[0] = args.budget
    os.makedirs(args.out, exist_ok=True)
    import triton
    cuda = DEV == "cuda"
    info = {"card": torch.cuda.get_device_name() if cuda else "cpu-smoke",
            "sms": torch.cuda.get_device_properties(0).multi_processor_count if cuda else 0,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}
    print(info, flush=True)
    info["ceilings"] = ceilings()
    # memory attention first (issue 8's comparison); then the 4 cheap components rows, before
    # the budget can skip them (a first GPU run of that kernel must not delay the rows above)
    steps = [("mem-cross-b1", lambda: memory_cross(1, args.quick)), ("mem-cross-b8", lambda: memory_cross(8, True)),
             ("components", components),
             ("mem-layer-b1", lambda: memory_layer(1)), ("mem-layer-b8", lambda: memory_layer(8)),
             ("mem-self", memory_self), ("window", window), ("upsample", upsample)]
    if args.only:
        steps = [s for s in steps if s[0] in args.only.split(",")]
    for label, step in steps:
        t = time.time()
        try:
            step()
        except Exception as exc:  # noqa: BLE001
            print(f"{label}: failed: {exc!r}", flush=True)
            ROWS.append(dict(slot=label, case="-", cand="-", status=f"error: {exc!r}"[:300]))
        print(f"== {label}: {time.time() - t:.0f} s", flush=True)
        if cuda:
            torch.cuda.empty_cache()
        with open(os.path.join(args.out, "kernel_candidates.json"), "w") as fh:
            json.dump({"info": info, "rows": ROWS}, fh, indent=1, default=str)
    print("\n== summary (best per slot/case by time; ref-eq = reference FLOPs / time)")
    best: Dict[tuple, Dict] = {}
    for r in ROWS:
        if r.get("status") == "ok" and (r.get("err") is None or r["err"] < 3e-2):
            key = (r["slot"].replace("-64", "").replace("-256", ""), r["case"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    for key, r in best.items():
        print(f"{key[0]:<12} {key[1]:<16} best {r['cand']:<28} {r['us']:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
