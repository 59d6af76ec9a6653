"""Triton kernels of sam2_fast (installed as ``sam2_fast.kernels``).

Model code imports the dispatchers from here; see ``dispatch.py`` for the switches.
"""

from .dispatch import (  # noqa: F401
    fallback_counts,
    flash_attn_available,
    force_kernels,
    launch_counts,
    memory_cross_attention,
    reset_launch_counts,
    rope_self_attention,
    rope_tables,
    upsample_masks,
    window_attention,
)
