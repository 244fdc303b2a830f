"""The bad-example guard: every raw example reaches a pipeline through it.

An undecodable image, or a mask whose size differs from its image's, is a
*bad* example: with `data_cfg.on_bad_example == "error"` it raises a
`BadExampleError` naming the file, with "skip" it is dropped, counted in the
pipeline's `PipelineStats` and logged. A mask value outside
[0, num_labels) other than -1 (ignore) always raises.

Two readers apply the guard: `indexed_examples` (sources with `load(index)`,
where each load is confined so that one corrupt file can be named) and
`streamed_examples` (sources without index access). Both yield checked raw
examples with an int64 `_position` (the example's place in the stream).
"""
from __future__ import annotations

import dataclasses
import re

from absl import logging
import tensorflow as tf

from lseg_jax.data import registry
from lseg_jax.data.source_specs import num_mask_values
from lseg_jax.data.tfdata import no_autograph
from lseg_jax.errors import UserError
from lseg_jax.labels import IGNORE_INDEX

ON_BAD = ("error", "skip")


class BadExampleError(UserError):
  """A corrupt or inconsistent example (the message names the file)."""


@dataclasses.dataclass
class PipelineStats:
  """Bad examples seen by one pipeline (counted as tf.data reaches them)."""
  num_skipped: int = 0
  skipped: list[str] = dataclasses.field(default_factory=list)
  error: Exception | None = None


def check_on_bad(data_cfg):
  """Raises a ValueError unless data_cfg.on_bad_example is one of ON_BAD."""
  if data_cfg.on_bad_example not in ON_BAD:
    raise ValueError(f"data_cfg.on_bad_example={data_cfg.on_bad_example!r}; "
                     f"expected one of {ON_BAD}.")


def indexed_examples(source: registry.Source, index_ds: tf.data.Dataset,
                     data_cfg, stats: PipelineStats) -> tf.data.Dataset:
  """(position, index) int64 pairs -> the good raw examples, in order.

  Args:
    source: an indexed source.
    index_ds: dataset of (position, index) int64 scalars.
    data_cfg: data ConfigDict (reads num_parallel_calls, on_bad_example).
    stats: where skipped examples are counted.

  Returns:
    Raw examples (`image` uint8 [H, W, 3], `mask` int32 [H, W], ...) plus
    `_position`.
  """
  num_calls = data_cfg.num_parallel_calls
  load = _guarded_load(source)
  ds = index_ds.interleave(
      no_autograph(lambda pos, idx: load(idx).map(
          no_autograph(lambda ex: dict(ex, _position=pos)))),
      cycle_length=max(num_calls, 1) if num_calls > 0 else None,
      num_parallel_calls=num_calls, deterministic=True)
  num_labels = num_mask_values(source)
  ds = ds.map(no_autograph(lambda ex: _check_example(ex, num_labels)),
              num_parallel_calls=num_calls, deterministic=True)
  return ds.filter(no_autograph(_bad_example_filter(source, data_cfg, stats)))


def streamed_examples(source: registry.Source, data_cfg, stats: PipelineStats,
                      *, process_index: int, process_count: int,
                      shuffle_seed: int | None = None,
                      start: int = 0) -> tf.data.Dataset:
  """This host's good raw examples of a source without index access.

  Args:
    source: a source whose `as_dataset` streams its examples.
    data_cfg: data ConfigDict (reads shuffle_buffer, on_bad_example).
    stats: where skipped examples are counted.
    process_index / process_count: this host's slice.
    shuffle_seed: None: one pass in the source's order. Otherwise an endless
      stream, reshuffled (`shuffle_buffer`) every pass from this seed.
    start: the first position to yield; skipping decodes the examples before
      it.

  Returns:
    Raw examples plus `_position`.
  """
  ds = source.as_dataset(process_index=process_index,
                         process_count=process_count,
                         shuffle=shuffle_seed is not None,
                         seed=shuffle_seed or 0)
  if shuffle_seed is not None:
    ds = ds.shuffle(data_cfg.shuffle_buffer, seed=shuffle_seed,
                    reshuffle_each_iteration=True).repeat()
  if start:
    logging.warning("Resuming a %s stream at example %d by reading and "
                    "dropping the examples before it.", type(source).__name__,
                    start)
  ds = tf.data.Dataset.zip(tf.data.Dataset.counter(), ds).skip(start)
  num_labels = num_mask_values(source)

  def mark(pos, ex):
    ex = dict(ex, _position=pos, _index=pos, _ok=tf.constant(True),
              _reason=tf.constant(""))
    return _check_example(ex, num_labels)
  ds = ds.map(no_autograph(mark))
  return ds.filter(no_autograph(_bad_example_filter(source, data_cfg, stats)))


