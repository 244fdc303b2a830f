r"""Runs a command as N processes of one JAX job on this machine (see
`lseg_jax/cli/launch.py`).

  python tools/launch.py --processes 2 --devices-per-process 4 -- \
      python tools/train.py --config configs/synthetic_tiny.py --workdir runs/tiny_2x4
"""

from lseg_jax.cli import common
from lseg_jax.cli import launch

if __name__ == "__main__":
  common.entry_point(launch.main)
