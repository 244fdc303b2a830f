"""The bad-example guard: every raw example reaches a pipeline through it.

An undecodable image, or a mask whose size differs from its image's, is a *bad* example: with
`data_cfg.on_bad_example == "error"` it raises a `BadExampleError` naming the file, with "skip" it
is dropped, counted in the pipeline's `PipelineStats` and logged. A mask value outside
[0, num_labels) other than -1 (ignore) always raises.

An error ends the stream where it happened instead of failing a tf.data op: TensorFlow would print
the error, with a Python traceback, from each input thread it reaches. `DataIterator` raises the
recorded error instead.

Two readers apply the guard: `indexed_examples` (sources with `load(index)`, where each load is
confined so that one corrupt file can be named) and `streamed_examples` (sources without index
access). Both yield checked raw examples with an int64 `_position` (the example's place in the
stream).
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
_LOAD_FAILED = "reading or decoding it failed"
# The text of a failed tf.debugging.Assert of the decoder (our own message).
_SUMMARIZED = re.compile(r"Summarized data: b['\"](.*?)['\"]\s*$", re.S)


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
  """(position, index) int64 pairs of an indexed source -> its good raw examples, in
  order, plus `_position`; skipped ones are counted in `stats`."""
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
  return _keep_good(ds, source, data_cfg, stats)


def streamed_examples(source: registry.Source, data_cfg, stats: PipelineStats, *,
                      process_index: int, process_count: int, shuffle_seed: int | None = None,
                      start: int = 0) -> tf.data.Dataset:
  """This host's good raw examples (plus `_position`) of a source without index access,
  from position `start` (the examples before it are decoded and dropped): one pass in the
  source's order, or with a `shuffle_seed` an endless stream reshuffled every pass."""
  ds = source.as_dataset(process_index=process_index, process_count=process_count,
                         shuffle=shuffle_seed is not None, seed=shuffle_seed or 0)
  if shuffle_seed is not None:
    ds = ds.shuffle(data_cfg.shuffle_buffer, seed=shuffle_seed,
                    reshuffle_each_iteration=True).repeat()
  if start:
    logging.warning("Resuming a %s stream at example %d by reading and "
                    "dropping the examples before it.", type(source).__name__, start)
  ds = tf.data.Dataset.zip(tf.data.Dataset.counter(), ds).skip(start)
  num_labels = num_mask_values(source)

  def mark(pos, ex):
    ex = dict(ex, _position=pos, _index=pos, _ok=tf.constant(True), _reason=tf.constant(""))
    return _check_example(ex, num_labels)
  ds = ds.map(no_autograph(mark))
  return _keep_good(ds, source, data_cfg, stats)


def _zeros_like_spec(spec):
  shape = [0 if d is None else d for d in spec.shape.as_list()]
  if spec.dtype == tf.string:
    return tf.fill(shape, "")
  return tf.zeros(shape, spec.dtype)


def _guarded_load(source: registry.Source):
  """index -> 1-element dataset: the example, or a marker if loading failed (a nested
  dataset's ignore_errors confines a decode error to its example, so it can be named)."""
  spec = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).map(
      no_autograph(source.load)).element_spec

  def good(index):
    ex = dict(source.load(index))
    ex.update(_index=index, _ok=tf.constant(True), _reason=tf.constant(""))
    return ex

  def bad(index):
    ex = {k: _zeros_like_spec(s) for k, s in spec.items()}
    ex.update(file_name=source.file_name(index), _index=index, _ok=tf.constant(False),
              _reason=tf.constant(_LOAD_FAILED))
    return ex

  def load(index):
    ok = tf.data.Dataset.from_tensors(index).map(no_autograph(good)).ignore_errors()
    marker = tf.data.Dataset.from_tensors(index).map(no_autograph(bad))
    return ok.concatenate(marker).take(1)
  return load


