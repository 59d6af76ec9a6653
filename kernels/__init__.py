"""Triton kernels of sam2_fast (installed as ``sam2_fast.kernels``).

Model code imports the dispatchers from ``sam2_fast.kernels.dispatch`` (``window_attention``,
``memory_attention_vspace``, ``upsample_masks``); the names are not re-exported here because
``sam2_fast.kernels.window_attention`` is the kernel module of the same name.
"""