def _zeros_like_spec(spec):
  shape = [0 if d is None else d for d in spec.shape.as_list()]
  if spec.dtype == tf.string:
    return tf.fill(shape, "")
  return tf.zeros(shape, spec.dtype)


def _guarded_load(source: registry.Source):
  """index -> 1-element dataset: the example, or a marker if loading failed.

  Nested datasets confine a decode error to its own example (ignore_errors),
  so a corrupt file can be named, skipped or reported instead of killing the
  whole pipeline with an anonymous error.
  """
  spec = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).map(
      no_autograph(source.load)).element_spec

  def good(index):
    ex = dict(source.load(index))
    ex.update(_index=index, _ok=tf.constant(True), _reason=tf.constant(""))
    return ex

  def bad(index):
    ex = {k: _zeros_like_spec(s) for k, s in spec.items()}
    ex.update(file_name=source.file_name(index), _index=index,
              _ok=tf.constant(False),
              _reason=tf.constant("reading or decoding it failed"))
    return ex

  def load(index):
    ok = tf.data.Dataset.from_tensors(index).map(
        no_autograph(good)).ignore_errors()
    marker = tf.data.Dataset.from_tensors(index).map(no_autograph(bad))
    return ok.concatenate(marker).take(1)
  return load


def _check_example(ex, num_labels):
  """Flags size mismatches (bad) and out-of-range mask values (always fatal)."""
  img_hw, mask_hw = tf.shape(ex["image"])[:2], tf.shape(ex["mask"])
  same = tf.reduce_all(tf.equal(img_hw, mask_hw))
  mismatch = tf.logical_and(ex["_ok"], tf.logical_not(same))
  reason = tf.where(mismatch, tf.strings.format(
      "its mask has size {} but its image has size {}", (mask_hw, img_hw)),
      ex["_reason"])
  mask = ex["mask"]
  checkable = tf.logical_and(ex["_ok"], same)
  has_bad_value = tf.logical_and(checkable, tf.logical_or(
      tf.reduce_any(mask < IGNORE_INDEX), tf.reduce_any(mask >= num_labels)))
  high, low = tf.reduce_max(mask), tf.reduce_min(mask)
  bad_value = tf.where(high >= num_labels, high, low)
  reason = tf.where(has_bad_value, tf.strings.format(
      "its mask has value {} outside [0, {}) (ignore is -1)",
      (bad_value, num_labels)), reason)
  ex = dict(ex, _fatal=has_bad_value, _reason=reason)
  ex["_ok"] = tf.logical_and(checkable, tf.logical_not(has_bad_value))
  return ex


def _bad_example_filter(source, data_cfg, stats: PipelineStats):
  """Predicate keeping good examples; bad ones are counted or raise."""
  on_bad = data_cfg.on_bad_example

  def handle(index, file_name, reason, fatal):
    file_name = file_name.numpy().decode("utf-8", "replace")
    reason = reason.numpy().decode("utf-8", "replace")
    if fatal.numpy() or on_bad == "error":
      if not fatal.numpy() and source.is_indexed:
        reason += _load_error_detail(source, index)
      stats.error = BadExampleError(
          f"Bad example {file_name!r}: {reason}." + (
              "" if fatal.numpy() else
              " Set data_cfg.on_bad_example='skip' to skip such examples."))
      raise stats.error
    stats.num_skipped += 1
    stats.skipped.append(file_name)
    logging.warning("Skipping bad example %r: %s (%d skipped so far).",
                    file_name, reason, stats.num_skipped)
    return False

  def keep(ex):
    return tf.cond(
        ex["_ok"], lambda: tf.constant(True),
        lambda: tf.py_function(handle, [ex["_index"], ex["file_name"],
                                        ex["_reason"], ex["_fatal"]], tf.bool))
  return keep


def _load_error_detail(source, index) -> str:
  """Reruns a failed load eagerly to report the underlying TF error."""
  try:
    source.load(tf.constant(index, tf.int64))
  except tf.errors.OpError as e:
    first_line = e.message.strip().splitlines()[0]
    message = re.sub(r"\{\{.*?\}\}|\[Op:.*$", "", first_line)
    return f" ({message.strip()})"
  return ""
