r"""Examples/sec of the training input pipeline on ADE20K-shaped data (see `lseg_jax/cli/benchmark_data.py`)."""
from absl import app

from lseg_jax.cli import benchmark_data

if __name__ == "__main__":
  app.run(benchmark_data.main)
