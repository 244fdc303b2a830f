r"""Images/s of single-scale and multi-scale evaluation (random weights, cached labels) (see `lseg_jax/cli/benchmark_eval.py`)."""

from lseg_jax.cli import common
from lseg_jax.cli import benchmark_eval

if __name__ == "__main__":
  common.entry_point(benchmark_eval.main)
