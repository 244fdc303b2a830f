"""The endless, resumable per-host train stream.

Determinism and resuming: each epoch of an indexed source is a stateless
permutation of this host's example indices drawn from (seed, epoch); each
example's augmentation is seeded by (seed, host, its position in the stream).
`start_step=k` skips k * per-host-batch positions, which costs index
arithmetic only. A mixture draws its dataset choices from stateless uniforms
per block of positions (instead of `sample_from_datasets`, whose choices can't
be fast-forwarded), so the number of examples each component has used by step
k is computed without loading them. Resume is exact as long as no example was
skipped as bad before step k.
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from lseg_jax.data import bad_examples
from lseg_jax.data import preprocess
from lseg_jax.data import registry
from lseg_jax.data import source_specs
from lseg_jax.data.data_iterator import DataIterator, PipelineStats
from lseg_jax.data.data_iterator import deterministic, no_autograph
from lseg_jax.data.data_iterator import resolve_process

_MIX_BLOCK = 4096  # Positions per block of mixture choices.
_MAX_EPOCHS = 2 ** 62


def make_train_iterator(data_cfg, *, global_batch_size: int, seed: int,
                        start_step: int = 0, process_index: int | None = None,
                        process_count: int | None = None) -> DataIterator:
  """Endless per-host train batches (numpy), reshuffled every epoch.

  Args:
    data_cfg: data ConfigDict (`input_pipeline.default_data_config()`).
    global_batch_size: examples per step over all processes.
    seed: data seed; the same seed gives the same batches.
    start_step: first step to produce; the stream from step k equals the
      uninterrupted stream's batches k, k+1, ...
    process_index / process_count: this host's slice (default: jax's).

  Returns:
    DataIterator of dicts: image float32 [b, crop, crop, 3], label int32
    [b, crop, crop], label_mask bool [b, L], b = global_batch_size //
    process_count; `iterator.episodic` says whether the source is episodic.
  """
  ds, union, stats = make_train_dataset(
      data_cfg, global_batch_size=global_batch_size, seed=seed,
      start_step=start_step, process_index=process_index,
      process_count=process_count)
  process_index, process_count = resolve_process(process_index, process_count)
  return DataIterator(ds, union, stats, global_batch_size // process_count,
                      episodic=source_specs.is_episodic(data_cfg))


def make_train_dataset(data_cfg, *, global_batch_size: int, seed: int,
                       start_step: int = 0, process_index: int | None = None,
                       process_count: int | None = None):
  """The endless per-host train tf.data.Dataset and its (labels, stats).

  See `make_train_iterator`; returns (dataset, label_names, stats).
  """
  process_index, process_count = resolve_process(process_index, process_count)
  bad_examples.check_on_bad(data_cfg)
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible "
                     f"by process_count={process_count}.")
  batch = global_batch_size // process_count
  if start_step < 0:
    raise ValueError(f"start_step={start_step}; expected >= 0.")
  components, union = source_specs.build_components(data_cfg)
  stats = PipelineStats()
  start = start_step * batch
  if len(components) > 1:
    choices = _mixture_choices([c.weight for c in components],
                               _seed_int(seed, 1))
    starts = _mixture_counts(choices, len(components), start)
  else:
    starts = [start]

  streams = []
  for i, (comp, comp_start) in enumerate(zip(components, starts)):
    comp_seed = _seed_int(seed, 2, i)
    if comp.source.is_indexed:
      index_ds = _index_stream(comp.source, comp_seed, comp_start,
                               process_index, process_count)
      ds = bad_examples.indexed_examples(comp.source, index_ds, data_cfg,
                                         stats)
    else:
      ds = bad_examples.streamed_examples(
          comp.source, data_cfg, stats, process_index=process_index,
          process_count=process_count, shuffle_seed=comp_seed,
          start=comp_start)
    augment = _augment_fn(data_cfg, comp, len(union),
                          _seed_int(seed, 3, i, process_index))
    streams.append(ds.map(no_autograph(augment),
                          num_parallel_calls=data_cfg.num_parallel_calls,
                          deterministic=True))

  if len(streams) == 1:
    ds = streams[0]
  else:
    first_block, offset = divmod(start, _MIX_BLOCK)
    choice_ds = tf.data.Dataset.range(first_block, _MAX_EPOCHS).map(
        no_autograph(lambda block: tf.cast(choices(block), tf.int64)))
    choice_ds = choice_ds.unbatch().skip(offset)
    ds = tf.data.Dataset.choose_from_datasets(streams, choice_ds)
  ds = ds.batch(batch, drop_remainder=True)
  ds = ds.prefetch(data_cfg.prefetch)
  return deterministic(ds), union, stats


def _augment_fn(data_cfg, comp: source_specs.Component, union_size: int,
                aug_seed: int):
  """Raw example -> {image, label, label_mask}, augmented from its position."""
  crop, base = data_cfg.crop_size, data_cfg.base_size
  scale_range, flip = tuple(data_cfg.scale_range), bool(data_cfg.flip)

  def augment(ex):
    ex_seed = tf.stack([tf.constant(aug_seed, tf.int64), ex["_position"]])
    image, mask = preprocess.train_augment(
        ex["image"], ex["mask"], ex_seed, crop_size=crop, base_size=base,
        scale_range=scale_range, flip=flip)
    label, label_mask = comp.to_table(mask, ex.get("class_index"), union_size)
    return {"image": image, "label": label, "label_mask": label_mask}
  return augment


def _seed_int(*values) -> int:
  """A 63-bit integer derived from the given integers (stable across runs)."""
  state = np.random.SeedSequence([int(v) for v in values]).generate_state(
      2, np.uint32)
  return int((int(state[0]) << 31) ^ int(state[1]))


def _index_stream(source: registry.Source, seed, start, process_index,
                  process_count):
  """Endless (position, index) dataset from position `start` on (this host).

  Epoch e visits this host's indices in the permutation drawn from
  (seed, e); the skip within the start epoch touches indices only.
  """
  host = tf.constant(source.host_indices(process_index, process_count))
  n = int(host.shape[0])
  if n == 0:
    raise ValueError(f"Process {process_index} of {process_count} gets no "
                     f"examples from a source with {source.num_examples}.")
  epoch_seed = tf.constant(seed, tf.int64)

  def epoch(e):
    perm = tf.random.experimental.stateless_shuffle(
        host, seed=tf.stack([epoch_seed, e]))
    return tf.data.Dataset.from_tensor_slices(perm)
  indices = tf.data.Dataset.range(start // n, _MAX_EPOCHS).flat_map(
      no_autograph(epoch))
  indices = indices.skip(start % n)
  positions = tf.data.Dataset.range(start, _MAX_EPOCHS)
  return tf.data.Dataset.zip(positions, indices)


def _mixture_choices(weights, seed):
  """Block b -> int32 [_MIX_BLOCK] component choices, a pure function of b."""
  cum = tf.constant(np.cumsum(weights) / np.sum(weights), tf.float32)

  def choices(block):
    u = tf.random.stateless_uniform([_MIX_BLOCK],
                                    tf.stack([tf.constant(seed, tf.int64),
                                              block]))
    c = tf.searchsorted(cum, u, side="right", out_type=tf.int32)
    return tf.minimum(c, len(weights) - 1)
  return choices


def _mixture_counts(choices, num_components, start) -> list[int]:
  """How many of positions [0, start) chose each component."""
  full, rest = divmod(start, _MIX_BLOCK)
  counts = np.zeros(num_components, np.int64)
  if full:
    counts += tf.data.Dataset.range(full).map(no_autograph(choices)).reduce(
        tf.zeros(num_components, tf.int64),
        no_autograph(lambda acc, c: acc + tf.math.bincount(
            c, minlength=num_components, maxlength=num_components,
            dtype=tf.int64))).numpy()
  if rest:
    c = choices(tf.constant(full, tf.int64))[:rest].numpy()
    counts += np.bincount(c, minlength=num_components)
  return [int(x) for x in counts]


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Whole steps in one epoch of `num_examples` (for schedules and logs)."""
  return max(1, math.floor(num_examples / global_batch_size))
