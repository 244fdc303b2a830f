"""Starting the JAX distributed runtime, once per process, before any computation.

`initialize` below is what every tool calls first: it joins the processes of a job given
explicitly (flags or LSEG_* environment), or detected by JAX, or does nothing for a single
process (docs/scaling.md has the table). On CPU the processes exchange collectives
through gloo. Once started, a watchdog thread (`lseg_jax._watchdog`) ends every process
with `EXIT_PROCESS_LOST` and a message naming a lost process (killed, or exited while the
others run), instead of leaving it waiting forever in its next collective; JAX's own
preemption sync stops all processes at the same step (`lseg_jax.train_utils.Preemption`).
What JAX has no public API for is reached through `lseg_jax._jax_private` only.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import threading

from absl import logging

# JAX (and `_jax_private`, which imports it) are imported inside the functions: the
# launcher (tools/launch.py) reads the environment names here without loading JAX.

ENV_COORDINATOR = "LSEG_COORDINATOR"
ENV_NUM_PROCESSES = "LSEG_NUM_PROCESSES"
ENV_PROCESS_ID = "LSEG_PROCESS_ID"
ENV_HEARTBEAT_TIMEOUT = "LSEG_HEARTBEAT_TIMEOUT"
ENV_INIT_TIMEOUT = "LSEG_INIT_TIMEOUT"
# Kubernetes indexed Jobs number their pods with this variable.
ENV_K8S_INDEX = "JOB_COMPLETION_INDEX"

DEFAULT_HEARTBEAT_TIMEOUT = 30.0  # seconds without a beat before a process counts as lost
DEFAULT_INIT_TIMEOUT = 300  # seconds to wait for every process to connect
# Exit code of a process stopped because another was lost. Like a preempted run's 75
# (lseg_jax.cli.train.EXIT_PREEMPTED) it means "rerun the same command to resume", but
# from the last complete checkpoint rather than one saved at the stop.
EXIT_PROCESS_LOST = 76


@dataclasses.dataclass(frozen=True)
class Topology:
  """Where this process stands in the job."""
  process_index: int
  process_count: int
  local_devices: int
  global_devices: int
  platform: str
  coordinator: str | None

  def __str__(self):
    return (f"process {self.process_index} of {self.process_count}, "
            f"{self.local_devices} local / {self.global_devices} global {self.platform} "
            f"devices" + (f", coordinator {self.coordinator}" if self.coordinator else ""))


@dataclasses.dataclass(frozen=True)
class _Settings:
  """The job as asked for by arguments and environment (None: left to JAX)."""
  coordinator: str | None
  num_processes: int | None
  process_id: int | None
  heartbeat_timeout: float
  init_timeout: int

  @property
  def single(self) -> bool:
    return self.num_processes == 1 and not self.coordinator

  @property
  def explicit(self) -> tuple:
    return (self.coordinator, self.num_processes, self.process_id)


_topology: Topology | None = None
_init_timeout = DEFAULT_INIT_TIMEOUT
_barriers = itertools.count()
_finished = False
_watchdog = None  # the _watchdog.Watchdog of a multi-process job


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """--coordinator, --num-processes, --process-id, --heartbeat-timeout."""
  g = parser.add_argument_group(
      "multi-process runs (default: detected by JAX on TPU pods, SLURM, Open MPI; "
      "else one process)")
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT", help=(
      f"address of process 0's coordination service (env {ENV_COORDINATOR})"))
  g.add_argument("--num-processes", type=int, default=None, metavar="N",
                 help=f"number of processes of the job (env {ENV_NUM_PROCESSES})")
  g.add_argument("--process-id", type=int, default=None, metavar="I", help=(
      f"this process's index in [0, N) (env {ENV_PROCESS_ID}, else {ENV_K8S_INDEX})"))
  g.add_argument("--heartbeat-timeout", type=float, default=None, metavar="SECONDS", help=(
      "a process silent this long counts as lost and the others exit "
      f"(env {ENV_HEARTBEAT_TIMEOUT}, default {DEFAULT_HEARTBEAT_TIMEOUT:.0f})"))


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _settings(coordinator, num_processes, process_id, heartbeat_timeout, init_timeout) -> _Settings:
  """The arguments completed from the environment and checked (ValueError)."""
  coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _env_int(ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _env_int(ENV_PROCESS_ID)
  if process_id is None and num_processes is not None:
    process_id = _env_int(ENV_K8S_INDEX)
  if heartbeat_timeout is None:
    heartbeat_timeout = float(os.environ.get(ENV_HEARTBEAT_TIMEOUT) or DEFAULT_HEARTBEAT_TIMEOUT)
  if heartbeat_timeout <= 0:
    raise ValueError(f"heartbeat timeout {heartbeat_timeout} s; expected > 0")
  if init_timeout is None:
    init_timeout = _env_int(ENV_INIT_TIMEOUT) or DEFAULT_INIT_TIMEOUT
  settings = _Settings(coordinator, num_processes, process_id, heartbeat_timeout, init_timeout)
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num-processes {num_processes}; expected >= 1")
  if process_id is not None and num_processes is not None and not (0 <= process_id < num_processes):
    raise ValueError(f"--process-id {process_id} is outside [0, {num_processes}) for "
                     f"--num-processes {num_processes}")
  explicit = settings.explicit
  if not settings.single and any(v is not None for v in explicit) and None in explicit:
    missing = [n for n, v in zip(("--coordinator", "--num-processes", "--process-id"),
                                 explicit) if v is None]
    raise ValueError(f"a multi-process run needs --coordinator, --num-processes and "
                     f"--process-id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, "
                     f"{ENV_PROCESS_ID}); missing {missing}")
  return settings


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout: float | None = None,
               init_timeout: int | None = None) -> Topology:
  """Joins this process to its job (or does nothing for a single process); logs the
  topology once and returns it. Call it before any JAX computation; later calls
  return the first call's topology. ValueError for incomplete or inconsistent settings,
  RuntimeError if the coordinator cannot be reached within `init_timeout` seconds."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from lseg_jax import _jax_private  # pylint: disable=g-import-not-at-top
  from lseg_jax import _watchdog as _watchdog_lib  # pylint: disable=g-import-not-at-top
  global _topology, _watchdog, _init_timeout
  settings = _settings(coordinator, num_processes, process_id, heartbeat_timeout, init_timeout)
  _init_timeout = settings.init_timeout
  if _topology is not None:
    return _topology
  single = settings.single
  if not single and all(v is None for v in settings.explicit) and _jax_private.backends_started():
    # JAX already ran here (a library caller, a test): too late to detect a cluster,
    # and nothing asked for one.
    single = True
  started = not single and _join(settings)

  devices = jax.devices()
  _topology = Topology(jax.process_index(), jax.process_count(), jax.local_device_count(),
                       len(devices), devices[0].platform,
                       _jax_private.coordinator_address() if started else None)
  logging.info("JAX topology: %s.", _topology)
  if started and _topology.process_count > 1:
    # Gloo sets up its context over all devices at the first collective and gives up
    # when the processes arrive more than 30 s apart (compilation under load): set it
    # up now, while they are in step.
    multihost_utils.sync_global_devices("lseg_jax start")
    _watchdog = _watchdog_lib.Watchdog(
        _jax_private.coordination_client(), _topology.process_index,
        _topology.process_count, settings.heartbeat_timeout, EXIT_PROCESS_LOST)
    _watchdog.start()
  return _topology


