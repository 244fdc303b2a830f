"""Per-host tf.data input pipelines: the public entry point.

  it = input_pipeline.make_train_iterator(config.data, global_batch_size=B,
                                          seed=0)
  batch = next(it)  # numpy dict; it.label_names, it.episodic

Batches follow the data contract stated in `lseg_jax.data`'s docstring (the
label table is `label_table(data_cfg)`). Whether a config reads episodes is
`is_episodic(cfg)` (no pipeline built) or an iterator's `episodic` attribute.

Data config fields (`ml_collections.ConfigDict`; `default_data_config()`):
  name ("synthetic"): registered source name, or "mix" for a mixture.
  data_dir (None): passed to the source factory when set.
  split ("train"): the training split.
  eval_split ("validation"): the evaluation split.
  source_kwargs ({}): extra keyword arguments for the source factory.
  fold (None): fold of an episodic (zero-shot) source; passed when set.
  shot (None): the official evaluation's --nshot for an episodic source (which
    episodes there are: `fewshot`); passed when set, else the source's default, 0,
    the paper's zero-shot setting.
  mixture (()): for name == "mix", a list of dicts
    {"name": ..., "weight": ..., ["split": ..., "eval_split": ...,] **kwargs}
    (kwargs go to that source's factory; data_dir/fold/shot default to the above).
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

Where things live: `source_specs` (config -> sources, label table, episodic),
`bad_examples` (the guard every example passes, `BadExampleError`,
`PipelineStats`), `train_stream` (endless, resumable; its docstring states the
determinism contract), `eval_stream` (one padded pass), `host_to_device`
(global arrays), `data_iterator` (the iterator both streams return), `tfdata`
(the tf.data settings they share).
"""
from __future__ import annotations

import ml_collections

from lseg_jax.data.bad_examples import BadExampleError, PipelineStats
from lseg_jax.data.data_iterator import DataIterator
from lseg_jax.data.eval_stream import make_eval_iterator
from lseg_jax.data.host_to_device import prefetch_to_device, to_global
from lseg_jax.data.source_specs import is_episodic, label_table
from lseg_jax.data.train_stream import make_train_dataset, make_train_iterator
from lseg_jax.data.train_stream import steps_per_epoch
from lseg_jax.labels import IGNORE_INDEX, OTHER_LABEL


def default_data_config() -> ml_collections.ConfigDict:
  """The data config with every field the pipelines read, at its default."""
  return ml_collections.ConfigDict(dict(
      name="synthetic", data_dir=None, split="train", eval_split="validation",
      source_kwargs={}, fold=None, shot=None, mixture=(), crop_size=480, base_size=520,
      scale_range=(0.5, 2.0), flip=True, eval_resize="none", eval_pad_to=None,
      on_bad_example="error", shuffle_buffer=10_000, num_parallel_calls=-1,
      prefetch=2))


__all__ = [
    "BadExampleError", "DataIterator", "IGNORE_INDEX", "OTHER_LABEL",
    "PipelineStats", "default_data_config", "is_episodic", "label_table",
    "make_eval_iterator", "make_train_dataset", "make_train_iterator",
    "prefetch_to_device", "steps_per_epoch", "to_global"]
