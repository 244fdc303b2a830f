"""Checkpoint conversion: one mapping table per source layout, run in both directions."""
