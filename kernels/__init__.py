"""Triton kernels of sam2_fast (installed as ``sam2_fast.kernels``)."""
