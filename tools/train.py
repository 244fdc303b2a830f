r"""Trains LSeg from a config file (see `lseg_jax/cli/train.py`).

  python tools/train.py --config configs/synthetic_tiny.py --workdir runs/synthetic_tiny
"""

from lseg_jax.cli import common
from lseg_jax.cli import train

if __name__ == "__main__":
  common.entry_point(train.main)
