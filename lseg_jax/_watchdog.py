"""The heartbeat watchdog of a multi-process job (started by `lseg_jax.distributed`)."""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time

from absl import logging

_KEY = "lseg_jax/watchdog"


class Watchdog(threading.Thread):
  """A heartbeat per process in the coordination service's key-value store.

  Each process increments its counter every `timeout / 6` seconds and watches the
  others'. A process whose counter does not move for `timeout` seconds is lost (killed,
  its machine gone); one that exited (its exit key is set) while this process still
  runs after `timeout` more seconds, without having called `mark("done")`, has left
  this one alone. Either way this process prints which process was lost and how to
  resume, and exits with `exit_code`: nothing waits forever in a collective.
  """

  def __init__(self, client, index: int, count: int, timeout: float, exit_code: int):
    super().__init__(name="lseg-watchdog", daemon=True)
    self.client = client
    self.index, self.count, self.timeout = index, count, timeout
    self.exit_code = exit_code
    self._stop_event = threading.Event()
    atexit.register(self.mark_exited)

  def mark_exited(self):
    """Tells the other processes that this one is leaving (atexit)."""
    self._stop_event.set()
    self.mark("exited")

  def mark(self, what: str):
    try:
      self.client.key_value_set(f"{_KEY}/{what}/{self.index}", "1", allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass

  def run(self):
    interval = max(0.5, self.timeout / 6)
    now = time.monotonic()
    seen = {i: (-1, now) for i in range(self.count) if i != self.index}
    exited_since: dict[int, float] = {}
    failing_since = None
    while not self._stop_event.wait(interval):
      now = time.monotonic()
      try:
        beats, exited, finished = self._read()
        failing_since = None
      except Exception as e:  # pylint: disable=broad-except
        if self._stop_event.is_set():
          return
        failing_since = failing_since or now
        if now - failing_since > self.timeout:
          self._lost(0, f"the coordination service on process 0 is unreachable "
                        f"({str(e).splitlines()[0][:200]})")
        continue
      for i, (last, since) in seen.items():
        if i in finished:
          continue
        beat = int(beats.get(f"{_KEY}/beat/{i}", -1))
        if beat != last:
          seen[i] = (beat, now)
        if i in exited:
          exited_since.setdefault(i, now)
          if now - exited_since[i] > self.timeout:
            self._lost(i, f"it exited {now - exited_since[i]:.0f} s ago while this "
                          "process still runs")
        elif now - seen[i][1] > self.timeout:
          self._lost(i, f"no heartbeat for {now - seen[i][1]:.0f} s (killed, or its "
                        "machine was lost)")

  def _read(self):
    """Beats once; returns (beats by key, exited processes, finished processes)."""
    self.client.key_value_increment(f"{_KEY}/beat/{self.index}", 1)
    beats = dict(self.client.key_value_dir_get(f"{_KEY}/beat/"))
    exited, finished = ({int(k.rsplit("/", 1)[1])
                         for k, _ in self.client.key_value_dir_get(f"{_KEY}/{what}/")}
                        for what in ("exited", "done"))
    return beats, exited, finished

  def _lost(self, i: int, why: str):
    if self._stop_event.is_set():
      return
    message = (f"error: process {i} of {self.count} was lost: {why}. Process {self.index} "
               f"stops (exit code {self.exit_code}). Rerun the same command for all "
               f"{self.count} processes to resume from the last complete checkpoint.")
    logging.error(message)
    print(message, file=sys.stderr, flush=True)
    os._exit(self.exit_code)  # pylint: disable=protected-access
