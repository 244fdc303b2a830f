"""Small pieces of the training loop: when things are due, the metric file, the
meter and the SIGTERM / SIGINT handler.

A local metric file is appended to and synced to disk line by line; a remote one (gs://..., through
`tf.io.gfile`, wherever TensorFlow reaches it) is replaced whole (a new file renamed over the old),
since object stores have no append. Either way a kill leaves whole lines only."""
from __future__ import annotations

import json
import os
import posixpath
import signal
import threading
import time
from typing import Any

from absl import logging
import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
# Exit code of a run stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_EXIT = 130


def due(step: int, every: int | None, total: int | None = None) -> bool:
  """Whether something done every `every` steps (0/None: never, except at `total`)
  is due after step `step`."""
  return bool((every and step % every == 0) or (total is not None and step == total))


class MetricWriter:
  """metrics.jsonl (one object per step) and TensorBoard scalars; process 0 only."""

  def __init__(self, workdir: str, resume_step: int | None):
    self.enabled = jax.process_index() == 0
    self.path = posixpath.join(str(workdir), METRICS_FILE)
    self._step, self._values = None, {}
    if not self.enabled:
      return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._tf = tf
    self._local = "://" not in self.path
    # On object stores (no append) the file is rewritten whole each flush: its text
    # is kept here, so that it is never read back (process 0 is its only writer).
    self._text = ""
    if tf.io.gfile.exists(self.path):
      # Steps after the restored checkpoint are trained again: drop their old lines
      # (and a line cut short by a kill). A fresh run (resume_step None) starts empty.
      kept = []
      with tf.io.gfile.GFile(self.path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except ValueError:
            continue
          if isinstance(record, dict) and record.get("step", 1 << 62) <= (resume_step or 0):
            kept.append(json.dumps(record) + "\n")
      self._text = "".join(kept)
      self._replace(self._text)
    self._tb = tf.summary.create_file_writer(workdir)

  def write(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    if self._step is not None and step != self._step:
      self.flush()
    self._step = step
    self._values.update(values)

  def flush(self) -> None:
    if not self.enabled or self._step is None:
      return
    record = {"step": int(self._step), **{k: float(v) for k, v in self._values.items()}}
    line = json.dumps(record) + "\n"
    if self._local:  # on disk before the step's checkpoint can exist (crash consistency)
      _write_synced(self.path, "a", line)
    else:
      # GFile has no append on object stores: the file is rewritten with the new line.
      self._text += line
      self._replace(self._text)
    with self._tb.as_default(step=int(self._step)):
      for k, v in self._values.items():
        self._tf.summary.scalar(k, float(v))
    self._tb.flush()
    self._step, self._values = None, {}

  def _replace(self, text: str) -> None:
    """Writes the whole file in one piece (a new file renamed over the old one)."""
    if self._local:
      _write_synced(self.path + ".tmp", "w", text)
      os.replace(self.path + ".tmp", self.path)
    else:
      write_json(self.path, None, text)

  def close(self) -> None:
    self.flush()
    if self.enabled:
      self._tb.close()


def write_json(path: str, obj: Any, text: str | None = None) -> None:
  """Writes `obj` as JSON (or `text`) in one piece through tf.io.gfile (local or remote
  paths): a temporary file renamed over `path`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  folder, name = posixpath.split(str(path))
  if folder:
    tf.io.gfile.makedirs(folder)
  tmp = posixpath.join(folder, f".{name}.tmp")
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(json.dumps(obj, indent=2) if text is None else text)
  tf.io.gfile.rename(tmp, str(path), overwrite=True)


def _write_synced(path: str, mode: str, text: str) -> None:
  with open(path, mode, encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


class TrainMeter:
  """Averages fetched step metrics over a logging interval; times the steps."""

  def __init__(self, global_batch: int, sums: dict[str, float] | None = None):
    """sums: `sums()` of the meter at a checkpoint, for a resumed run."""
    self.global_batch = global_batch
    self.reset()
    self._t0 = None
    if sums:
      self.loss, self.correct = float(sums["loss"]), int(sums["correct"])
      self.valid, self.steps = int(sums["valid"]), int(sums["steps"])

  def sums(self) -> dict[str, float]:
    """The running sums since the last log (saved with a checkpoint)."""
    return {"loss": self.loss, "correct": self.correct, "valid": self.valid, "steps": self.steps}

  def reset(self):
    self.loss, self.correct, self.valid, self.steps = 0.0, 0, 0, 0
    self.timed_steps = 0

  def add(self, m: dict[str, np.ndarray]) -> None:
    if self._t0 is None:  # the first step of a run includes compilation: not timed
      self._t0 = time.perf_counter()
    else:
      self.timed_steps += 1
    self.loss += float(m["loss"])
    self.correct += int(m["correct"])
    self.valid += int(m["valid"])
    self.steps += 1

  def exclude(self, seconds: float) -> None:
    """Time spent outside training steps (evaluation) does not count."""
    if self._t0 is not None:
      self._t0 += seconds

  def summary(self, lr: float) -> dict[str, float]:
    out = {"train/loss": self.loss / max(self.steps, 1),
           "train/pixacc": self.correct / max(self.valid, 1), "train/lr": lr}
    now = time.perf_counter()
    if self.timed_steps:
      dt = (now - self._t0) / self.timed_steps
      out.update({"train/step_time": dt, "train/images_per_sec": self.global_batch / dt})
    self._t0 = now
    self.reset()
    return out


class Preemption:
  """SIGTERM or SIGINT (Ctrl-C) -> every process stops after the same step.

  One process: handlers turn either signal into a flag. Several processes: the signal reaches one of
  them at a time, so JAX's preemption sync manager (started by `jax.distributed.initialize`) catches
  SIGTERM on whichever process gets it and every process agrees on the step to stop after; a SIGINT
  is passed on to it as a SIGTERM of the process. `reached(step)` must be called after every step by
  every process. `interrupted` tells a SIGINT from a SIGTERM; a second SIGINT exits at once
  (code 130) without saving.
  """

  def __init__(self):
    self.requested = False
    self.interrupted = False
    self._previous = {}
    from lseg_jax import distributed  # pylint: disable=g-import-not-at-top
    self._sync = distributed.preemption_sync_enabled()

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      if not self._sync:
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
    return self

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step` (the same answer on every process)."""
    if self._sync:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping after this step.")
    self.requested = True

  def _interrupt(self, signum, frame):
    del signum, frame
    if self.interrupted:
      # os.write: no Python I/O lock can be held by the code this signal interrupted.
      os.write(2, b"error: interrupted again: stopped at once, without saving\n")
      os._exit(INTERRUPTED_EXIT)  # pylint: disable=protected-access
    self.interrupted = True
    if self._sync:
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self.requested = True

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
