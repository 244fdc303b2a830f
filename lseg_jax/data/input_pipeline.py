"""Per-host tf.data input pipelines: the public entry point.

  it = input_pipeline.make_train_iterator(config.data, global_batch_size=B, seed=0)
  batch = next(it)  # numpy dict; it.label_names, it.episodic

Batches follow the data contract stated in `lseg_jax.data`'s docstring (the label table is
`label_table(data_cfg)`). Whether a config reads episodes is `is_episodic(cfg)` (no pipeline built)
or an iterator's `episodic` attribute.

Data config fields: `FIELDS` below (each with its default and allowed values).

Where things live: `source_specs` (config -> sources, label table, episodic), `bad_examples` (the
guard every example passes, `BadExampleError`, `PipelineStats`), `train_stream` (endless, resumable;
its docstring states the determinism contract), `eval_stream` (one padded pass), `host_to_device`
(global arrays), `data_iterator` (the iterator both streams return), `tfdata` (the tf.data settings
they share).
"""
from __future__ import annotations

import ml_collections

from lseg_jax import fields
from lseg_jax.data.bad_examples import ON_BAD, BadExampleError, PipelineStats
from lseg_jax.data.data_iterator import DataIterator
from lseg_jax.data.eval_stream import make_eval_iterator
from lseg_jax.data.host_to_device import prefetch_to_device, to_global
from lseg_jax.data.source_specs import is_episodic, label_table
from lseg_jax.data.train_stream import make_train_dataset, make_train_iterator
from lseg_jax.labels import IGNORE_INDEX, OTHER_LABEL


FIELDS = {
    "name": fields.free("synthetic"),  # a registered source name, or "mix" for a mixture
    "data_dir": fields.free(None, str),  # passed to the source factory when set
    "split": fields.free("train"),
    "eval_split": fields.free("validation"),
    "source_kwargs": fields.free({}),  # extra keyword arguments for the source factory
    # An episodic (zero-shot) source's fold, and the official evaluation's --nshot (which
    # episodes there are: `fewshot`); passed when set, else the source's default (shot 0,
    # the paper's zero-shot setting).
    "fold": fields.integer(None, 0),
    "shot": fields.integer(None, 0),
    # For name "mix": dicts {"name", "weight", ["split", "eval_split",] **kwargs} (kwargs go
    # to that source's factory; data_dir/fold/shot default to the above).
    "mixture": fields.free(()),
    "crop_size": fields.integer(480, 1),  # side of the square training crop
    "base_size": fields.integer(520, 1),  # long side of the image at scale 1
    # The random long side is drawn from [base_size * lo, base_size * hi].
    "scale_range": fields.range_pair((0.5, 2.0)),
    "flip": fields.boolean(True),  # random horizontal flips (see `preprocess`)
    # "none" | "long_side" | "center_crop" | "square" (HSNet's few-shot protocol), see
    # `preprocess`; with "none" eval images are padded to eval_pad_to (h, w) (None: the
    # largest image of each batch; set it to keep shapes static under jit).
    "eval_resize": fields.free("none"),
    "eval_pad_to": fields.free(None, tuple),
    # An undecodable image or a mask whose size differs from its image raises an error
    # naming the file, or is skipped, counted (`iterator.num_skipped`) and logged. Mask
    # values outside [0, num_labels) other than -1 always raise an error.
    "on_bad_example": fields.one_of("error", ON_BAD),
    "shuffle_buffer": fields.integer(10_000, 1),  # for sources without index access
    # Parallelism of loading and augmentation (-1: AUTOTUNE).
    "num_parallel_calls": fields.Field(
        -1, int, lambda v: v == -1 or fields.integer(None, 1).ok(v),
        "-1 (automatic) or an integer >= 1"),
    "prefetch": fields.integer(2, -1),  # batches prefetched by tf.data
}


def default_data_config() -> ml_collections.ConfigDict:
  """The data config with every field the pipelines read, at its default."""
  return fields.config_dict_of(FIELDS)


__all__ = [
    "FIELDS", "BadExampleError", "DataIterator", "IGNORE_INDEX", "OTHER_LABEL", "PipelineStats",
    "default_data_config", "is_episodic", "label_table", "make_eval_iterator", "make_train_dataset",
    "make_train_iterator", "prefetch_to_device", "to_global"]
