"""Benchmarks of sam2_fast against the reference SAM 2: runner, FLOP floor, reports, profiles.

Entry points: ``sam2-fast bench`` / ``python -m sam2_fast.bench`` (side-by-side runner,
:mod:`sam2_fast.bench.command`) and ``sam2-fast profile`` (:mod:`sam2_fast.bench.profile`).
"""
