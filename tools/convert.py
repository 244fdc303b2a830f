r"""Converts LSeg checkpoints between lang-seg (PyTorch) and lseg-jax (Orbax) (see `lseg_jax/cli/convert.py`)."""
import sys

from lseg_jax.cli import common
from lseg_jax.cli import convert

if __name__ == "__main__":
  sys.exit(common.run(convert.main))
