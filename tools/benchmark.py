r"""Times the real train and inference steps of a config on generated batches (see `lseg_jax/cli/benchmark.py`)."""

from lseg_jax.cli import common
from lseg_jax.cli import benchmark

if __name__ == "__main__":
  common.entry_point(benchmark.main)
