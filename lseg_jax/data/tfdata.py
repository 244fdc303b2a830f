"""tf.data settings every pipeline of the package shares."""
from __future__ import annotations

import tensorflow as tf

# Our dataset functions use no Python control flow on tensors; skipping
# AutoGraph's conversion saves seconds per pipeline.
no_autograph = tf.autograph.experimental.do_not_convert


def deterministic(ds: tf.data.Dataset) -> tf.data.Dataset:
  """`ds` with deterministic element order (the pipelines' contract)."""
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)
