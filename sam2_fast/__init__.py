"""sam2_fast: a fast, drop-in implementation of SAM 2 / SAM 2.1."""

__version__ = "0.1.0"

__all__ = ["StreamingTracker"]


def __getattr__(name: str):
    # imported on first use: ``import sam2_fast`` stays light (no model code loaded)
    if name == "StreamingTracker":
        from sam2_fast.stream import StreamingTracker

        return StreamingTracker
    raise AttributeError(f"module 'sam2_fast' has no attribute {name!r}")
