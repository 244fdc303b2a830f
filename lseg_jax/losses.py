"""Per-pixel cross-entropy with an ignore index and masked labels, and pixel accuracy.

Masked labels (`label_mask` False) reach here as -inf logits: they get probability
0 and no gradient. The loss is the mean over valid (non-ignored) pixels of the whole
(global) batch, as `torch.nn.CrossEntropyLoss(ignore_index=-1)`; a batch without any
valid pixel gives 0 (PyTorch would give NaN).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lseg_jax.labels import IGNORE_INDEX


def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX):
  """Mean cross-entropy of logits [B, H, W, L] (-inf: masked labels) over the pixels of
  labels int [B, H, W] that are not `ignore_index` -> (float32 loss, int32 valid count)."""
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f"logits {logits.shape} and labels {labels.shape} disagree; expected "
                     "logits [B, H, W, L] and labels [B, H, W]")
  valid = labels != ignore_index
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  # Ignored pixels read label 0 (possibly masked, -inf) and are then zeroed by `where`,
  # whose gradient to the unselected branch is exactly 0.
  target = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  nll = jnp.where(valid, -target, 0.0)
  count = jnp.sum(valid, dtype=jnp.int32)
  return jnp.sum(nll) / jnp.maximum(count, 1).astype(jnp.float32), count


def pixel_accuracy_counts(logits, labels, ignore_index: int = IGNORE_INDEX):
  """(correct, valid) pixel counts (int32 scalars) of the argmax prediction.

  logits [B, H, W, L], labels [B, H, W].
  """
  valid = labels != ignore_index
  correct = (jnp.argmax(logits, axis=-1) == labels) & valid
  return jnp.sum(correct, dtype=jnp.int32), jnp.sum(valid, dtype=jnp.int32)


__all__ = ["cross_entropy", "pixel_accuracy_counts"]
