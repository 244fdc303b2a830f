"""What the train and eval streams share: the iterator they return, its parts.

`DataIterator` yields a tf.data pipeline's batches as numpy dicts and carries
what callers need besides them: the label table, whether the source is
episodic, the batch size and the bad examples seen (`PipelineStats`).
"""
from __future__ import annotations

import jax
import numpy as np
import tensorflow as tf

from lseg_jax.data import registry
from lseg_jax.data.bad_examples import BadExampleError


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(process_index, process_count), each defaulting to jax's."""
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  registry.check_process(process_index, process_count)
  return process_index, process_count


class DataIterator:
  """Iterator of numpy batches of a tf.data.Dataset, with the batch label table
  (`label_names`; ["other", *classes] for zero-shot episodes, `episodic`), this host's
  `batch_size`, `num_batches` in one pass (None: the endless train stream) and the
  bad-example counts (`stats`)."""

  def __init__(self, dataset, label_names, stats, batch_size,
               num_batches=None, *, episodic: bool = False):
    self.dataset = dataset
    self.label_names = label_names
    self.stats = stats
    self.batch_size = batch_size
    self.num_batches = num_batches
    self.episodic = episodic
    self._it = None

  @property
  def num_skipped(self) -> int:
    return self.stats.num_skipped

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = self.dataset.as_numpy_iterator()
    # A bad example ends its stream (bad_examples.py) with its error recorded: what
    # follows it (the stream's end, a short batch, eval padding) is never data.
    try:
      batch = next(self._it)
    except StopIteration:
      if self.stats.error is None:
        raise
    except tf.errors.OpError as e:
      if self.stats.error is None:
        # The assertion's own text, without TF's op and stack decorations.
        first = e.message.strip().splitlines()[0]
        raise BadExampleError(first.replace("assertion failed: ", "").strip("[] ")) from e
    if self.stats.error is not None:
      raise self.stats.error from None
    return batch
