"""Metrics against hand-computed values and against the official formulas.

The references re-state PyTorch-Encoding's histogram-based
`batch_intersection_union` / `batch_pix_accuracy` and HSNet's
`Evaluator` / `AverageMeter` semantics in a few lines of numpy.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax import labels
from lseg_jax import metrics


def test_confusion_matrix_by_hand():
  label = np.array([[[0, 0, 1], [1, 2, -1]]])
  pred = np.array([[[0, 1, 1], [2, 2, 0]]])
  conf = np.asarray(metrics.confusion_matrix(pred, label, 3))
  expected = np.array([[1, 1, 0],
                       [0, 1, 1],
                       [0, 0, 1]])
  np.testing.assert_array_equal(conf, expected)
  assert conf.dtype == np.int32


def test_valid_drops_padding_examples():
  label = np.zeros((2, 2, 2), np.int32)
  pred = np.ones((2, 2, 2), np.int32)
  pred[0] = 0
  conf = metrics.confusion_matrix(pred, label, 2, valid=np.array([True, False]))
  np.testing.assert_array_equal(np.asarray(conf), [[4, 0], [0, 0]])


def test_out_of_range_labels_are_ignored():
  label = np.array([[[0, 255, 3, -1]]])
  pred = np.array([[[0, 1, 1, 1]]])
  np.testing.assert_array_equal(
      np.asarray(metrics.confusion_matrix(pred, label, 3)),
      [[1, 0, 0], [0, 0, 0], [0, 0, 0]])


def test_miou_pixacc_by_hand_with_absent_class():
  # Class 3 is absent from labels and predictions: IoU 0, counted in the mean.
  conf = np.array([[3, 1, 0, 0],
                   [0, 2, 2, 0],
                   [1, 0, 1, 0],
                   [0, 0, 0, 0]])
  r = metrics.miou_pixacc(conf)
  assert r["correct"] == 6 and r["labeled"] == 10
  assert r["pixAcc"] == pytest.approx(0.6)
  # I = [3, 2, 1, 0]; U = [3+1+1, 3+4-2... ] computed by hand:
  # class 0: row 4 + col 4 - 3 = 5; class 1: row 4 + col 3 - 2 = 5;
  # class 2: row 2 + col 3 - 1 = 4; class 3: 0.
  np.testing.assert_array_equal(r["union"], [5, 5, 4, 0])
  np.testing.assert_allclose(r["iou"], [3 / 5, 2 / 5, 1 / 4, 0.0])
  assert r["mIoU"] == pytest.approx((0.6 + 0.4 + 0.25 + 0.0) / 4)
  assert r["mIoU_present"] == pytest.approx((0.6 + 0.4 + 0.25) / 3)


def _encoding_reference(preds, labels, nclass):
  """PyTorch-Encoding's SegmentationMetric: +1 shift, histogram over [1, C]."""
  correct = labeled = 0
  inter = np.zeros(nclass)
  union = np.zeros(nclass)
  for p, t in zip(preds, labels):
    p, t = p.astype(np.int64) + 1, t.astype(np.int64) + 1
    labeled += np.sum(t > 0)
    correct += np.sum((p == t) * (t > 0))
    p = p * (t > 0)
    i = p * (p == t)
    a_i, _ = np.histogram(i, bins=nclass, range=(1, nclass))
    a_p, _ = np.histogram(p, bins=nclass, range=(1, nclass))
    a_t, _ = np.histogram(t, bins=nclass, range=(1, nclass))
    inter += a_i
    union += a_p + a_t - a_i
  pix_acc = correct / (np.spacing(1) + labeled)
  iou = inter / (np.spacing(1) + union)
  return pix_acc, iou.mean(), iou


def test_matches_official_formulas_over_batches():
  rng = np.random.default_rng(0)
  c = 7
  meter = metrics.SegmentationMeter(c)
  preds, labels = [], []
  for _ in range(4):
    label = rng.integers(-1, c - 1, size=(3, 9, 11))  # class c-1 never in labels
    pred = rng.integers(0, c - 2, size=(3, 9, 11))     # ... nor predicted
    meter.add(metrics.confusion_matrix(pred, label, c))
    preds.extend(pred)
    labels.extend(label)
  r = meter.result()
  pix_acc, miou, iou = _encoding_reference(preds, labels, c)
  assert r["pixAcc"] == pytest.approx(pix_acc, abs=1e-12)
  assert r["mIoU"] == pytest.approx(miou, abs=1e-12)
  np.testing.assert_allclose(r["iou"], iou, atol=1e-12)
  assert r["iou"][-1] == 0.0


