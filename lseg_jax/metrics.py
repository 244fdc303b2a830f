"""Segmentation metrics: confusion matrices on device, exact totals on the host.

The formulas of both protocols: docs/evaluation.md, "Formulas" (under "Metrics").
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

# PyTorch-Encoding's epsilon in pixAcc and IoU denominators.
EPS = float(np.spacing(1))


# --- Device side: per-batch counts ---
def _pixel_weights(label, valid, num_classes):
  """int32 [B, H, W]: 1 where the pixel is scored, 0 where ignored or padding."""
  w = (label >= 0) & (label < num_classes)
  if valid is not None:
    w &= valid.reshape((-1,) + (1,) * (label.ndim - 1))
  return w.astype(jnp.int32)


def _check_shapes(pred, label) -> int:
  """The batch size B of pred and label [B, H, W]; ValueError unless their shapes agree."""
  if pred.shape != label.shape or pred.ndim < 1:
    raise ValueError(f"pred {pred.shape} and label {label.shape} must have the "
                     "same shape [B, H, W]")
  return pred.shape[0]


def _batched_bincount(index, weights, length):
  """Per-example bincount summed over the batch: [B, N] -> int32 [length].

  Counting per example (a scatter along the batch dimension) keeps the work
  local to the devices holding each example; the sum over the batch is then
  one small all-reduce instead of gathering every pixel.
  """
  counts = jax.vmap(lambda i, w: jnp.zeros((length,), jnp.int32).at[i].add(w))(index, weights)
  return counts.sum(axis=0)


@functools.partial(jax.jit, static_argnames="num_classes")
def confusion_matrix(pred, label, num_classes: int, valid=None):
  """int32 [C, C] confusion of a batch, summed over it: [g, p] counts the pixels of ground
  truth g predicted as p. pred int [B, H, W] in [0, C); label int [B, H, W], -1 (any value
  outside [0, C)) ignored; valid optional bool [B], False drops that example (padding)."""
  b = _check_shapes(pred, label)
  w = _pixel_weights(label, valid, num_classes).reshape(b, -1)
  # Ignored pixels are sent to bin 0 with weight 0.
  index = jnp.where(w > 0, (label * num_classes + pred).reshape(b, -1), 0)
  counts = _batched_bincount(index.astype(jnp.int32), w, num_classes * num_classes)
  return counts.reshape(num_classes, num_classes)


@functools.partial(jax.jit, static_argnames="num_classes")
def episode_confusion(pred, label, class_index, num_classes: int, valid=None):
  """int32 [K, 2, 2] binary confusions of a batch of episodes per class of the fold: [k, g, p]
  counts the pixels of ground truth g predicted as p over the episodes of class k. pred int
  [B, H, W] (1 = the episode class, 0 = background); label int [B, H, W] (1, 0, -1 ignore);
  class_index int [B] in [0, K), each episode's class in the fold's list; valid optional
  bool [B], False drops that episode (padding)."""
  b = _check_shapes(pred, label)
  if class_index.shape != (b,):
    raise ValueError(f"class_index has shape {class_index.shape}; expected [{b}]")
  w = _pixel_weights(label, valid, 2)
  # An episode whose class index is out of range is dropped, not clipped.
  w &= ((class_index >= 0) & (class_index < num_classes)).reshape(b, 1, 1)
  w = w.reshape(b, -1)
  cell = label * 2 + (pred > 0).astype(label.dtype)
  index = class_index.reshape(b, 1, 1) * 4 + cell
  index = jnp.where(w > 0, index.reshape(b, -1), 0)
  counts = _batched_bincount(index.astype(jnp.int32), w, num_classes * 4)
  return counts.reshape(num_classes, 2, 2)


def confusion_matrix_np(pred, label, num_classes: int) -> np.ndarray:
  """`confusion_matrix` in numpy (no compilation per shape): int64 [C, C].

  For host-side scoring of images of varying size (multi-scale evaluation).
  """
  pred, label = np.asarray(pred), np.asarray(label)
  if pred.shape != label.shape:
    raise ValueError(f"pred {pred.shape} and label {label.shape} must have the same shape")
  keep = (label >= 0) & (label < num_classes)
  index = label[keep].astype(np.int64) * num_classes + pred[keep]
  return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def episode_confusion_np(pred, label, class_index, num_classes: int) -> np.ndarray:
  """`episode_confusion` in numpy: int64 [K, 2, 2]."""
  pred, label = np.asarray(pred), np.asarray(label)
  class_index = np.asarray(class_index).reshape(-1)
  if pred.shape != label.shape or class_index.shape != pred.shape[:1]:
    raise ValueError(f"pred {pred.shape}, label {label.shape} and class_index "
                     f"{class_index.shape} must be [B, H, W], [B, H, W] and [B]")
  ci = np.broadcast_to(class_index.reshape((-1,) + (1,) * (pred.ndim - 1)), pred.shape)
  keep = (label >= 0) & (label < 2) & (ci >= 0) & (ci < num_classes)
  index = ci[keep].astype(np.int64) * 4 + label[keep] * 2 + (pred[keep] > 0)
  return np.bincount(index, minlength=num_classes * 4).reshape(num_classes, 2, 2)


def to_host(x) -> np.ndarray:
  """A (possibly multi-host, sharded) jax.Array -> numpy, the same on every host."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# --- Host side: dataset totals and the official formulas ---
