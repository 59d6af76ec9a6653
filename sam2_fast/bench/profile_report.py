"""Markdown + PNG report for ``sam2-fast profile`` (see :mod:`sam2_fast.bench.profile`)."""

from __future__ import annotations

import os
from typing import Any, Dict, List

import numpy as np

from sam2_fast.profiling import OTHER, STAGES

_ORDER = list(STAGES) + [OTHER]


def _plots(out_dir: str, s: Dict[str, Any]) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: Dict[str, str] = {}
    title = f"{s['impl']} {s['model']} {s['dtype']} on {s['env']['card']}"
    lat = s["latency_ms"]
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=90)
    ax.plot(range(len(lat)), lat, marker="o", ms=3)
    ax.set_xlabel("frame")
    ax.set_ylabel("latency (ms)")
    ax.set_title("per-frame latency: " + title, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths["latency"] = os.path.join(out_dir, "latency.png")
    fig.savefig(paths["latency"])
    plt.close(fig)

    mem = s["memory"]
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=90)
    ax.plot([m["host_mib"] for m in mem], label="host RSS")
    for key, label in (("allocated_mib", "device allocated"), ("reserved_mib", "device reserved")):
        if mem and key in mem[0]:
            ax.plot([m[key] for m in mem], label=label)
    ax.set_xlabel("frame")
    ax.set_ylabel("MiB")
    ax.set_title("memory over frames: " + title, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths["memory"] = os.path.join(out_dir, "memory.png")
    fig.savefig(paths["memory"])
    plt.close(fig)

    frames = s.get("stage_ms_frames") or []
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=90)
    bottom = np.zeros(len(frames))
    for name in _ORDER:
        vals = np.array([f.get(name, 0.0) for f in frames])
        if vals.any():
            ax.bar(range(len(frames)), vals, bottom=bottom, label=name, width=0.85)
            bottom += vals
    ax.set_xlabel("frame")
    ax.set_ylabel("ms")
    ax.set_title("stage breakdown per frame: " + title, fontsize=8)
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    paths["stages"] = os.path.join(out_dir, "stages.png")
    fig.savefig(paths["stages"])
    plt.close(fig)
    return paths


def _stage_lines(s: Dict[str, Any]) -> List[str]:
    rate = s["matmul"]["tflops"]
    ms, flops = s.get("stage_ms", {}), s.get("stage_flops", {})
    total_ms = sum(ms.values()) or 1.0
    lines = ["| stage | ms/frame | share | GFLOP/frame | achieved TFLOP/s | floor ms | % of floor |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in _ORDER:
        t, f = ms.get(name), flops.get(name, 0.0)
        if t is None and not f:
            continue
        floor = f / (rate * 1e12) * 1e3
        ach = f"{f / (t / 1e3) / 1e12:.3g}" if t and f else "-"
        pct = f"{100 * floor / t:.0f}%" if t and f else "-"
        lines.append(f"| {name} | {t or 0:.2f} | {100 * (t or 0) / total_ms:.0f}% | {f / 1e9:.2f} | {ach} | "
                     f"{floor:.2f} | {pct} |")
    f_all = sum(flops.values())
    lines.append(f"| **frame** | {total_ms:.2f} | 100% | {f_all / 1e9:.2f} | {f_all / (total_ms / 1e3) / 1e12:.3g} | "
                 f"{f_all / (rate * 1e12) * 1e3:.2f} | {100 * f_all / (rate * 1e12) * 1e3 / total_ms:.0f}% |")
    return lines


def write_report(out_dir: str, s: Dict[str, Any]) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = _plots(out_dir, s)
    env, prof = s["env"], s["profiler"]
    lat = np.array(s["latency_ms"][1:] or s["latency_ms"])
    mem = s["memory"]
    md = [
        f"# Profile: {s['impl']} `{s['model']}` on {env['card']}",
        "",
        f"- date {env['date']}, commit `{env['commit']}`, torch {env['torch']}, triton {env['triton']}, "
        f"driver {env['driver'] or '-'}, {env['cpu_threads']} CPU threads",
        f"- {s['frames']} frames of {s['video']}, image_size "
        f"{s['image_size'] or 'model default'}, {s['dtype']}{', compiled' if s['compiled'] else ''}",
        f"- warm-up pass {s['warmup_s']:.2f} s; tracked frames: p50 {np.percentile(lat, 50):.1f} ms, "
        f"p99 {np.percentile(lat, 99):.1f} ms, {1e3 / lat.mean():.2f} frames/s (frame 0 excluded)",
        f"- floor: measured {s['matmul']['dtype']} matmul rate {s['matmul']['tflops']:.3g} TFLOP/s "
        f"({s['matmul']['n']}³); FLOPs counted with torch.utils.flop_counter (+ attention formulas)",
        f"- stages located: {', '.join(s['stages_found']) or 'none'}",
        "",
        "## Per-stage time (mean over tracked frames)",
        "",
        *_stage_lines(s),
        "",
        "![stage breakdown](stages.png)",
        "",
        f"## Top ops by {'device' if prof['sorted_by'] == 'self_device_ms' else 'CPU'} self time "
        f"(torch.profiler, {prof['frames']} frames)",
        "",
        "| op / kernel | calls | self CPU ms | self device ms | share |",
        "|---|---:|---:|---:|---:|",
    ]
    for o in prof["top"]:
        name = o["name"].replace("|", "/")
        name = name if len(name) <= 80 else name[:77] + "..."
        md.append(f"| `{name}` | {o['calls']} | {o['self_cpu_ms']:.2f} | {o['self_device_ms']:.2f} | {o['pct']:.1f}% |")
    launches = prof.get("device_launches_per_frame")
    md += [
        "",
        f"- device launches per frame: {launches:.0f}" if launches is not None else
        "- device launches per frame: n/a (CPU run)",
        f"- aten calls per frame: {prof['aten_calls_per_frame']:.0f}",
        "",
        "## Latency and memory",
        "",
        "![latency per frame](latency.png)",
        "",
        "![memory over frames](memory.png)",
        "",
        f"- host RSS: first frame {mem[0]['host_mib']:.0f} MiB, last {mem[-1]['host_mib']:.0f} MiB",
    ]
    if "allocated_mib" in mem[0]:
        md.append(f"- device allocated: first {mem[0]['allocated_mib']:.0f} MiB, last {mem[-1]['allocated_mib']:.0f} "
                  f"MiB, peak {max(m['peak_mib'] for m in mem):.0f} MiB")
    md += ["", f"Trace (chrome://tracing, Perfetto): `{s['trace']}` (not committed)", ""]
    paths["report"] = os.path.join(out_dir, "report.md")
    with open(paths["report"], "w") as f:
        f.write("\n".join(md))
    return paths