def _join(settings: _Settings) -> bool:
  """jax.distributed.initialize with gloo collectives; False if JAX detected no
  cluster (then the job is this one process)."""
  import jax  # pylint: disable=g-import-not-at-top
  from lseg_jax import _jax_private  # pylint: disable=g-import-not-at-top
  previous = jax.config.jax_cpu_collectives_implementation
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # Our watchdog reports a lost process first; JAX's own heartbeat is the backstop.
  # JAX ends the process with a fatal log (no exception) when the job cannot form:
  # the clear message comes from a timer that fires first.
  coordinator, num_processes, process_id = settings.explicit
  init_timeout, heartbeat_timeout = settings.init_timeout, settings.heartbeat_timeout
  where = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or "(auto-detected)"
  could_not_join = (f"process {process_id} of {num_processes} could not join the job at "
                    f"coordinator {where} within {init_timeout} s: check that every process was "
                    "started with the same coordinator address and process count, and that "
                    "process 0 is running and reachable")
  give_up = threading.Timer(init_timeout, _could_not_join, (could_not_join,))
  give_up.daemon = True
  give_up.start()
  if num_processes is not None:
    logging.info("Joining the job as process %s of %s at coordinator %s (%d s allowed; "
                 "a process count or id the coordinator does not expect aborts here).",
                 process_id, num_processes, where, init_timeout)
  kwargs = dict(initialization_timeout=int(init_timeout) + 60,
                heartbeat_timeout_seconds=int(2 * heartbeat_timeout + 10),
                shutdown_timeout_seconds=int(2 * heartbeat_timeout + 10))
  try:
    if coordinator is None and os.environ.get("JAX_COORDINATOR_ADDRESS") is None:
      jax.distributed.initialize(**kwargs)  # cluster auto-detection
    else:
      jax.distributed.initialize(coordinator, num_processes, process_id, **kwargs)
    return True
  except ValueError as e:
    if not _jax_private.is_no_cluster_error(e):
      raise
    jax.config.update("jax_cpu_collectives_implementation", previous)  # one process
    return False
  except jax.errors.JaxRuntimeError as e:
    # What JAX raises rather than aborts on: e.g. the coordinator's port taken on
    # process 0 (UNKNOWN: Failed to start RPC server); its status line is kept.
    raise RuntimeError(could_not_join + " (" + str(e).splitlines()[0][:300] + ")") from None
  finally:
    give_up.cancel()