def test_sharded_confusion_equals_single_device():
  devices = jax.devices()
  assert len(devices) == 8
  mesh = jax.make_mesh((8,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
  rng = np.random.default_rng(1)
  label = rng.integers(-1, 5, size=(16, 8, 8)).astype(np.int32)
  pred = rng.integers(0, 5, size=(16, 8, 8)).astype(np.int32)
  valid = np.arange(16) < 13
  single = metrics.confusion_matrix(pred, label, 5, valid=valid)
  args = [jax.device_put(x, sharding) for x in (pred, label, valid)]
  sharded = metrics.confusion_matrix(args[0], args[1], 5, valid=args[2])
  assert sharded.sharding.is_fully_replicated
  np.testing.assert_array_equal(metrics.to_host(sharded), np.asarray(single))


def test_meter_rejects_wrong_shape():
  meter = metrics.SegmentationMeter(3)
  with pytest.raises(ValueError, match=r"\(4, 4\).*\(3, 3\)"):
    meter.add(np.zeros((4, 4), np.int32))
  with pytest.raises(ValueError, match="same shape"):
    metrics.confusion_matrix(jnp.zeros((1, 2, 2), jnp.int32), jnp.zeros((1, 2, 3), jnp.int32), 3)


# --------------------------------------------------------------------------
# Few-shot (HSNet) protocol.
# --------------------------------------------------------------------------
def _hsnet_reference(episodes, nclass, class_ids):
  """HSNet: per-episode histc of {0,1} after setting ignored pixels to 255."""
  inter_buf = np.zeros((2, nclass))
  union_buf = np.zeros((2, nclass))
  for pred, gt, k in episodes:
    pred = np.where(gt < 0, 255, pred)
    gt = np.where(gt < 0, 255, gt)
    hist = lambda x: np.array([np.sum(x == 0), np.sum(x == 1)])
    a_i = hist(pred[pred == gt])
    u = hist(pred) + hist(gt) - a_i
    inter_buf[:, k] += a_i
    union_buf[:, k] += u
  iou = inter_buf / np.maximum(union_buf, 1)
  miou = iou[1, class_ids].mean()
  fb = (inter_buf[:, class_ids].sum(1) / union_buf[:, class_ids].sum(1)).mean()
  return miou, fb


def test_fewshot_by_hand():
  # Two classes; class 0 has two episodes, class 1 one.
  gt = np.array([
      [[1, 1, 0, 0]],
      [[0, 1, -1, 0]],
      [[1, 0, 0, 0]],
  ])
  pred = np.array([
      [[1, 0, 0, 1]],
      [[0, 1, 1, 1]],
      [[1, 1, 0, 0]],
  ])
  ci = np.array([0, 0, 1])
  conf = np.asarray(metrics.episode_confusion(pred, gt, ci, 2))
  # Class 0, episodes 1-2 (ignore dropped): fg I = 1 + 1 = 2,
  # fg U = 3 + 2 = 5; bg I = 1 + 1 = 2, bg U = 3 + 2 = 5.
  r = metrics.fewshot_iou(conf)
  np.testing.assert_array_equal(r["intersection"], [[2, 2], [2, 1]])
  np.testing.assert_array_equal(r["union"], [[5, 5], [3, 2]])
  np.testing.assert_allclose(r["iou"], [2 / 5, 1 / 2])
  assert r["mIoU"] == pytest.approx((0.4 + 0.5) / 2)
  # FB-IoU: bg (2+2)/(5+3), fg (2+1)/(5+2).
  assert r["FB-IoU"] == pytest.approx((4 / 8 + 3 / 7) / 2)
  ref = _hsnet_reference(zip(pred, gt, ci), 2, [0, 1])
  assert r["mIoU"] == pytest.approx(ref[0])
  assert r["FB-IoU"] == pytest.approx(ref[1])


def test_fewshot_meter_matches_hsnet_with_unsampled_class():
  rng = np.random.default_rng(2)
  k, class_ids = 6, [1, 2, 4, 5]   # class 5 never gets an episode: IoU 0, counted.
  meter = metrics.FewShotMeter(k, class_ids=class_ids)
  episodes = []
  for _ in range(5):
    gt = rng.integers(-1, 2, size=(4, 6, 6))
    pred = rng.integers(0, 2, size=(4, 6, 6))
    ci = rng.choice([1, 2, 4], size=4)
    valid = np.array([True, True, True, False])
    meter.add(metrics.episode_confusion(pred, gt, ci, k, valid=valid), ci, valid)
    episodes.extend(list(zip(pred, gt, ci))[:3])
  r = meter.result()
  miou, fb = _hsnet_reference(episodes, k, class_ids)
  assert r["mIoU"] == pytest.approx(miou, abs=1e-12)
  assert r["FB-IoU"] == pytest.approx(fb, abs=1e-12)
  assert r["iou"][-1] == 0.0 and r["episodes"][-1] == 0
  assert r["episodes"].sum() == 15


def test_episode_confusion_rejects_bad_class_index_shape():
  with pytest.raises(ValueError, match="class_index"):
    metrics.episode_confusion(np.zeros((2, 3, 3), np.int32), np.zeros((2, 3, 3), np.int32),
                              np.zeros((3,), np.int32), 4)


def test_numpy_versions_equal_jitted():
  rng = np.random.default_rng(5)
  label = rng.integers(-1, 4, size=(3, 7, 5))
  pred = rng.integers(0, 4, size=(3, 7, 5))
  np.testing.assert_array_equal(metrics.confusion_matrix_np(pred, label, 4),
                                np.asarray(metrics.confusion_matrix(pred, label, 4)))
  bl = rng.integers(-1, 2, size=(3, 7, 5))
  bp = rng.integers(0, 2, size=(3, 7, 5))
  ci = np.array([2, 0, 2])
  np.testing.assert_array_equal(metrics.episode_confusion_np(bp, bl, ci, 3),
                                np.asarray(metrics.episode_confusion(bp, bl, ci, 3)))


def test_ignore_index_matches_the_data_contract():
  from lseg_jax.data import IGNORE_INDEX  # pylint: disable=g-import-not-at-top
  assert labels.IGNORE_INDEX == IGNORE_INDEX == -1
  conf = metrics.confusion_matrix_np(np.array([[0, 1]]), np.array([[0, labels.IGNORE_INDEX]]), 2)
  assert conf.sum() == 1  # the ignored pixel counts nowhere
