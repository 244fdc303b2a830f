"""Experiment configs: `get_config(arg)` per file, plain data (see configs/common.py)."""
