"""The endless, resumable per-host train stream.

Determinism and resuming: the global batch of step s is a function of (seed, s) alone,
whatever the number of processes: step s holds positions [s * B, (s + 1) * B) of one global
stream (B = global batch) and process i of N keeps rows [i * B / N, (i + 1) * B / N) of it, so
losses, and a resume onto another process count, do not depend on the topology. Each epoch of
an indexed source is a stateless permutation of all its example indices drawn from (seed,
epoch); the rows of other processes are skipped as indices, before anything is read. Each
example's augmentation is seeded by (seed, its global position). `start_step=k` skips k * B
positions, which costs index arithmetic only. Sources without index access are read whole by
every process, which keeps its own rows. A mixture draws its dataset choices from stateless
uniforms per block of positions (instead of `sample_from_datasets`, whose choices can't be
fast-forwarded), so the number of examples each component has used by step k is computed
without loading them. Resume is exact as long as no example was skipped as bad before step k.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from lseg_jax.data import bad_examples
from lseg_jax.data import preprocess
from lseg_jax.data import registry
from lseg_jax.data import source_specs
from lseg_jax.data.bad_examples import PipelineStats
from lseg_jax.data.data_iterator import DataIterator, resolve_process
from lseg_jax.data.tfdata import deterministic, no_autograph

_MIX_BLOCK = 4096  # Positions per block of mixture choices.
_MAX_EPOCHS = 2 ** 62


def make_train_iterator(data_cfg, *, global_batch_size: int, seed: int,
                        start_step: int = 0, process_index: int | None = None,
                        process_count: int | None = None) -> DataIterator:
  """Endless per-host train batches (numpy; the data contract in `lseg_jax.data`) of
  global_batch_size // process_count examples, reshuffled every epoch, from
  `start_step` on (equal to the uninterrupted stream's batches from there); the process
  slice defaults to JAX's."""
  ds, union, stats = make_train_dataset(
      data_cfg, global_batch_size=global_batch_size, seed=seed, start_step=start_step,
      process_index=process_index, process_count=process_count)
  process_index, process_count = resolve_process(process_index, process_count)
  return DataIterator(ds, union, stats, global_batch_size // process_count,
                      episodic=source_specs.is_episodic(data_cfg))


def make_train_dataset(data_cfg, *, global_batch_size: int, seed: int, start_step: int = 0,
                       process_index: int | None = None, process_count: int | None = None):
  """(endless per-host train tf.data.Dataset, label names, stats): `make_train_iterator`."""
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
  # Global positions: step s is positions [s * B, (s + 1) * B) of one stream that
  # depends on the seed alone; this process keeps rows [i * b, (i + 1) * b) of each.
  start = start_step * global_batch_size
  if len(components) > 1:
    choices = _mixture_choices([c.weight for c in components], _seed_int(seed, 1))
    starts = _mixture_counts(choices, len(components), start)
    first_block, offset = divmod(start, _MIX_BLOCK)
    choice_ds = tf.data.Dataset.range(first_block, _MAX_EPOCHS).map(
        no_autograph(lambda block: tf.cast(choices(block), tf.int64)))
    choice_ds = choice_ds.unbatch().skip(offset)
  else:
    starts = [start]
    choice_ds = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).repeat()
  owners = tf.data.Dataset.zip(tf.data.Dataset.range(start, _MAX_EPOCHS),
                               choice_ds).map(no_autograph(
      lambda pos, comp: (pos, comp,
                         (pos % global_batch_size) // batch == process_index)))

  streams = []
  for i, (comp, comp_start) in enumerate(zip(components, starts)):
    comp_seed = _seed_int(seed, 2, i)
    # (global position, mine) of every position that chose this component.
    slots = owners.filter(no_autograph(lambda pos, c, mine, i=i: tf.equal(c, i)))
    slots = slots.map(no_autograph(lambda pos, c, mine: (pos, mine)))
    if comp.source.is_indexed:
      index_ds = tf.data.Dataset.zip(_index_stream(comp.source, comp_seed, comp_start), slots)
      index_ds = index_ds.filter(no_autograph(lambda item, slot: slot[1])).map(
          no_autograph(lambda item, slot: (slot[0], item[1])))
      ds = bad_examples.indexed_examples(comp.source, index_ds, data_cfg, stats)
    else:
      # No index access: every process reads the whole stream and keeps its rows.
      ds = bad_examples.streamed_examples(
          comp.source, data_cfg, stats, process_index=0, process_count=1,
          shuffle_seed=comp_seed, start=comp_start)
      ds = tf.data.Dataset.zip(ds, slots).filter(
          no_autograph(lambda ex, slot: slot[1])).map(
              no_autograph(lambda ex, slot: dict(ex, _position=slot[0])))
    augment = _augment_fn(data_cfg, comp, len(union), _seed_int(seed, 3, i))
    streams.append(ds.map(no_autograph(augment), num_parallel_calls=data_cfg.num_parallel_calls,
                          deterministic=True))

  if len(streams) == 1:
    ds = streams[0]
  else:
    mine = owners.filter(no_autograph(lambda pos, c, mine: mine)).map(
        no_autograph(lambda pos, c, mine: c))
    ds = tf.data.Dataset.choose_from_datasets(streams, mine)
  ds = ds.batch(batch, drop_remainder=True)
  ds = ds.prefetch(data_cfg.prefetch)
  return deterministic(ds), union, stats


def _augment_fn(data_cfg, comp: source_specs.Component, union_size: int, aug_seed: int):
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
  state = np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint32)
  return int((int(state[0]) << 31) ^ int(state[1]))


def _index_stream(source: registry.Source, seed, start):
  """Endless (position, index) dataset of a source from position `start` on: epoch e
  visits the permutation drawn from (seed, e); the skip touches indices only."""
  host = tf.constant(source.host_indices(0, 1))
  n = int(host.shape[0])
  if n == 0:
    raise ValueError(f"{type(source).__name__} has no examples to train on.")
  epoch_seed = tf.constant(seed, tf.int64)

  def epoch(e):
    perm = tf.random.experimental.stateless_shuffle(host, seed=tf.stack([epoch_seed, e]))
    return tf.data.Dataset.from_tensor_slices(perm)
  indices = tf.data.Dataset.range(start // n, _MAX_EPOCHS).flat_map(no_autograph(epoch))
  indices = indices.skip(start % n)
  positions = tf.data.Dataset.range(start, _MAX_EPOCHS)
  return tf.data.Dataset.zip(positions, indices)


def _mixture_choices(weights, seed):
  """Block b -> int32 [_MIX_BLOCK] component choices, a pure function of b."""
  cum = tf.constant(np.cumsum(weights) / np.sum(weights), tf.float32)

  def choices(block):
    u = tf.random.stateless_uniform([_MIX_BLOCK], tf.stack([tf.constant(seed, tf.int64), block]))
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