def miou_pixacc(conf) -> dict:
  """pixAcc and mIoU, as PyTorch-Encoding computes them, of conf int [C, C] ([ground truth,
  prediction], summed over the dataset): floats "pixAcc", "mIoU" (over all C classes),
  "mIoU_present" (over classes with union > 0; not official), ints "correct", "labeled"
  and numpy "iou" float64 [C], "intersection" and "union" int64 [C]."""
  conf = np.asarray(conf, np.int64)
  if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
    raise ValueError(f"expected a square confusion matrix [C, C], got shape {conf.shape}")
  inter = np.diag(conf)
  union = conf.sum(0) + conf.sum(1) - inter
  correct, labeled = int(inter.sum()), int(conf.sum())
  iou = inter / (EPS + union)
  present = union > 0
  return {
      "pixAcc": float(correct / (EPS + labeled)),
      "mIoU": float(iou.mean()),
      "mIoU_present": float(iou[present].mean()) if present.any() else 0.0,
      "iou": iou, "intersection": inter, "union": union,
      "correct": correct, "labeled": labeled,
  }


def fewshot_iou(conf, class_ids: Sequence[int] | None = None) -> dict:
  """HSNet's mIoU and FB-IoU of conf int [K, 2, 2] (`episode_confusion` summed over the episodes)
  over `class_ids` (HSNet's classes of interest; default all K): floats "mIoU", "FB-IoU" and numpy
  arrays over those n classes, "iou" float64 [n] (foreground), "intersection" and "union" int64
  [n, 2] (background, foreground), "episodes_pixels" int64 [n] (scored pixels per class)."""
  conf = np.asarray(conf, np.int64)
  if conf.ndim != 3 or conf.shape[1:] != (2, 2):
    raise ValueError(f"expected per-class binary confusion matrices [K, 2, 2], got "
                     f"shape {conf.shape}")
  if class_ids is not None:
    class_ids = np.asarray(class_ids, np.int64)
    if class_ids.size and (class_ids.min() < 0 or class_ids.max() >= conf.shape[0]):
      raise ValueError(f"class_ids {class_ids.tolist()} out of range [0, {conf.shape[0]})")
    conf = conf[class_ids]
  # [n, 2]: column 0 background, column 1 foreground.
  inter = np.stack([conf[:, 0, 0], conf[:, 1, 1]], axis=1)
  off = conf[:, 0, 1] + conf[:, 1, 0]
  union = inter + off[:, None]
  iou = inter[:, 1] / np.maximum(union[:, 1], 1)
  tot_inter, tot_union = inter.sum(0), union.sum(0)
  with np.errstate(invalid="ignore", divide="ignore"):
    fb = tot_inter / tot_union  # NaN without any scored pixel, as HSNet.
  return {
      "mIoU": float(iou.mean()) if iou.size else float("nan"),
      "FB-IoU": float(fb.mean()),
      "iou": iou, "intersection": inter, "union": union,
      "episodes_pixels": conf.sum((1, 2)),
  }


class SegmentationMeter:
  """Sums per-batch confusion matrices (int64, host) for `miou_pixacc`."""

  def __init__(self, num_classes: int):
    if num_classes < 1:
      raise ValueError(f"num_classes={num_classes}; expected >= 1")
    self.conf = np.zeros((num_classes, num_classes), np.int64)

  def add(self, conf) -> None:
    """Adds an int [C, C] confusion matrix (jax or numpy)."""
    conf = to_host(conf)
    if conf.shape != self.conf.shape:
      raise ValueError(f"confusion matrix has shape {conf.shape}; expected {self.conf.shape}")
    self.conf += conf.astype(np.int64)

  def result(self) -> dict:
    return miou_pixacc(self.conf)


class FewShotMeter:
  """Sums per-class binary confusion matrices of episodes (HSNet's AverageMeter)."""

  def __init__(self, num_classes: int, class_ids: Sequence[int] | None = None):
    if num_classes < 1:
      raise ValueError(f"num_classes={num_classes}; expected >= 1")
    self.num_classes = num_classes
    self.class_ids = None if class_ids is None else list(class_ids)
    self.conf = np.zeros((num_classes, 2, 2), np.int64)
    self.num_episodes = np.zeros((num_classes,), np.int64)

  def add(self, conf, class_index=None, valid=None) -> None:
    """Adds an int [K, 2, 2] from `episode_confusion`; `class_index` [B] and
    `valid` [B] (optional) only count episodes per class."""
    conf = to_host(conf)
    if conf.shape != self.conf.shape:
      raise ValueError(f"episode confusion has shape {conf.shape}; expected {self.conf.shape}")
    self.conf += conf.astype(np.int64)
    if class_index is not None:
      ci = to_host(class_index).reshape(-1)
      keep = (ci >= 0) & (ci < self.num_classes)
      if valid is not None:
        keep = keep & to_host(valid).reshape(-1).astype(bool)
      np.add.at(self.num_episodes, ci[keep], 1)

  def result(self) -> dict:
    out = fewshot_iou(self.conf, self.class_ids)
    ids = slice(None) if self.class_ids is None else self.class_ids
    out["episodes"] = self.num_episodes[ids]
    return out
