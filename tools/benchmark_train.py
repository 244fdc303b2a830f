r"""Times the training step of a config: random weights, generated batches, no data files (see `lseg_jax/cli/benchmark_train.py`)."""

from lseg_jax.cli import common
from lseg_jax.cli import benchmark_train

if __name__ == "__main__":
  common.entry_point(benchmark_train.main)
