r"""Images/s of single-scale and multi-scale evaluation (random weights, cached labels) (see `lseg_jax/cli/benchmark_eval.py`)."""
import sys

from lseg_jax.cli import common
from lseg_jax.cli import benchmark_eval

if __name__ == "__main__":
  sys.exit(common.run(benchmark_eval.main))
