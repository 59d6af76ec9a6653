"""sam2_fast."""
