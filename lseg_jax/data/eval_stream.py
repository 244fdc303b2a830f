"""One pass over the evaluation split, per host, in a fixed order.

Every host yields the same number of batches: the last ones are padded with `valid=False` examples.
Images keep their size (`eval_resize="none"`, padded per batch or to `eval_pad_to`) or are resized
to one static shape, see `preprocess.eval_preprocess`.
"""
from __future__ import annotations

import tensorflow as tf

from lseg_jax.data import bad_examples
from lseg_jax.data import preprocess
from lseg_jax.data import source_specs
from lseg_jax.data.bad_examples import PipelineStats
from lseg_jax.data.data_iterator import DataIterator, resolve_process
from lseg_jax.data.tfdata import deterministic, no_autograph
from lseg_jax.labels import IGNORE_INDEX


def make_eval_iterator(data_cfg, *, batch_size: int, process_index: int | None = None,
                       process_count: int | None = None) -> DataIterator:
  """One pass over the eval split in a fixed order, per host (default: JAX's process
  slice), in batches of `batch_size` (the data contract in `lseg_jax.data`). Every host
  yields `iterator.num_batches` batches, the last ones padded with `valid=False`."""
  process_index, process_count = resolve_process(process_index, process_count)
  bad_examples.check_on_bad(data_cfg)
  components, union = source_specs.build_components(data_cfg, eval_split=True)
  mode = data_cfg.eval_resize
  crop, base = data_cfg.crop_size, data_cfg.base_size
  pad_to = _pad_to(data_cfg)
  episodic = source_specs.is_episodic(data_cfg)
  stats = PipelineStats()

  streams, total = [], 0
  for comp in components:
    ds = _host_examples(comp.source, data_cfg, stats, process_index, process_count)
    total += -(-comp.source.num_examples // process_count)

    def prepare(ex, comp=comp):
      image, mask = preprocess.eval_preprocess(
          ex["image"], ex["mask"], mode=mode, crop_size=crop, base_size=base)
      label, label_mask = comp.to_table(mask, ex.get("class_index"), len(union))
      size = tf.shape(label)
      if pad_to is not None:
        tf.debugging.Assert(
            tf.reduce_all(size <= tf.constant(pad_to)),
            [tf.strings.format("Eval image {} has size {}, larger than data_cfg.eval_pad_to={}.",
                               (ex["file_name"], size, tf.constant(pad_to)))])
      out = {"image": image, "label": label, "label_mask": label_mask,
             "valid": tf.constant(True), "image_size": size}
      if episodic:
        out["class_index"] = tf.cast(ex.get("class_index", 0), tf.int32)
      return out
    streams.append(ds.map(no_autograph(prepare), num_parallel_calls=data_cfg.num_parallel_calls,
                          deterministic=True))

  ds = streams[0]
  for other in streams[1:]:
    ds = ds.concatenate(other)
  num_batches = -(-total // batch_size)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(
      _pad_example(len(union), pad_to, episodic)).repeat())
  ds = _padded_batches(ds.take(num_batches * batch_size), batch_size, pad_to)
  ds = deterministic(ds.prefetch(data_cfg.prefetch))
  return DataIterator(ds, union, stats, batch_size, num_batches, episodic=episodic)


def _pad_to(data_cfg):
  """The (h, w) every eval image is padded to (None: each batch's largest)."""
  mode = data_cfg.eval_resize
  if mode not in preprocess.EVAL_RESIZE_MODES:
    raise ValueError(f"data_cfg.eval_resize={mode!r}; expected one of "
                     f"{preprocess.EVAL_RESIZE_MODES}.")
  if mode in ("center_crop", "square"):
    return (data_cfg.crop_size, data_cfg.crop_size)
  if mode == "long_side":
    return (data_cfg.base_size, data_cfg.base_size)
  return data_cfg.eval_pad_to


def _host_examples(source, data_cfg, stats, process_index, process_count):
  """This host's good raw examples of `source`, one pass in a fixed order."""
  if source.is_indexed:
    host = source.host_indices(process_index, process_count)
    index_ds = tf.data.Dataset.zip(
        tf.data.Dataset.range(len(host)), tf.data.Dataset.from_tensor_slices(host))
    return bad_examples.indexed_examples(source, index_ds, data_cfg, stats)
  if source.num_examples is None:
    raise ValueError(f"Eval source {type(source).__name__} needs "
                     "num_examples to pad every host to the same count.")
  return bad_examples.streamed_examples(
      source, data_cfg, stats, process_index=process_index, process_count=process_count)


def _padded_batches(ds, batch_size, pad_to):
  """Batches padded to `pad_to` (image -1.0, i.e. black; label ignore)."""
  hw = list(pad_to) if pad_to is not None else [None, None]
  return ds.padded_batch(
      batch_size,
      padded_shapes={**{k: v.shape for k, v in ds.element_spec.items()},
                     "image": [*hw, 3], "label": hw},
      padding_values={
          **{k: tf.zeros([], v.dtype) for k, v in ds.element_spec.items()},
          "image": tf.constant(-1.0), "label": tf.constant(IGNORE_INDEX)})


def _pad_example(num_labels: int, pad_to, episodic: bool) -> dict:
  """The `valid=False` example that fills the last batches of a host."""
  pad = {"image": tf.zeros([0, 0, 3], tf.float32), "label": tf.zeros([0, 0], tf.int32),
         "label_mask": tf.ones([num_labels], tf.bool), "valid": tf.constant(False),
         "image_size": tf.zeros([2], tf.int32)}
  if episodic:
    pad["class_index"] = tf.constant(0, tf.int32)
  if pad_to is not None:
    pad["image"] = tf.zeros([*pad_to, 3], tf.float32)
    pad["label"] = tf.fill(pad_to, IGNORE_INDEX)
  return pad
