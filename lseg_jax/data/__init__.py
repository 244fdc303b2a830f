"""Input data: dataset sources, preprocessing and per-host tf.data pipelines.

Data contract (shared by training, evaluation and prediction; this is its one statement, which the
modules and docs refer to):

* Raw example (a source's output, before augmentation): `image` uint8 [H, W, 3]; `mask` int32 [H, W]
  indexing the source's `label_names`, -1 = ignore; `file_name` tf.string. Episodic (zero-shot)
  sources: the mask is binary (0 = "other", 1 = the episode class, -1 = ignore) and examples also
  carry `class_index` int32 (into the fold's `class_names`) and `class_name`.
* Batch (numpy, per host): `image` float32 [B, H, W, 3] normalised as (x / 255 - 0.5) / 0.5; `label`
  int32 [B, H, W] indexing the pipeline's `label_names` (its label table), -1 = ignore
  (`labels.IGNORE_INDEX`); `label_mask` bool [B, L], the candidate labels of each example. Train
  batches are crops [B, crop, crop]. Eval batches add `valid` bool [B] (False for the padding
  examples of the last batches: image 0, label -1, label_mask all True), `image_size` int32 [B, 2]
  (the true (h, w) before padding) and, for episodes, `class_index` int32 [B] (into the fold's
  classes; the episode's candidates are "other" and that class). B is the per-host batch.
"""
import contextlib as _contextlib
import os as _os
import sys as _sys


@_contextlib.contextmanager
def _quiet_native_stderr():
  """Silences what native code writes to stderr (fd 2) meanwhile: TensorFlow's C++
  libraries print a oneDNN banner while they load, before any log level applies."""
  try:
    _sys.stderr.flush()
    saved = _os.dup(2)
  except (OSError, ValueError):  # no usable fd 2 (embedded interpreters)
    yield
    return
  devnull = _os.open(_os.devnull, _os.O_WRONLY)
  try:
    _os.dup2(devnull, 2)
    yield
  finally:
    _os.dup2(saved, 2)
    _os.close(saved)
    _os.close(devnull)


if "tensorflow" not in _sys.modules:
  with _quiet_native_stderr():
    import tensorflow  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top

from lseg_jax.labels import IGNORE_INDEX  # noqa: E402

__all__ = ["IGNORE_INDEX"]
