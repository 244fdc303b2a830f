"""Host batches -> global device arrays, and keeping transfers ahead.

Each process reads its own slice of every batch (`make_*_iterator`); `to_global` joins the slices
into global `jax.Array`s with `jax.make_array_from_process_local_data`, so device computations see
the global batch.
"""
from __future__ import annotations

import collections
import itertools
from typing import Iterator

import jax


def to_global(batch, sharding):
  """Per-host pytree of numpy arrays [b, ...] -> global jax.Arrays [process_count * b, ...]
  with `sharding` (of the global batch, e.g. `sharding.batch_sharding(mesh)`)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def prefetch_to_device(iterator: Iterator, size: int, sharding) -> Iterator:
  """Keeps `size` batches transferred (to_global) ahead of the consumer."""
  if size < 1:
    raise ValueError(f"prefetch size={size}; expected >= 1.")
  queue = collections.deque()
  iterator = iter(iterator)

  def enqueue(n):
    for batch in itertools.islice(iterator, n):
      queue.append(to_global(batch, sharding))
  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
