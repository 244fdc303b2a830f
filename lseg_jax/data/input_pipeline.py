"""Per-host tf.data input pipelines: train (endless, resumable) and eval.

Batches follow the data contract in `lseg_jax.data`: `image` float32
[B, H, W, 3], `label` int32 [B, H, W] indexing `label_table(data_cfg)`
(-1 = ignore), `label_mask` bool [B, L]; eval batches add `valid` bool [B],
`image_size` int32 [B, 2] (true (h, w) before padding) and, for episodes,
`class_index` int32 [B].

Data config fields (`ml_collections.ConfigDict`; `default_data_config()`):
  name ("synthetic"): registered source name, or "mix" for a mixture.
  data_dir (None): passed to the source factory when set.
  split ("train"): the training split.
  eval_split ("validation"): the evaluation split.
  source_kwargs ({}): extra keyword arguments for the source factory.
  fold (None): fold of an episodic (zero-shot) source; passed when set.
  mixture (()): for name == "mix", a list of dicts
    {"name": ..., "weight": ..., ["split": ..., "eval_split": ...,] **kwargs}
    (kwargs go to that source's factory; data_dir/fold default to the above).
  crop_size (480): side of the square training crop.
  base_size (520): long side of the image at scale 1.
  scale_range ((0.5, 2.0)): random long side is drawn from
    [base_size * lo, base_size * hi].
  flip (True): random horizontal flips (see `preprocess`).
  eval_resize ("none"): "none" | "long_side" | "center_crop" | "square", see
    `preprocess` ("square" is HSNet's few-shot protocol).
  eval_pad_to (None): (h, w) eval images are padded to with eval_resize
    "none" (None = the largest image of each batch; set it to keep shapes
    static under jit). Larger images raise an error naming the file.
  on_bad_example ("error"): "error" | "skip". An undecodable image or a mask
    whose size differs from its image raises an error naming the file, or is
    skipped, counted (`iterator.num_skipped`) and logged. Mask values outside
    [0, num_labels) other than -1 always raise an error.
  shuffle_buffer (10_000): shuffle buffer for sources without index access.
  num_parallel_calls (-1 = AUTOTUNE): parallelism of loading/augmentation.
  prefetch (2): batches prefetched by tf.data.

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

import collections
import dataclasses
import itertools
import math
import re
from typing import Any, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from lseg_jax.data import preprocess
from lseg_jax.data import registry

IGNORE_INDEX = preprocess.IGNORE_INDEX
OTHER_LABEL = "other"
_ON_BAD = ("error", "skip")
_MIX_BLOCK = 4096  # Positions per block of mixture choices.
_MAX_EPOCHS = 2 ** 62
# Our dataset functions use no Python control flow on tensors; skipping
# AutoGraph's conversion saves seconds per pipeline.
_fn = tf.autograph.experimental.do_not_convert


def default_data_config() -> ml_collections.ConfigDict:
  """The data config with every field this module reads, at its default."""
  return ml_collections.ConfigDict(dict(
      name="synthetic", data_dir=None, split="train", eval_split="validation",
      source_kwargs={}, fold=None, mixture=(), crop_size=480, base_size=520,
      scale_range=(0.5, 2.0), flip=True, eval_resize="none", eval_pad_to=None,
      on_bad_example="error", shuffle_buffer=10_000, num_parallel_calls=-1,
      prefetch=2))


def _get(cfg, key):
  value = cfg.get(key, None) if hasattr(cfg, "get") else None
  return default_data_config()[key] if value is None else value


class BadExampleError(ValueError):
  """A corrupt or inconsistent example (the message names the file)."""


# --------------------------------------------------------------------------
# Components: one source plus its place in the (union) label table.
# --------------------------------------------------------------------------
@dataclasses.dataclass
class _Component:
  source: registry.Source
  weight: float
  table: list[str]  # The source's own; ["other", *classes] for episodes.
  remap: np.ndarray     # int32 [len(table)]: own table index -> union index.


def _component_specs(data_cfg, eval_split: bool) -> list[dict[str, Any]]:
  """[{"name", "split", "weight", "kwargs"}] of a single source or mixture."""
  split_key = "eval_split" if eval_split else "split"
  defaults = {}
  for key in ("data_dir", "fold"):
    if data_cfg.get(key, None) is not None:
      defaults[key] = data_cfg.get(key)
  name = _get(data_cfg, "name")
  if name != "mix":
    kwargs = dict(defaults, **dict(data_cfg.get("source_kwargs", None) or {}))
    return [dict(name=name, split=_get(data_cfg, split_key), weight=1.0,
                 kwargs=kwargs)]
  mixture = data_cfg.get("mixture", None)
  if not mixture:
    raise ValueError("data_cfg.name='mix' needs a non-empty data_cfg.mixture "
                     "list of {'name': ..., 'weight': ...} dicts.")
  specs = []
  for item in mixture:
    item = dict(item)
    if "name" not in item:
      raise ValueError(f"Mixture entry {item} has no 'name'.")
    weight = float(item.pop("weight", 1.0))
    if weight <= 0:
      raise ValueError(f"Mixture weight of {item['name']!r} is {weight}; "
                       "expected > 0.")
    split = item.pop(split_key, _get(data_cfg, split_key))
    item.pop("eval_split" if not eval_split else "split", None)
    specs.append(dict(name=item.pop("name"), split=split, weight=weight,
                      kwargs=dict(defaults, **item)))
  return specs


def _source_table(source: registry.Source) -> list[str]:
  if source.is_episodic:
    return [OTHER_LABEL, *source.class_names]
  return list(source.label_names)


def _build_components(data_cfg, eval_split=False):
  components, union = [], []
  for spec in _component_specs(data_cfg, eval_split):
    source = registry.get_source(spec["name"], spec["split"], **spec["kwargs"])
    table = _source_table(source)
    if not table:
      raise ValueError(f"Source {spec['name']!r} has no label names.")
    for label in table:
      if label not in union:
        union.append(label)
    remap = np.array([union.index(label) for label in table], np.int32)
    components.append(_Component(source, spec["weight"], table, remap))
  return components, union


def label_table(data_cfg, eval_split: bool = False) -> list[str]:
  """The label names that batches' `label` values and `label_mask` index.

  A fixed-label source: its label_names; episodic: ["other", *class_names];
  mixture: the union in order of first appearance. `eval_split` selects the
  table of the evaluation split (episodic sources have other classes there).
  """
  _, union = _build_components(data_cfg, eval_split=eval_split)
  return union


# --------------------------------------------------------------------------
# Loading with bad-example handling.
# --------------------------------------------------------------------------
@dataclasses.dataclass
class PipelineStats:
  """Bad examples seen by one pipeline (counted as tf.data reaches them)."""
  num_skipped: int = 0
  skipped: list[str] = dataclasses.field(default_factory=list)
  error: Exception | None = None


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
      _fn(source.load)).element_spec

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
    ok = tf.data.Dataset.from_tensors(index).map(_fn(good)).ignore_errors()
    marker = tf.data.Dataset.from_tensors(index).map(_fn(bad))
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


def _bad_example_filter(source, on_bad, stats: PipelineStats):
  """Predicate keeping good examples; bad ones are counted or raise."""
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


def _loaded_examples(component, index_ds, cfg, stats):
  """(position, index) dataset -> checked raw examples with `_position`."""
  source, num_calls = component.source, _get(cfg, "num_parallel_calls")
  load = _guarded_load(source)
  ds = index_ds.interleave(
      _fn(lambda pos, idx: load(idx).map(
          _fn(lambda ex: dict(ex, _position=pos)))),
      cycle_length=max(num_calls, 1) if num_calls > 0 else None,
      num_parallel_calls=num_calls, deterministic=True)
  num_labels = 2 if source.is_episodic else len(source.label_names)
  ds = ds.map(_fn(lambda ex: _check_example(ex, num_labels)),
              num_parallel_calls=num_calls, deterministic=True)
  return ds.filter(_fn(_bad_example_filter(
      source, _get(cfg, "on_bad_example"), stats)))


def _to_table(ex, component, union_size):
  """Raw example -> label in the union table and its label_mask row [L]."""
  mask = ex["mask"]
  remap = tf.constant(component.remap)
  if component.source.is_episodic:
    own = tf.where(mask == 1, 1 + ex["class_index"], mask)
    present = tf.gather(remap, tf.stack([0, 1 + ex["class_index"]]))
  else:
    own = mask
    present = tf.constant(component.remap)
  label = tf.where(own == IGNORE_INDEX, IGNORE_INDEX,
                   tf.gather(remap, tf.maximum(own, 0)))
  label_mask = tf.scatter_nd(present[:, None],
                             tf.ones_like(present, tf.bool), [union_size])
  return label, label_mask


# --------------------------------------------------------------------------
# Train.
# --------------------------------------------------------------------------
def _seed_int(*values) -> int:
  """A 63-bit integer derived from the given integers (stable across runs)."""
  state = np.random.SeedSequence([int(v) for v in values]).generate_state(
      2, np.uint32)
  return int((int(state[0]) << 31) ^ int(state[1]))


def _index_stream(source, seed, start, process_index, process_count):
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
  indices = tf.data.Dataset.range(start // n, _MAX_EPOCHS).flat_map(_fn(epoch))
  indices = indices.skip(start % n)
  positions = tf.data.Dataset.range(start, _MAX_EPOCHS)
  return tf.data.Dataset.zip(positions, indices)


def _streamed_examples(component, seed, start, process_index, process_count,
                       cfg):
  """Fallback for sources without index access: skipping decodes examples."""
  source = component.source
  ds = source.as_dataset(process_index=process_index,
                         process_count=process_count, shuffle=True, seed=seed)
  ds = ds.shuffle(_get(cfg, "shuffle_buffer"), seed=seed,
                  reshuffle_each_iteration=True).repeat()
  if start:
    logging.warning("Resuming a %s stream at example %d by reading and "
                    "dropping the examples before it.", type(source).__name__,
                    start)
  ds = tf.data.Dataset.zip(tf.data.Dataset.range(_MAX_EPOCHS), ds).skip(start)
  num_labels = 2 if source.is_episodic else len(source.label_names)

  def mark(pos, ex):
    ex = dict(ex, _position=pos, _index=pos, _ok=tf.constant(True),
              _reason=tf.constant(""))
    return _check_example(ex, num_labels)
  return ds.map(_fn(mark))


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
    counts += tf.data.Dataset.range(full).map(_fn(choices)).reduce(
        tf.zeros(num_components, tf.int64),
        _fn(lambda acc, c: acc + tf.math.bincount(
            c, minlength=num_components, maxlength=num_components,
            dtype=tf.int64))).numpy()
  if rest:
    c = choices(tf.constant(full, tf.int64))[:rest].numpy()
    counts += np.bincount(c, minlength=num_components)
  return [int(x) for x in counts]


def _resolve_process(process_index, process_count):
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in "
                     f"[0, process_count={process_count}).")
  return process_index, process_count


def _check_on_bad(cfg):
  on_bad = _get(cfg, "on_bad_example")
  if on_bad not in _ON_BAD:
    raise ValueError(f"data_cfg.on_bad_example={on_bad!r}; expected one of "
                     f"{_ON_BAD}.")


def make_train_dataset(data_cfg, *, global_batch_size: int, seed: int,
                       start_step: int = 0, process_index: int | None = None,
                       process_count: int | None = None):
  """The endless per-host train tf.data.Dataset and its (labels, stats).

  See `make_train_iterator`; returns (dataset, label_names, stats).
  """
  process_index, process_count = _resolve_process(process_index, process_count)
  _check_on_bad(data_cfg)
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible "
                     f"by process_count={process_count}.")
  batch = global_batch_size // process_count
  if start_step < 0:
    raise ValueError(f"start_step={start_step}; expected >= 0.")
  components, union = _build_components(data_cfg)
  stats = PipelineStats()
  start = start_step * batch
  weights = [c.weight for c in components]
  mix_seed = _seed_int(seed, 1)
  if len(components) > 1:
    choices = _mixture_choices(weights, mix_seed)
    starts = _mixture_counts(choices, len(components), start)
  else:
    starts = [start]
  crop, base = _get(data_cfg, "crop_size"), _get(data_cfg, "base_size")
  scale_range = tuple(_get(data_cfg, "scale_range"))
  flip = bool(_get(data_cfg, "flip"))
  num_calls = _get(data_cfg, "num_parallel_calls")

  streams = []
  for i, (comp, comp_start) in enumerate(zip(components, starts)):
    comp_seed = _seed_int(seed, 2, i)
    if comp.source.is_indexed:
      index_ds = _index_stream(comp.source, comp_seed, comp_start,
                               process_index, process_count)
      ds = _loaded_examples(comp, index_ds, data_cfg, stats)
    else:
      ds = _streamed_examples(comp, comp_seed, comp_start, process_index,
                              process_count, data_cfg)
      ds = ds.filter(_fn(_bad_example_filter(
          comp.source, _get(data_cfg, "on_bad_example"), stats)))
    aug_seed = _seed_int(seed, 3, i, process_index)

    def augment(ex, comp=comp, aug_seed=aug_seed):
      ex_seed = tf.stack([tf.constant(aug_seed, tf.int64), ex["_position"]])
      image, mask = preprocess.train_augment(
          ex["image"], ex["mask"], ex_seed, crop_size=crop, base_size=base,
          scale_range=scale_range, flip=flip)
      label, label_mask = _to_table(dict(ex, mask=mask), comp, len(union))
      return {"image": image, "label": label, "label_mask": label_mask}
    streams.append(ds.map(_fn(augment), num_parallel_calls=num_calls,
                          deterministic=True))

  if len(streams) == 1:
    ds = streams[0]
  else:
    first_block, offset = divmod(start, _MIX_BLOCK)
    choice_ds = tf.data.Dataset.range(first_block, _MAX_EPOCHS).map(
        _fn(lambda block: tf.cast(choices(block), tf.int64)))
    choice_ds = choice_ds.unbatch().skip(offset)
    ds = tf.data.Dataset.choose_from_datasets(streams, choice_ds)
  ds = ds.batch(batch, drop_remainder=True)
  ds = ds.prefetch(_get(data_cfg, "prefetch"))
  return ds.with_options(_options()), union, stats


def _options():
  options = tf.data.Options()
  options.deterministic = True
  return options


class DataIterator:
  """Iterator of numpy batches with the label table and bad-example counts.

  Attributes:
    label_names: the batch label table (list[str]).
    batch_size: examples per batch on this host.
    stats: PipelineStats (num_skipped, skipped file names).
  """

  def __init__(self, dataset, label_names, stats, batch_size,
               num_batches=None):
    self.dataset = dataset
    self.label_names = label_names
    self.stats = stats
    self.batch_size = batch_size
    self.num_batches = num_batches
    self._it = None

  @property
  def num_skipped(self) -> int:
    return self.stats.num_skipped

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = self.dataset.as_numpy_iterator()
    try:
      return next(self._it)
    except tf.errors.OpError as e:
      if self.stats.error is not None:
        raise self.stats.error from None
      raise BadExampleError(_readable(e.message)) from e


def _readable(message: str) -> str:
  """Strips TF's op/stack decorations from an assertion message."""
  first = message.strip().splitlines()[0]
  return first.replace("assertion failed: ", "").strip("[] ")