def _check_example(ex, num_labels):
  """Flags size mismatches (bad) and out-of-range mask values (always fatal)."""
  img_hw, mask_hw = tf.shape(ex["image"])[:2], tf.shape(ex["mask"])
  same = tf.reduce_all(tf.equal(img_hw, mask_hw))
  mismatch = tf.logical_and(ex["_ok"], tf.logical_not(same))
  reason = tf.where(mismatch, tf.strings.format(
      "its mask has size {} but its image has size {}; expected the same height and "
      "width", (mask_hw, img_hw)), ex["_reason"])
  mask = ex["mask"]
  checkable = tf.logical_and(ex["_ok"], same)
  has_bad_value = tf.logical_and(checkable, tf.logical_or(
      tf.reduce_any(mask < IGNORE_INDEX), tf.reduce_any(mask >= num_labels)))
  high, low = tf.reduce_max(mask), tf.reduce_min(mask)
  bad_value = tf.where(high >= num_labels, high, low)
  ex = dict(ex, _fatal=has_bad_value, _reason=reason, _bad_value=bad_value,
            _num_labels=tf.constant(num_labels, tf.int32))
  ex["_ok"] = tf.logical_and(checkable, tf.logical_not(has_bad_value))
  return ex


def _keep_good(ds, source, data_cfg, stats: PipelineStats) -> tf.data.Dataset:
  """The good examples of `ds`; a bad one is counted (skip) or ends the stream
  with `stats.error` set (error, or a fatal one)."""
  handle = _bad_example_handler(source, data_cfg, stats)

  def verdict(ex):
    # 0 keep, 1 skip, 2 stop. Bad examples only reach Python (in stream order: this
    # map is sequential).
    code = tf.cond(
        ex["_ok"], lambda: tf.constant(0, tf.int32),
        lambda: tf.py_function(handle, [ex["_index"], ex["file_name"], ex["_reason"],
                                        ex["_fatal"], ex["_bad_value"],
                                        ex["_num_labels"]], tf.int32))
    return dict(ex, _verdict=code)
  ds = ds.map(no_autograph(verdict))
  ds = ds.take_while(no_autograph(lambda ex: ex["_verdict"] < 2))
  ds = ds.filter(no_autograph(lambda ex: ex["_verdict"] == 0))
  return ds.map(no_autograph(lambda ex: {
      k: v for k, v in ex.items() if k not in ("_verdict", "_bad_value", "_num_labels")}))


def _bad_example_handler(source, data_cfg, stats: PipelineStats):
  """(bad example's fields) -> 1 (skip it) or 2 (stop: stats.error is set)."""
  on_bad = data_cfg.on_bad_example

  def handle(index, file_name, reason, fatal, bad_value, num_labels):
    file_name = file_name.numpy().decode("utf-8", "replace")
    reason = reason.numpy().decode("utf-8", "replace")
    if fatal.numpy():  # out of range: said in the value convention of the source's files
      n, ignore = int(num_labels.numpy()), getattr(source, "mask_ignore", None)
      expected = (f"below {n} or the dataset's ignore value" if ignore is None else
                  f"0-{n - 1} ({n} labels) or {ignore} for ignore")
      reason = (f"its mask has value {int(bad_value.numpy())} outside [0, {n}); expected a "
                f"label index {expected}")
    if fatal.numpy() or on_bad == "error":
      if not fatal.numpy() and source.is_indexed and reason == _LOAD_FAILED:
        reason = _load_error_reason(source, index, file_name)
      if stats.error is None:
        stats.error = BadExampleError(
            f"Bad example {file_name!r}: {reason}." + (
                "" if fatal.numpy() else
                " Set data_cfg.on_bad_example='skip' to skip such examples."))
      return 2
    stats.num_skipped += 1
    stats.skipped.append(file_name)
    logging.warning("Skipping bad example %r: %s (%d skipped so far).",
                    file_name, reason, stats.num_skipped)
    return 1
  return handle


def _load_error_reason(source, index, file_name: str) -> str:
  """Reruns a failed load eagerly to say what is wrong with the example's files."""
  try:
    source.load(tf.constant(index, tf.int64))
  except tf.errors.OpError as e:
    # A tf.debugging.Assert of the decoder carries our own text ("Mask of FILE is ...").
    summarized = _SUMMARIZED.search(e.message.strip())
    if summarized:
      text = summarized.group(1)
      for prefix in (f"Mask of {file_name} ", "Mask of "):
        if text.startswith(prefix):
          return "its mask " + text[len(prefix):].rstrip(".")
      return text.rstrip(".")
    first_line = e.message.strip().splitlines()[0]
    message = re.sub(r"\{\{.*?\}\}|\[Op:.*$", "", first_line).strip().rstrip(".")
    return (f"{_LOAD_FAILED} ({message}); expected an image Pillow reads (JPEG, PNG, GIF, "
            "BMP, WebP, TIFF, ...) and a PNG mask")
  return _LOAD_FAILED
