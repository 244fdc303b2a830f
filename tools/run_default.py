r"""The built-in default, end to end on a CPU: train, evaluate, predict an image
(see `lseg_jax/cli/run_default.py`).

  python tools/run_default.py --workdir runs/synthetic_tiny
"""

from lseg_jax.cli import common
from lseg_jax.cli import run_default

if __name__ == "__main__":
  common.entry_point(run_default.main)
