"""The JAX internals and error texts `lseg_jax._jax_private` relies on: this file fails
when a JAX release moves one of them (then update `_jax_private`, nothing else)."""
import os
import subprocess
import sys

import jax

from lseg_jax import _jax_private


def test_every_internal_is_where_it_was():
  assert _jax_private.missing_internals() == [], (
      f"JAX {jax.__version__} moved internals lseg_jax.distributed uses (written for "
      f"{_jax_private.TESTED_JAX}): {_jax_private.missing_internals()}")
  assert _jax_private.coordination_client() is None  # this test process joined no job
  assert _jax_private.coordinator_address() is None
  assert _jax_private.preemption_sync_enabled() is False
  jax.numpy.zeros(1).block_until_ready()
  assert _jax_private.backends_started() is True


def test_no_cluster_text_is_what_jax_raises():
  # In a fresh process (no backend started yet), with no cluster in the environment.
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "TPU_",
                              "KUBERNETES_", "CLOUD_TPU"))}
  code = ("import jax\nfrom lseg_jax import _jax_private\n"
          "try:\n  jax.distributed.initialize()\nexcept Exception as e:\n"
          "  print('no cluster' if _jax_private.is_no_cluster_error(e) else repr(e))\n"
          "else:\n  print('joined')\n")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=120, check=True).stdout
  assert out.strip().splitlines()[-1] == "no cluster", out
  assert not _jax_private.is_no_cluster_error(ValueError("process_id must be >= 0"))
  assert not _jax_private.is_no_cluster_error(
      RuntimeError("coordinator_address should be defined."))


def test_peer_failure_texts():
  # Texts seen when a peer process was killed during a gloo collective or a
  # coordination call (tests/test_multiprocess.py kills one for real).
  for text in ("INTERNAL: Gloo error: Connection closed by peer [127.0.0.1]:1234",
               "UNAVAILABLE: failed to connect to all addresses",
               "DEADLINE_EXCEEDED: Barrier timed out",
               "[enforce fail at gloo/transport/tcp/pair.cc:446] Broken pipe"):
    assert _jax_private.is_peer_failure(RuntimeError(text)), text
  for text in ("RESOURCE_EXHAUSTED: Out of memory", "shapes (3,) and (4,) differ"):
    assert not _jax_private.is_peer_failure(ValueError(text)), text
