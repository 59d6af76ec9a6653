"""Benchmark output: the terminal tables, and JSON + CSV files with the environment."""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence

from sam2_fast.profiling import OTHER, STAGES

CSV_META = ("date", "card", "driver", "torch", "triton", "commit", "model", "image_size", "resolution", "frames",
            "objects", "video")
CSV_ROW = ("key", "impl", "title", "status", "fps", "p50_ms", "p99_ms", "mean_ms", "warmup_s", "first_frame_ms",
           "init_s", "build_s", "peak_device_mib", "peak_host_mib", "miou", "min_iou", "logit_rel_err", "accuracy_vs",
           "reason")


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}f}"
    return str(v)


def _err(v: Optional[float]) -> str:
    return "-" if v is None else ("nan" if isinstance(v, float) and math.isnan(v) else f"{v:.1e}")


def _table(header: Sequence[str], lines: List[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(str(l[i])) for l in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(l, widths)) for l in lines]
    return "\n".join(out)


def main_table(rows: List[Dict[str, Any]]) -> str:
    header = ("row", "impl", "frames/s", "p50 ms", "p99 ms", "warm-up s", "dev MiB", "host MiB", "mIoU", "min IoU",
              "logit err", "note")
    lines = []
    for r in rows:
        if r.get("status") != "ok":
            lines.append((r["key"], r["impl"], "n/a" if r.get("status") == "n/a" else "error", "", "", "", "", "", "",
                          "", "", (r.get("reason") or "")[:90]))
            continue
        lines.append((r["key"], r["impl"], _fmt(r["fps"], 2), _fmt(r["p50_ms"]), _fmt(r["p99_ms"]),
                      _fmt(r["warmup_s"]), _fmt(r.get("peak_device_mib"), 0), _fmt(r.get("peak_host_mib"), 0),
                      _fmt(r.get("miou"), 4), _fmt(r.get("min_iou"), 4), _err(r.get("logit_rel_err")),
                      f"vs {r['accuracy_vs']}" if r.get("accuracy_vs") and r["accuracy_vs"] != r["key"] else "golden"))
    return _table(header, lines)


def per_object_table(cases: List[Dict[str, Any]]) -> str:
    """Per-object cost across the object counts of one run (``--objects 1,8``): for every
    row, ms per frame and per object-frame, and the frame cost relative to the fewest
    objects (batched tracking: near 1x while the GPU has room; per-object loops: ~N x)."""
    header = ("row", "objects", "frames/s", "p50 ms/frame", "ms per object", "x vs fewest")
    lines = []
    keys: List[str] = []
    for case in cases:
        for r in case["rows"]:
            if r.get("status") == "ok" and r["key"] not in keys:
                keys.append(r["key"])
    for key in keys:
        base = None
        for case in sorted(cases, key=lambda c: c["case"]["objects"]):
            n = case["case"]["objects"]
            r = next((r for r in case["rows"] if r["key"] == key and r.get("status") == "ok"), None)
            if r is None or r.get("p50_ms") is None:
                continue
            ms = r["p50_ms"]
            base = ms if base is None else base
            lines.append((key, str(n), _fmt(r.get("fps"), 2), _fmt(ms), _fmt(ms / n, 2), _fmt(ms / base, 2)))
    return _table(header, lines)


def stage_table(rows: List[Dict[str, Any]], floor: Dict[str, Any]) -> str:
    """Per stage: GFLOP/frame and floor ms, then each row's ms (% of floor)."""
    flops = floor.get("stage_flops") or {}
    rate = floor.get("matmul", {}).get("tflops") or 0.0
    ok = [r for r in rows if r.get("status") == "ok" and r.get("stage_ms")]
    header = ["stage", "GFLOP/frame", "floor ms"] + [r["key"] for r in ok]
    lines = []
    for name in list(STAGES) + [OTHER]:
        f = flops.get(name, 0.0)
        floor_ms = f / (rate * 1e12) * 1e3 if rate else 0.0
        cells = [name, _fmt(f / 1e9, 2), _fmt(floor_ms, 2) if f and rate else "-"]
        for r in ok:
            ms = r["stage_ms"].get(name)
            if ms is None:
                cells.append("-")
            elif f and rate and ms > 0:
                cells.append(f"{ms:.1f} ({100 * floor_ms / ms:.0f}%)")
            else:
                cells.append(f"{ms:.1f}")
        lines.append(cells)
    total_f = sum(flops.values())
    cells = ["frame", _fmt(total_f / 1e9, 2), _fmt(total_f / (rate * 1e12) * 1e3, 2) if rate else "-"]
    cells += [_fmt(sum(r["stage_ms"].values()), 1) for r in ok]
    lines.append(cells)
    note = (f"floor = FLOPs / measured {floor.get('matmul', {}).get('dtype', '?')} matmul rate "
            f"{rate:.3g} TFLOP/s; cells: ms per frame (% of floor)" if rate else
            "cells: ms per frame (no matmul rate measured: --no-floor)")
    return _table(header, lines) + "\n" + note


def floor_summary(rows: List[Dict[str, Any]], matmul: Dict[str, Any]) -> Dict[str, Any]:
    src = next((r for r in rows if r.get("stage_flops")), None)
    out: Dict[str, Any] = {"matmul": matmul, "stage_flops": src["stage_flops"] if src else {},
                           "stage_flops_last_frame": src.get("stage_flops_last") if src else {},
                           "counted_on": src["key"] if src else None}
    rate = matmul.get("tflops") or 0.0
    if src and rate:
        per_row = {}
        for r in rows:
            if r.get("status") != "ok" or not r.get("stage_ms"):
                continue
            per_row[r["key"]] = {
                name: {"ms": ms, "tflops": f / (ms / 1e3) / 1e12 if ms > 0 else None,
                       "pct_floor": 100 * (f / (rate * 1e12) * 1e3) / ms if ms > 0 else None}
                for name, ms in r["stage_ms"].items() for f in [out["stage_flops"].get(name, 0.0)]
            }
        out["achieved"] = per_row
    return out


def write(out_dir: str, stem: str, meta: Dict[str, Any], case: Dict[str, Any], floor: Dict[str, Any],
          rows: List[Dict[str, Any]]) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, stem + ".json")
    csv_path = os.path.join(out_dir, stem + ".csv")
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "case": case, "floor": floor, "rows": rows}, f, indent=1, default=str)
    flat_meta = {**meta, **case}
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(CSV_META) + list(CSV_ROW))
        for r in rows:
            w.writerow([flat_meta.get(k) for k in CSV_META] + [r.get(k) for k in CSV_ROW])
    return {"json": json_path, "csv": csv_path}
