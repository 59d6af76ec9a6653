"""Batch tracking (``sam2-fast track-many``): many videos, each with its own prompts, on
local worker processes or a Ray cluster.

``manifest`` reads the JSON Lines manifest into tasks; ``worker`` tracks one task with a
model built once per process (the same ``track_video`` as ``sam2-fast track``) and writes
its completion marker; ``scheduler`` hands tasks to workers longest first, retries the
video of a worker that died and keeps the status records; ``local_pool`` and ``ray_pool``
are the two ways to run workers.
"""
