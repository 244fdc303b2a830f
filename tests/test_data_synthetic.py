"""The generated `lseg_synthetic` dataset: build, contract, learnability."""
import numpy as np
import pytest
import tensorflow as tf

from lseg_jax.data import registry
from lseg_jax.data import synthetic

CONFIG = dict(height=32, width=48, num_train=24, num_validation=8, seed=3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  synthetic.build(path, **CONFIG)
  return path


def _examples(source):
  return list(source.as_dataset().as_numpy_iterator())


def test_build_splits_and_contract(data_dir):
  train = registry.get_source("synthetic", "train", data_dir=data_dir, **CONFIG)
  val = registry.get_source("synthetic", "validation", data_dir=data_dir,
                            **CONFIG)
  assert train.num_examples == 24 and val.num_examples == 8
  assert train.label_names == list(synthetic.LABEL_NAMES)
  assert not train.is_episodic
  ex = _examples(val)[0]
  assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 48, 3)
  assert ex["mask"].dtype == np.int32 and ex["mask"].shape == (32, 48)
  assert ex["file_name"] == b"validation_000000"
  masks = np.stack([e["mask"] for e in _examples(train)])
  assert masks.min() == -1  # Boundary bands are ignore.
  assert masks.max() < len(synthetic.LABEL_NAMES)
  assert len(np.unique(masks)) == len(synthetic.LABEL_NAMES) + 1


def test_deterministic_by_seed():
  rng = lambda s: np.random.default_rng([s, 0, 5])
  a = synthetic.generate_scene(rng(0), 40, 40)
  b = synthetic.generate_scene(rng(0), 40, 40)
  c = synthetic.generate_scene(rng(1), 40, 40)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])


def test_rebuild_in_other_dir_is_identical(data_dir, tmp_path):
  again = synthetic.build(str(tmp_path), **CONFIG)
  first = synthetic.source_from_tfds(again, "validation", ["x"] * 6)
  ref = registry.get_source("synthetic", "validation", data_dir=data_dir,
                            **CONFIG)
  for a, b in zip(_examples(first), _examples(ref)):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])


def test_class_is_learnable_from_local_appearance(data_dir):
  """A nearest-centroid rule on 5x5 mean colour segments validation well."""
  def features(images):
    x = tf.nn.avg_pool2d(tf.constant(images, tf.float32), 5, 1, "SAME")
    return x.numpy().reshape(-1, 3)

  def load(split):
    exs = _examples(registry.get_source("synthetic", split,
                                        data_dir=data_dir, **CONFIG))
    return (features(np.stack([e["image"] for e in exs])),
            np.stack([e["mask"] for e in exs]).ravel())
  x, y = load("train")
  centroids = np.stack([x[y == c].mean(0) for c in range(6)])
  x, y = load("validation")
  keep = y >= 0
  pred = np.argmin(((x[keep, None] - centroids) ** 2).sum(-1), -1)
  assert (pred == y[keep]).mean() > 0.9


def test_too_small_config_is_rejected():
  with pytest.raises(ValueError, match="height=8"):
    synthetic.make_config(height=8)
