"""Per-variant AOT table: registers, spills, shared memory, tensor-core instructions.

    cd tests/kernels && env -u TRITON_INTERPRET PYTHONPATH=../.. python aot_report.py [kind ...]

kind: window, vspace, upsample (default: all). Compiles every captured launch for the
targets ``aot_compile.targets`` gives it (the AOT test's own jobs) and prints one row each.
"""

from __future__ import annotations

import os
import sys
import time

import aot_compile as C
import aot_launches as L


def main(kinds) -> None:
    variants = C.group(L.all_launches(tuple(kinds) if kinds else None))
    jobs = [(i, cc) for i, v in enumerate(variants) for cc in C.targets(v)]
    start = time.perf_counter()
    out = C.compile_all(variants, jobs, int(os.environ.get("AOT_JOBS", "2")))
    print(f"{len(variants)} variants, {len(jobs)} compiles, {time.perf_counter() - start:.0f} s wall")
    for (i, cc), r in sorted(out.items(), key=lambda kv: (variants[kv[0][0]].ident(), kv[0][1])):
        v = variants[i]
        if r.error:
            print(f"sm_{cc} {v.ident()}: ERROR {r.error[:200]}")
            continue
        st, ld = r.spill_bytes
        print(f"sm_{cc} {v.ident():90s} regs {r.registers:3d} spill {st:3d}/{ld:3d} B "
              f"smem {r.shared // 1024:3d} KiB mma {r.count(C.MMA_SYNC):4d} wgmma {r.count(C.WGMMA):3d} "
              f"{r.seconds:5.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
