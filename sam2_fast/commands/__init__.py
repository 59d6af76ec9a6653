"""The everyday ``sam2-fast`` commands: track, segment, amg, download (see ``sam2_fast.cli``)."""
