"""sam2_fast: a fast, drop-in implementation of SAM 2 / SAM 2.1."""

__version__ = "0.1.0"
