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
from lseg_jax.models import resize


def _nll_sum(logits, labels, ignore_index: int):
  """(sum of the cross-entropy over the valid pixels, their count)."""
  valid = labels != ignore_index
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  # Ignored pixels read label 0 (possibly masked, -inf) and are then zeroed by `where`,
  # whose gradient to the unselected branch is exactly 0.
  target = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, -target, 0.0)), jnp.sum(valid, dtype=jnp.int32)


def _mean(total, count):
  return total / jnp.maximum(count, 1).astype(jnp.float32)


def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX):
  """Mean cross-entropy of logits [B, H, W, L] (-inf: masked labels) over the pixels of
  labels int [B, H, W] that are not `ignore_index` -> (float32 loss, int32 valid count)."""
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f"logits {logits.shape} and labels {labels.shape} disagree; expected "
                     "logits [B, H, W, L] and labels [B, H, W]")
  total, count = _nll_sum(logits, labels, ignore_index)
  return _mean(total, count), count


def pixel_accuracy_counts(logits, labels, ignore_index: int = IGNORE_INDEX):
  """(correct, valid) pixel counts (int32 scalars) of the argmax prediction.

  logits [B, H, W, L], labels [B, H, W].
  """
  valid = labels != ignore_index
  correct = (jnp.argmax(logits, axis=-1) == labels) & valid
  return jnp.sum(correct, dtype=jnp.int32), jnp.sum(valid, dtype=jnp.int32)


def upsampled_loss_and_accuracy(half_logits, labels, label_mask=None,
                                ignore_index: int = IGNORE_INDEX):
  """`cross_entropy` and `pixel_accuracy_counts` of the logits LSeg returns, from the
  logits before its last step (`LSeg.half_logits` [B, H/2, W/2, L]): the upsampled
  logits are scored phase by phase (`resize.upsample2x_phases`, pixels (2i + p, 2j + q)
  against labels[:, p::2, q::2]), never as one [B, H, W, L] array. The same logits;
  the sums run in another order. -> (loss, valid count, correct count)."""
  b, h, w = labels.shape
  if half_logits.shape[:-1] != (b, h // 2, w // 2) or h % 2 or w % 2:
    raise ValueError(f"logits {half_logits.shape} are not labels {labels.shape} at half "
                     "size; expected logits [B, H/2, W/2, L] and labels [B, H, W]")
  total = jnp.zeros((), jnp.float32)
  count = correct = jnp.zeros((), jnp.int32)
  for (p, q), logits in resize.upsample2x_phases(half_logits).items():
    if label_mask is not None:
      logits = jnp.where(label_mask[:, None, None, :], logits, -jnp.inf)
    phase_labels = labels[:, p::2, q::2]
    nll, valid = _nll_sum(logits, phase_labels, ignore_index)
    right, _ = pixel_accuracy_counts(logits, phase_labels, ignore_index)
    total, count, correct = total + nll, count + valid, correct + right
  return _mean(total, count), count, correct
