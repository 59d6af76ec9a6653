"""Aten ops and host syncs of one ``SAM2AutomaticMaskGenerator.generate``, ours vs sam2==1.1.0.

    PYTHONPATH=.:tests python benchmarks/amg_census.py [--points-per-side 16]

Same seeded weights (tests' ``image_harness.cached_pair``: tiny 2.1 at image size 128), a
120x160 random image, the parity tests' filter settings (``tests/test_amg.py`` CASES) with a
denser grid. Counted with ``census_modes`` (op_census.py's counters): "launch-ops" = ops that
launch a kernel on CUDA, "syncs" = ops that read the device on the host (nonzero, boolean
indexing, equal, ...), "host-reads" = .item()/.cpu()/.numpy()/.tolist()/bool(). CPU run: the
hole filling uses the CPU plan of ``utils.masks.schedule`` (a check per round); on CUDA it
checks every 3 rounds, or runs the connected-components kernel (no host reads) when enabled.
The reference's hole filling needs its CUDA extension: scipy stands in, as in the tests.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from census_modes import Census, HostReads  # noqa: E402


def census(gen, image) -> tuple:
    from video_utils import install_scipy_components

    undo = install_scipy_components()
    c = Census()
    try:
        with warnings.catch_warnings(), torch.inference_mode(), c, HostReads(c):
            warnings.simplefilter("ignore")
            records = gen.generate(image)
    finally:
        undo()
    kinds = collections.Counter()
    for counts in c.counts.values():
        for key, n in counts.items():
            kinds[key.split("|")[0]] += n
    launch = sum(n for k, n in kinds.items() if k not in ("view", "host-read", "sync"))
    return len(records), launch, kinds["sync"], kinds["host-read"], c.sites


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--cases", default="nms,filters,holes")
    ap.add_argument("--sites", type=int, default=0, help="print our top N sync sites per case")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    import test_amg as TA
    from image_harness import cached_pair, random_image

    from sam2_fast.automatic_mask_generator import SAM2AutomaticMaskGenerator

    ref_model, our_model = cached_pair("configs/sam2.1/sam2.1_hiera_t.yaml")
    image = random_image(120, 160, seed=7)
    print(f"{'case':8s} {'impl':5s} {'masks':>5s} {'launch-ops':>10s} {'syncs':>6s} {'host-reads':>10s}")
    for name in args.cases.split(","):
        kw = dict(TA.CASES[name], points_per_side=args.points_per_side)
        for who, gen in (("ours", SAM2AutomaticMaskGenerator(our_model, **kw)),
                         ("ref", TA._ref_generator(ref_model, **kw))):
            n, launch, syncs, reads, sites = census(gen, image)
            print(f"{name:8s} {who:5s} {n:5d} {launch:10d} {syncs:6d} {reads:10d}")
            if who == "ours":
                for site, k in sites.most_common(args.sites):
                    print(f"      {k:4d} {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
