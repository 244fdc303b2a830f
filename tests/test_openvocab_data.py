"""The open-vocabulary benchmark sources read their prepared (detectron2) layouts.

Each test writes tiny fixtures of the layouts (`openvocab_fixtures`) and reads
them through the registry and the eval pipeline.
"""
import io
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from lseg_jax.data import dataset_files
from lseg_jax.data import input_pipeline as ip
from lseg_jax.data import label_names
from lseg_jax.data import registry

import openvocab_fixtures as fixtures

NAMES = ("a847", "pc459", "a150", "pc59", "pas20", "pas21", "pas20b")
LISTS = {"a847": "a847", "pc459": "pc459", "a150": "a150", "pc59": "pc59",
         "pas20": "voc20", "pas21": "voc20", "pas20b": "voc20"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  path = tmp_path_factory.mktemp("datasets")
  fixtures.write_all(path)
  return str(path)


@pytest.mark.parametrize("name", NAMES)
def test_sources_read_the_prepared_layouts(root, name):
  source = registry.get_source(name, "validation", data_dir=root)
  num_classes = fixtures.NUM_CLASSES[name]
  assert len(source.label_names) == num_classes and not source.is_episodic
  names = list(label_names.class_names(LISTS[name]))
  assert source.label_names[:len(names)] == names
  # Only the images with label files are examples (other splits' images are not).
  assert source.num_examples == 2
  examples = list(source.as_dataset().as_numpy_iterator())
  seen = set()
  for i, ex in enumerate(examples):
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (24, 32, 3)
    np.testing.assert_allclose(ex["image"], fixtures.expected_image(name, i), atol=3)
    assert ex["mask"].dtype == np.int32
    np.testing.assert_array_equal(ex["mask"], fixtures.expected_mask(name, i))
    assert (ex["mask"] == -1).any()
    assert os.path.basename(ex["file_name"].decode()).endswith(".jpg")
    seen |= set(np.unique(ex["mask"]).tolist())
  # Every class (ids above 255 in the 16-bit maps too) and ignore, untruncated.
  assert seen == set(range(-1, num_classes))


def test_class_lists():
  sizes = {"a847": 847, "pc459": 459, "a150": 150, "pc59": 59, "voc20": 20,
           "voc20b": 59}
  for name, size in sizes.items():
    names = label_names.class_names(name)
    assert len(names) == len(set(names)) == size
    assert all(n == n.strip() and n and not n.startswith("#") for n in names)
  a847 = label_names.class_names("a847")
  assert a847[:2] == ("wall", "building, edifice") and a847[-1] == (
      "adding machine, totalizer, totaliser")
  assert label_names.class_names("voc20") == label_names.PASCAL_VOC_NAMES
  # `a150` keeps the data of `ade20k` but names it with the benchmark's list.
  assert label_names.class_names("a150")[44] == "chest of drawers"
  assert label_names.ADE20K_NAMES[44] == "chest"


def test_pas20b_scores_pc59_names_as_background(root):
  source = registry.get_source("pas20b", "validation", data_dir=root)
  voc = list(label_names.class_names("voc20"))
  pc59 = label_names.class_names("pc59")
  assert source.label_names == [*voc, "background"]
  scored, scored_class = source.scored_names, source.scored_class
  assert len(scored) == 59 and scored_class.dtype == np.int32
  assert scored[:20] == voc
  np.testing.assert_array_equal(scored_class[:20], np.arange(20))
  assert sorted(scored[20:]) == sorted(n for n in pc59 if n not in voc)
  np.testing.assert_array_equal(scored_class[20:], np.full(39, 20))
  # A prediction over the scored names, mapped through scored_class, indexes the
  # masks' classes: "wall" (scored, not a VOC class) counts as background.
  assert source.label_names[scored_class[scored.index("wall")]] == "background"
  # Every other source scores its own label names.
  for name in ("pas21", "a847"):
    other = registry.get_source(name, "validation", data_dir=root)
    assert other.scored_names == other.label_names
    np.testing.assert_array_equal(other.scored_class,
                                  np.arange(len(other.label_names)))


def test_eval_batches_keep_ids_above_255(root):
  cfg = ip.default_data_config()
  cfg.update(name="a847", data_dir=root, num_parallel_calls=1)
  batches = list(ip.make_eval_iterator(cfg, batch_size=2, process_index=0,
                                       process_count=1))
  np.testing.assert_array_equal(
      batches[0]["label"], np.stack([fixtures.expected_mask("a847", i) for i in (0, 1)]))
  assert batches[0]["label"].max() == 846


def test_label_value_outside_the_classes_is_named(tmp_path):
  fixtures.write_a847(tmp_path)
  path = (tmp_path / "ADE20K_2021_17_01/annotations_detectron2/validation/"
          "ADE_val_00000002.tif")
  label = np.asarray(Image.open(path)).copy()
  label[3, 4] = 900
  Image.fromarray(label).save(path)
  cfg = ip.default_data_config()
  cfg.update(name="a847", data_dir=str(tmp_path), num_parallel_calls=1)
  with pytest.raises(ip.BadExampleError,
                     match=r"ADE_val_00000002.jpg.*value 900 outside \[0, 847\).*"
                           r"0-846 \(847 labels\) or 65535 for ignore"):
    list(ip.make_eval_iterator(cfg, batch_size=2, process_index=0, process_count=1))


@pytest.mark.parametrize("dtype,mode", [(np.uint16, "I;16"), (np.uint8, "L"),
                                        (np.int32, "I")])
def test_tiff_label_maps_decode_at_full_depth(dtype, mode):
  values = np.minimum([[0, 255, 256], [458, 846, 65535]], np.iinfo(dtype).max)
  values = values.astype(dtype)
  image = Image.fromarray(values)
  assert image.mode == mode
  buffer = io.BytesIO()
  image.save(buffer, format="TIFF")
  decoded = dataset_files.decode_label_map(tf.constant(buffer.getvalue()))
  np.testing.assert_array_equal(decoded.numpy(), values.astype(np.int32))


def test_missing_layout_names_the_preparation(tmp_path):
  for name, script in (("a847", "prepare_ade20k_full.py"),
                       ("pc459", "prepare_pascal_context_459.py"),
                       ("pc59", "prepare_pascal_context_59.py"),
                       ("pas20", "prepare_voc.py"), ("pas20b", "prepare_voc.py")):
    with pytest.raises(FileNotFoundError, match=script):
      registry.get_source(name, "validation", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="'train'"):
    registry.get_source("pc59", "train", data_dir=str(tmp_path))
  fixtures.write_pas20(tmp_path)
  os.remove(tmp_path / "VOCdevkit/VOC2012/JPEGImages/2007_000001.jpg")
  with pytest.raises(FileNotFoundError, match="JPEGImages/2007_000001.jpg is missing"):
    registry.get_source("pas20", "validation", data_dir=str(tmp_path))


def test_undecodable_label_map_is_named(tmp_path):
  fixtures.write_pc459(tmp_path)
  path = tmp_path / "VOCdevkit/VOC2010/annotations_detectron2/pc459_val/2008_000001.tif"
  path.write_bytes(path.read_bytes()[:200])
  cfg = ip.default_data_config()
  cfg.update(name="pc459", data_dir=str(tmp_path), num_parallel_calls=1)
  with pytest.raises(ip.BadExampleError,
                     match=r"^Bad example '.*2008_000001.jpg': its mask cannot be decoded "
                           r"\(Pillow: image file is truncated.*\)\. Set data_cfg"):
    list(ip.make_eval_iterator(cfg, batch_size=2, process_index=0, process_count=1))
