r"""Converts LSeg checkpoints between lang-seg (PyTorch) and lseg-jax (Orbax) (see `lseg_jax/cli/convert.py`)."""

from lseg_jax.cli import common
from lseg_jax.cli import convert

if __name__ == "__main__":
  common.entry_point(convert.main)
