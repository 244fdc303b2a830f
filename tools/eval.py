r"""Evaluate a checkpoint (see `lseg_jax/cli/eval.py`).

  python tools/eval.py --checkpoint runs/synthetic_tiny [--multiscale] [--flip]
"""

from lseg_jax.cli import common
from lseg_jax.cli import eval as eval_cli

if __name__ == "__main__":
  common.entry_point(eval_cli.main)
