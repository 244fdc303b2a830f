r"""Evaluate a checkpoint (see `lseg_jax/cli/eval.py`).

  python tools/eval.py --checkpoint runs/synthetic_tiny [--multiscale] [--flip]
"""
import sys

from lseg_jax.cli import common
from lseg_jax.cli import eval as eval_cli

if __name__ == "__main__":
  sys.exit(common.run(eval_cli.main))
