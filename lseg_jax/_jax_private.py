"""The one door to JAX internals and JAX error texts (used by `lseg_jax.distributed`).

JAX has no public accessor for the coordination service's client (barriers without a device
collective; the key-value store of the heartbeat), for the preemption sync manager, or for whether a
backend already started; and `jax.distributed.initialize` says "no cluster detected" only in the
text of a ValueError. Everything of that kind lives here and nowhere else. It was written against
JAX `TESTED_JAX`; on another version the import checks that every internal is still where it was and
fails with a message naming what moved. tests/test_jax_private.py fails when a JAX release moves any
of it or changes a text matched here.
"""
from __future__ import annotations

import jax
from jax._src import distributed as _distributed
from jax._src import xla_bridge as _xla_bridge
from jax._src.lib import _jax as _jaxlib

TESTED_JAX = "0.10.2"

# What jax.distributed.initialize raises when it detects no cluster and nothing was
# given: then the job is one process.
_NO_CLUSTER = "coordinator_address should be defined"
# Texts of a failed collective or coordination call after a peer went away.
_PEER_FAILURES = ("Gloo", "gloo", "Connection closed by peer", "Connection reset",
                  "Broken pipe", "DEADLINE_EXCEEDED", "UNAVAILABLE", "coordination")
_CLIENT_METHODS = ("wait_at_barrier", "key_value_set", "key_value_increment", "key_value_dir_get")


def missing_internals() -> list[str]:
  """The internals used here that this JAX lacks (empty when all are present)."""
  missing = [f"jax._src.distributed.global_state.{name}"
             for name in ("client", "preemption_sync_manager", "coordinator_address")
             if not hasattr(_distributed.global_state, name)]
  if not callable(getattr(_xla_bridge, "backends_are_initialized", None)):
    missing.append("jax._src.xla_bridge.backends_are_initialized")
  client_type = getattr(_jaxlib, "DistributedRuntimeClient", None)
  missing += [f"DistributedRuntimeClient.{m}" for m in _CLIENT_METHODS
              if not hasattr(client_type, m)]
  return missing


if jax.__version__ != TESTED_JAX and missing_internals():
  raise ImportError(f"lseg_jax.distributed was written for JAX {TESTED_JAX}; JAX "
                    f"{jax.__version__} lacks {missing_internals()}")


def coordination_client():
  """The client of JAX's coordination service (None before `jax.distributed.initialize`)."""
  return _distributed.global_state.client


def coordinator_address() -> str | None:
  """The coordinator address the job was started with (also when auto-detected)."""
  return _distributed.global_state.coordinator_address


def preemption_sync_enabled() -> bool:
  """Whether JAX's preemption sync manager runs (started by jax.distributed.initialize)."""
  return _distributed.global_state.preemption_sync_manager is not None


def backends_started() -> bool:
  """Whether JAX already created its backends (too late for jax.distributed.initialize)."""
  return _xla_bridge.backends_are_initialized()


def is_no_cluster_error(error: BaseException) -> bool:
  """Whether `error` from jax.distributed.initialize() means "no cluster detected"."""
  return isinstance(error, ValueError) and _NO_CLUSTER in str(error)


def is_peer_failure(error: BaseException) -> bool:
  """Whether `error` reads like a collective that failed because a process went away."""
  return any(marker in str(error) for marker in _PEER_FAILURES)