def make_train_iterator(data_cfg, *, global_batch_size: int, seed: int,
                        start_step: int = 0, process_index: int | None = None,
                        process_count: int | None = None) -> DataIterator:
  """Endless per-host train batches (numpy), reshuffled every epoch.

  Args:
    data_cfg: data ConfigDict (module docstring).
    global_batch_size: examples per step over all processes.
    seed: data seed; the same seed gives the same batches.
    start_step: first step to produce; the stream from step k equals the
      uninterrupted stream's batches k, k+1, ...
    process_index / process_count: this host's slice (default: jax's).

  Returns:
    DataIterator of dicts: image float32 [b, crop, crop, 3], label int32
    [b, crop, crop], label_mask bool [b, L], b = global_batch_size //
    process_count.
  """
  ds, union, stats = make_train_dataset(
      data_cfg, global_batch_size=global_batch_size, seed=seed,
      start_step=start_step, process_index=process_index,
      process_count=process_count)
  process_index, process_count = _resolve_process(process_index, process_count)
  return DataIterator(ds, union, stats, global_batch_size // process_count)


# --------------------------------------------------------------------------
# Eval.
# --------------------------------------------------------------------------
def make_eval_iterator(data_cfg, *, batch_size: int,
                       process_index: int | None = None,
                       process_count: int | None = None) -> DataIterator:
  """One pass over the eval split in a fixed order, per host.

  Every host yields the same number of batches (`iterator.num_batches`); the
  last ones are padded with `valid=False` examples (image 0, label ignore,
  label_mask all True).

  Args:
    data_cfg: data ConfigDict (module docstring); reads eval_split,
      eval_resize, eval_pad_to.
    batch_size: examples per batch on this host.

  Returns:
    DataIterator of dicts: image float32 [b, h, w, 3], label int32 [b, h, w],
    label_mask bool [b, L], valid bool [b], image_size int32 [b, 2], and for
    episodic sources class_index int32 [b].
  """
  process_index, process_count = _resolve_process(process_index, process_count)
  _check_on_bad(data_cfg)
  components, union = _build_components(data_cfg, eval_split=True)
  mode = _get(data_cfg, "eval_resize")
  if mode not in preprocess.EVAL_RESIZE_MODES:
    raise ValueError(f"data_cfg.eval_resize={mode!r}; expected one of "
                     f"{preprocess.EVAL_RESIZE_MODES}.")
  crop, base = _get(data_cfg, "crop_size"), _get(data_cfg, "base_size")
  pad_to = data_cfg.get("eval_pad_to", None)
  if mode in ("center_crop", "square"):
    pad_to = (crop, crop)
  elif mode == "long_side":
    pad_to = (base, base)
  episodic = any(c.source.is_episodic for c in components)
  stats = PipelineStats()
  num_calls = _get(data_cfg, "num_parallel_calls")

  streams, total = [], 0
  for comp in components:
    if comp.source.is_indexed:
      host = comp.source.host_indices(process_index, process_count)
      index_ds = tf.data.Dataset.zip(
          tf.data.Dataset.range(len(host)),
          tf.data.Dataset.from_tensor_slices(host))
      ds = _loaded_examples(comp, index_ds, data_cfg, stats)
      total += -(-comp.source.num_examples // process_count)
    else:
      if comp.source.num_examples is None:
        raise ValueError(f"Eval source {type(comp.source).__name__} needs "
                         "num_examples to pad every host to the same count.")
      ds = comp.source.as_dataset(process_index=process_index,
                                  process_count=process_count, shuffle=False,
                                  seed=0)
      num_labels = 2 if comp.source.is_episodic else len(comp.table)
      ds = ds.map(_fn(lambda ex, n=num_labels: _check_example(
          dict(ex, _index=tf.constant(0, tf.int64), _ok=tf.constant(True),
               _reason=tf.constant("")), n)))
      ds = ds.filter(_fn(_bad_example_filter(
          comp.source, _get(data_cfg, "on_bad_example"), stats)))
      total += -(-comp.source.num_examples // process_count)

    def prepare(ex, comp=comp):
      image, mask = preprocess.eval_preprocess(
          ex["image"], ex["mask"], mode=mode, crop_size=crop, base_size=base)
      label, label_mask = _to_table(dict(ex, mask=mask), comp, len(union))
      size = tf.shape(label)
      if pad_to is not None:
        tf.debugging.Assert(
            tf.reduce_all(size <= tf.constant(pad_to)),
            [tf.strings.format("Eval image {} has size {}, larger than "
                               "data_cfg.eval_pad_to={}.",
                               (ex["file_name"], size, tf.constant(pad_to)))])
      out = {"image": image, "label": label, "label_mask": label_mask,
             "valid": tf.constant(True), "image_size": size}
      if episodic:
        out["class_index"] = tf.cast(ex.get("class_index", 0), tf.int32)
      return out
    streams.append(ds.map(_fn(prepare), num_parallel_calls=num_calls,
                          deterministic=True))

  ds = streams[0]
  for other in streams[1:]:
    ds = ds.concatenate(other)
  num_batches = -(-total // batch_size)
  pad_example = {
      "image": tf.zeros([0, 0, 3], tf.float32),
      "label": tf.zeros([0, 0], tf.int32),
      "label_mask": tf.ones([len(union)], tf.bool),
      "valid": tf.constant(False), "image_size": tf.zeros([2], tf.int32)}
  if episodic:
    pad_example["class_index"] = tf.constant(0, tf.int32)
  if pad_to is not None:
    pad_example["image"] = tf.zeros([*pad_to, 3], tf.float32)
    pad_example["label"] = tf.fill(pad_to, IGNORE_INDEX)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad_example).repeat())
  ds = ds.take(num_batches * batch_size)
  hw = list(pad_to) if pad_to is not None else [None, None]
  ds = ds.padded_batch(
      batch_size,
      padded_shapes={**{k: v.shape for k, v in ds.element_spec.items()},
                     "image": [*hw, 3], "label": hw},
      padding_values={
          **{k: tf.zeros([], v.dtype) for k, v in ds.element_spec.items()},
          "image": tf.constant(-1.0), "label": tf.constant(IGNORE_INDEX)})
  ds = ds.prefetch(_get(data_cfg, "prefetch")).with_options(_options())
  return DataIterator(ds, union, stats, batch_size, num_batches)


# --------------------------------------------------------------------------
# Host batches -> global device arrays.
# --------------------------------------------------------------------------
def to_global(batch, sharding):
  """Per-host numpy batch -> global jax.Arrays (leading axis = batch).

  Args:
    batch: pytree of per-host arrays [b, ...].
    sharding: a jax.sharding.Sharding of the global batch (e.g.
      NamedSharding(mesh, P(("data", "fsdp")))), used for every leaf.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


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


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Whole steps in one epoch of `num_examples` (for schedules and logs)."""
  return max(1, math.floor(num_examples / global_batch_size))