def _could_not_join(message: str):
  message = f"error: {message}. Nothing was written."
  logging.error(message)
  print(message, file=sys.stderr, flush=True)
  os._exit(2)  # pylint: disable=protected-access


def barrier(name: str, timeout: float | None = None) -> None:
  """Waits until every process got here (a no-op for one process), through the
  coordination service: no device collective, so nothing of gloo's is set up. A process
  that does not come within `timeout` s (default: the start's) is an error."""
  if _topology is None or _topology.process_count == 1:
    return
  from lseg_jax import _jax_private  # pylint: disable=g-import-not-at-top
  timeout = _init_timeout if timeout is None else timeout
  _jax_private.coordination_client().wait_at_barrier(
      f"lseg_jax/{name}/{next(_barriers)}", int(timeout * 1000))


def compile_in_step(jitted, *args):
  """`jitted` compiled for `args`, returned once every process has compiled it (one
  process: `jitted` itself). Gloo gives up when the processes arrive at a first
  collective more than 30 s apart, which compilation under load easily exceeds."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return jitted
  compiled = jitted.lower(*args).compile()
  barrier("compiled")
  return compiled


# The lost-process policy: a process that finished says so (`done`), one that exits early says so
# (`leaving`), and a collective that failed because a peer died waits for the watchdog to name it
# (`await_lost_process`); a lost peer ends the others with EXIT_PROCESS_LOST.

def done() -> None:
  """Tells the other processes that this one finished its work: its exit (and a slow
  teardown on either side) is then no sign of a lost process. Tools call it last."""
  global _finished
  _finished = True
  if _watchdog is not None:
    _watchdog.mark("done")


def shutdown_finished() -> None:
  """For a process that finished its work (`done()`) and exits with os._exit (a
  non-zero code such as a preempted run's 75): leaves the job with JAX's shutdown
  barrier, so that process 0, which hosts the coordination service, exits last. Other
  processes that are still tearing down would otherwise be aborted by JAX."""
  if _watchdog is None or not _finished:
    return
  import jax  # pylint: disable=g-import-not-at-top
  _watchdog.mark_exited()
  try:
    jax.distributed.shutdown()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Leaving the job: %s", str(e).splitlines()[0][:200] if str(e) else e)


def await_lost_process(error: BaseException) -> None:
  """After `error`, what a collective raises when another process died: waits for the
  watchdog to name the lost process (it prints how to resume and exits this process
  with EXIT_PROCESS_LOST). Returns at once for other errors or a single process, and
  after two heartbeat timeouts if no process was lost."""
  if _watchdog is None or not _watchdog.is_alive():
    return
  from lseg_jax import _jax_private  # pylint: disable=g-import-not-at-top
  if not _jax_private.is_peer_failure(error):
    return
  logging.warning("A collective failed (%s); checking whether a process was lost.",
                  str(error).splitlines()[0][:200] if str(error) else type(error).__name__)
  _watchdog.join(timeout=2 * _watchdog.timeout + 5)


def leaving() -> None:
  """Tells the other processes that this one is exiting (what atexit does, for a process that ends
  with os._exit): they report it as lost by name, without waiting for its heartbeat to stop."""
  if _watchdog is not None:
    _watchdog.mark_exited()


def preemption_sync_enabled() -> bool:
  """Whether JAX's multi-process preemption sync runs (several processes joined by
  `initialize`, with JAX's preemption service on, its default)."""
  import jax  # pylint: disable=g-import-not-at-top
  from lseg_jax import _jax_private  # pylint: disable=g-import-not-at-top
  return jax.process_count() > 1 and _jax_private.preemption_sync_enabled()
