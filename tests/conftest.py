"""Shared test setup: quiet TF, float32 everywhere, 8 forced host devices available."""
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

try:
  # torchvision's models import triton, which crashes the interpreter when it loads
  # after TensorFlow: load it before any test module imports TensorFlow.
  import torchvision.models  # noqa: F401,E402  pylint: disable=unused-import
except ImportError:  # the torch extra is optional
  pass

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Tests build many tiny models whose programs repeat across tests and test files;
# a persistent compilation cache shares the compiled programs between them.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("LSEG_TEST_JAX_CACHE",
                                 os.path.join(tempfile.gettempdir(), "lseg_jax_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A TFDS data directory per test module; datasets are generated into it on first use
  (modules that need one built up front define their own)."""
  return tmp_path_factory.mktemp("tfds")
