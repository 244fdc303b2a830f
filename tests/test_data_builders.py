"""The real dataset sources read their official on-disk layouts.

Every test writes a tiny fixture of the layout (a few small images and label
files) into a temporary directory and reads it through the registry.
"""
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from lseg_jax.data import fewshot
from lseg_jax.data import label_names
from lseg_jax.data import registry

import hsnet_splits


def _examples(source, **kwargs):
  return list(source.as_dataset(**kwargs).as_numpy_iterator())


def _save(path, array, mode=None, palette=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = Image.fromarray(np.asarray(array), mode)
  if palette:  # VOC-style: a palette PNG whose indices are the labels.
    image = image.convert("L").convert("P")
    image.putpalette(list(np.random.default_rng(0).integers(
        0, 256, 768, dtype=np.uint8)))
    image.putdata(list(np.asarray(array).reshape(-1)))
  image.save(path, quality=100)


def _zip_folder(folder, archive, arc_root):
  """Zips every file under `folder` with names relative to `arc_root`."""
  with zipfile.ZipFile(archive, "w") as z:
    for d, _, files in os.walk(folder):
      for f in sorted(files):
        path = os.path.join(d, f)
        z.write(path, os.path.relpath(path, arc_root))


def _colour(i):
  return np.full((6, 8, 3), [40 * i % 256, 90, 200 - 30 * i], np.uint8)


# ------------------------------------------------------------------ ADE20K --
def _write_ade(root, num=3):
  """ADEChallengeData2016 under `root`; returns {split: [label arrays]}."""
  labels = {}
  rng = np.random.default_rng(1)
  for split in ("training", "validation"):
    labels[split] = []
    for i in range(num):
      name = f"ADE_{split[:5]}_{i:08d}"
      _save(f"{root}/ADEChallengeData2016/images/{split}/{name}.jpg",
            _colour(i))
      label = rng.integers(0, 151, (6, 8)).astype(np.uint8)
      label[0, 0] = 0
      _save(f"{root}/ADEChallengeData2016/annotations/{split}/{name}.png",
            label)
      labels[split].append(label)
  return labels


@pytest.mark.parametrize("layout", ["folder", "zip"])
def test_ade20k_layouts(tmp_path, layout):
  labels = _write_ade(tmp_path / "src")
  if layout == "zip":
    data_dir = tmp_path / "zip"
    data_dir.mkdir()
    _zip_folder(tmp_path / "src", data_dir / "ADEChallengeData2016.zip",
                tmp_path / "src")
  else:
    data_dir = tmp_path / "src"
  for split, folder in (("train", "training"), ("validation", "validation")):
    source = registry.get_source("ade20k", split, data_dir=str(data_dir))
    assert source.label_names == list(label_names.ADE20K_NAMES)
    assert source.num_examples == 3 and not source.is_episodic
    examples = _examples(source)
    for i, ex in enumerate(examples):
      assert ex["image"].dtype == np.uint8 and ex["image"].shape == (6, 8, 3)
      np.testing.assert_allclose(ex["image"], _colour(i), atol=3)
      assert ex["mask"].dtype == np.int32
      # Stored 0 ("other") -> ignore; k -> class k - 1.
      np.testing.assert_array_equal(ex["mask"],
                                    labels[folder][i].astype(np.int32) - 1)
      assert ex["file_name"].decode().endswith(
          f"images/{folder}/ADE_{folder[:5]}_{i:08d}.jpg")
  if layout == "zip":  # data_dir may also name the archive itself.
    source = registry.get_source(
        "ade20k", "train", data_dir=str(data_dir / "ADEChallengeData2016.zip"))
    assert source.num_examples == 3


def test_ade20k_shards_and_shuffle(tmp_path):
  _write_ade(tmp_path, num=5)
  source = registry.get_source("ade20k", "train", data_dir=str(tmp_path))
  names = lambda **kw: [ex["file_name"] for ex in _examples(source, **kw)]
  shards = [names(process_index=p, process_count=2) for p in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == names()
  assert names(shuffle=True, seed=3) == names(shuffle=True, seed=3)
  assert sorted(names(shuffle=True, seed=3)) == names()


def test_ade20k_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="ADEChallengeData2016.zip"):
    registry.get_source("ade20k", "train", data_dir=str(tmp_path))
  _write_ade(tmp_path)
  os.remove(tmp_path / "ADEChallengeData2016/annotations/validation/"
            "ADE_valid_00000001.png")
  with pytest.raises(FileNotFoundError,
                     match="annotations/validation/ADE_valid_00000001.png"):
    registry.get_source("ade20k", "validation", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="'testing'"):
    registry.get_source("ade20k", "testing", data_dir=str(tmp_path))


# -------------------------------------------------------------- PASCAL-5i --
def test_pascal5i_episodes(tmp_path):
  fold = 1
  hsnet_splits.write(tmp_path)
  listed = hsnet_splits.pascal_list("val", fold)
  voc = tmp_path / "VOCdevkit" / "VOC2012"
  rng = np.random.default_rng(2)
  labels = {}
  for i, name in enumerate(sorted({n for n, _ in listed})):
    _save(f"{voc}/JPEGImages/{name}.jpg", _colour(i % 5))
    label = rng.choice([0, 6, 7, 8, 9, 10, 15, 255], (6, 8)).astype(np.uint8)
    labels[name] = label
    _save(f"{voc}/SegmentationClassAug/{name}.png", label,
          palette=i % 2 == 0)
  source = registry.get_source("pascal5i", "validation",
                               data_dir=str(tmp_path), fold=fold)
  assert source.is_episodic and source.num_examples == 1000
  assert source.class_names == ["bus", "car", "cat", "chair", "cow"]
  assert source.label_names == ["other", *source.class_names]
  # HSNet cycles through the fold's list: episode i is list[i % len].
  examples = dict(enumerate(source.as_dataset().take(3).as_numpy_iterator()))
  for i in (len(listed), 999):
    examples[i] = tf.nest.map_structure(
        lambda t: t.numpy(), source.load(tf.constant(i, tf.int64)))
  for i, ex in examples.items():
    name, class_id = listed[i % len(listed)]
    assert ex["file_name"].decode().endswith(f"JPEGImages/{name}.jpg")
    assert source.class_names[ex["class_index"]] == ex["class_name"].decode()
    assert label_names.PASCAL_VOC_NAMES[class_id] == ex["class_name"].decode()
    label = labels[name]
    expected = np.where(label == 255, -1, (label == class_id + 1)
                        ).astype(np.int32)
    np.testing.assert_array_equal(ex["mask"], expected)
    assert ex["class_index"].dtype == np.int32


def test_pascal5i_train_needs_all_images(tmp_path):
  hsnet_splits.write(tmp_path)
  (tmp_path / "VOC2012" / "SegmentationClassAug").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match=r"VOC2012/JPEGImages/\S+\.jpg"):
    registry.get_source("pascal5i", "train", data_dir=str(tmp_path), fold=0)
  with pytest.raises(FileNotFoundError, match="SegmentationClassAug"):
    registry.get_source("pascal5i", "validation", data_dir=str(tmp_path / "x"),
                        splits_dir=str(tmp_path / "splits"))
  with pytest.raises(ValueError, match="fold=4"):
    registry.get_source("pascal5i", "validation", data_dir=str(tmp_path),
                        fold=4)


def test_fold_classes():
  assert fewshot.fold_classes("pascal5i", 3, "val") == [15, 16, 17, 18, 19]
  assert len(fewshot.fold_classes("pascal5i", 3, "trn")) == 15
  assert fewshot.fold_classes("coco20i", 2, "val")[:3] == [2, 6, 10]
  assert len(fewshot.fold_classes("coco20i", 2, "trn")) == 60


# --------------------------------------------------------------- COCO-20i --
def test_hsnet_splits_are_required_and_pickles_are_plain(tmp_path, monkeypatch):
  monkeypatch.delenv(fewshot.SPLITS_ENV, raising=False)
  with pytest.raises(FileNotFoundError, match=r"pascal/val/fold0.txt not found.*splits_dir="):
    registry.get_source("pascal5i", "validation", data_dir=str(tmp_path))
  splits = hsnet_splits.write(tmp_path / "elsewhere")
  monkeypatch.setenv(fewshot.SPLITS_ENV, splits)
  assert fewshot.coco20i_image_lists("val", 2) == hsnet_splits.coco_lists("val", 2)
  with open(os.path.join(splits, "coco", "val", "fold1.pkl"), "wb") as f:
    pickle.dump({0: [np.int64(3)]}, f)  # an object beyond plain containers
  with pytest.raises(pickle.UnpicklingError, match="numpy"):
    fewshot.coco20i_image_lists("val", 1)


def test_coco20i_episodes(tmp_path):
  hsnet_splits.write(tmp_path)
  lists = hsnet_splits.coco_lists("val", 2)
  root = tmp_path / "COCO2014"
  labels = {}
  rng = np.random.default_rng(3)
  for c, paths in lists.items():
    for path in paths:
      stem = path[:-4]
      image_id = int(stem[-12:])
      _save(f"{root}/{stem}.jpg", _colour(c % 7))
      label = rng.choice([0, c + 1, (c + 1) % 80 + 1], (6, 8)).astype(np.uint8)
      _save(f"{root}/annotations/{stem}.png", label)
      labels[image_id] = label
  make = lambda seed: registry.get_source(  # noqa: E731
      "coco20i", "validation", data_dir=str(tmp_path), fold=2,
      num_episodes=12, episode_seed=seed)
  source = make(0)
  assert source.num_examples == 12
  assert source.class_names == [
      label_names.COCO_FEWSHOT_NAMES[c] for c in range(2, 80, 4)]
  examples = _examples(source)
  for ex in examples:
    class_id = 2 + 4 * int(ex["class_index"])
    image_id = int(ex["file_name"].decode()[-16:-4])
    assert image_id in [int(p[-16:-4]) for p in lists[class_id]]
    assert ex["class_name"].decode() == label_names.COCO_FEWSHOT_NAMES[
        class_id]
    np.testing.assert_array_equal(
        ex["mask"], (labels[image_id] == class_id + 1).astype(np.int32))
  names = lambda s: [ex["file_name"] for ex in _examples(make(s))]  # noqa
  assert names(0) == [ex["file_name"] for ex in examples]
  assert names(1) != names(0)


PINNED_FOLD0_CLASS_POSITIONS = [18, 17, 19, 1, 6, 6, 4, 19]


def _official_coco_episodes(lists, fold, num, shot, seed=0):
  """lang-seg's COCO-20i test loop written out: `fix_randseed(seed)`, then per
  episode DatasetCOCO.load_frame's np.random.choice calls, in its order."""
  class_ids = [fold + 4 * v for v in range(20)]
  rs = np.random.RandomState(seed)
  episodes = []
  for _ in range(num):
    class_sample = rs.choice(class_ids, 1, replace=False)[0]
    query_name = rs.choice(lists[class_sample], 1, replace=False)[0]
    support_names = []
    if shot:
      while True:
        support_name = rs.choice(lists[class_sample], 1, replace=False)[0]
        if query_name != support_name:
          support_names.append(support_name)
        if len(support_names) == shot:
          break
    episodes.append((int(class_sample), str(query_name)))
  return episodes


def _varied_coco_lists(fold):
  """Lists of 2 to 14 images per class, so that the draws consume different amounts
  of the stream (HSNet's real lists hold hundreds)."""
  return {c: [f"val2014/COCO_val2014_{1000 * c + i:012d}.jpg" for i in range(2 + 5 * c % 13)]
          for c in fewshot.fold_classes("coco20i", fold, "val")}


def test_coco20i_draws_the_official_episodes(tmp_path):
  """The default episodes are the official test_lseg_zs.py sequence, for every fold,
  0-shot and 1-shot; another episode_seed departs from it."""
  splits = tmp_path / "splits"
  hsnet_splits.write(tmp_path)
  root = tmp_path / "COCO2014"
  for fold in range(4):
    lists = _varied_coco_lists(fold)
    with open(splits / "coco" / "val" / f"fold{fold}.pkl", "wb") as f:
      pickle.dump(lists, f)
    for c, paths in lists.items():
      for path in paths:
        if not os.path.exists(f"{root}/{path}"):
          _save(f"{root}/{path}", _colour(c % 7))
          _save(f"{root}/annotations/{path[:-4]}.png", np.full((6, 8), c + 1, np.uint8))
    for shot in (0, 1):
      expected = _official_coco_episodes(lists, fold, 1000, shot)
      source = registry.get_source("coco20i", "validation", data_dir=str(tmp_path),
                                   fold=fold, shot=shot)
      assert source.num_examples == 1000
      classes = fewshot.fold_classes("coco20i", fold, "val")
      pos, paths = fewshot.official_coco_draw(lists, classes, 1000, shot)
      assert [(classes[p], q) for p, q in zip(pos, paths)] == expected
      # The first episodes through the source itself: files, classes, masks.
      first = list(source.as_dataset().take(12).as_numpy_iterator())
      for ex, (class_id, query) in zip(first, expected[:12], strict=True):
        assert ex["file_name"].decode().endswith(query)
        assert classes[ex["class_index"]] == class_id
        assert (ex["mask"] == 1).all()
    assert (_official_coco_episodes(lists, fold, 50, 0)
            != _official_coco_episodes(lists, fold, 50, 1))
    other = fewshot.official_coco_draw(lists, classes, 50, 0, seed=7)
    assert [(classes[p], q) for p, q in zip(*other)] == _official_coco_episodes(
        lists, fold, 50, 0, seed=7)
    assert [(classes[p], q) for p, q in zip(*other)] != expected[:50]
  # Pinned: fold 0's first 0-shot episodes with these lists (NumPy's legacy stream
  # is frozen, so these never change).
  lists = _varied_coco_lists(0)
  pos, _ = fewshot.official_coco_draw(lists, fewshot.fold_classes("coco20i", 0, "val"), 8)
  assert pos == PINNED_FOLD0_CLASS_POSITIONS


def test_coco20i_shot_and_seed_are_checked(tmp_path):
  hsnet_splits.write(tmp_path)
  for kwargs, match in (({"shot": -1}, "shot=-1; expected an integer >= 0"),
                        ({"episode_seed": -3}, r"episode_seed=-3; expected an integer")):
    with pytest.raises(ValueError, match=match):
      registry.get_source("coco20i", "validation", data_dir=str(tmp_path), **kwargs)
  lists = {0: ["val2014/a.jpg"], 4: ["val2014/b.jpg", "val2014/c.jpg"]}
  with pytest.raises(ValueError, match="lists only the query image val2014/a.jpg"):
    fewshot.official_coco_draw(lists, [0], 3, shot=1)


# --------------------------------------------------------------- FSS-1000 --
def test_fss1000_test_episodes(tmp_path):
  hsnet_splits.write(tmp_path)
  categories = sorted(hsnet_splits.FSS_CLASSES["test"])
  rng = np.random.default_rng(4)
  masks = {}
  for i, category in enumerate(categories):
    for n in (1, 2, 10):
      _save(f"{tmp_path}/FSS-1000/{category}/{n}.jpg", _colour(n))
      colours = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0],
                          [0, 255, 0], [128, 128, 128], [127, 127, 127]],
                         np.uint8)
      mask = colours[rng.integers(0, 6, (6, 8))]
      _save(f"{tmp_path}/FSS-1000/{category}/{n}.png", mask)
      masks[f"{category}/{n}"] = mask
  # The official --nshot 0 (the default): every image is a query, in file-name order.
  # HSNet's 1-shot test: every image but the first by name ("1.jpg", the support).
  # Other shots draw supports among the others and keep every query, as HSNet's loader.
  for kwargs, names in (({}, (1, 10, 2)), ({"shot": 0}, (1, 10, 2)),
                        ({"shot": 1}, (10, 2)), ({"shot": 5}, (1, 10, 2))):
    source = registry.get_source("fss1000", "test", data_dir=str(tmp_path), **kwargs)
    assert source.class_names == categories
    per_class = len(names)
    assert source.num_examples == per_class * len(categories)
    dataset = source.as_dataset().take(2 * per_class)
    for i, ex in enumerate(dataset.as_numpy_iterator()):
      category = categories[i // per_class]
      n = names[i % per_class]
      assert ex["file_name"].decode().endswith(f"FSS-1000/{category}/{n}.jpg")
      assert ex["class_index"] == i // per_class
      assert ex["class_name"].decode() == category
      # HSNet: PIL convert("L"), then >= 128 is the class.
      grey = np.asarray(Image.fromarray(masks[f"{category}/{n}"]).convert("L"))
      np.testing.assert_array_equal(ex["mask"], (grey >= 128).astype(np.int32))
  with pytest.raises(ValueError, match="FSS-1000 shot=-1; expected an integer >= 0"):
    registry.get_source("fss1000", "test", data_dir=str(tmp_path), shot=-1)
  os.remove(tmp_path / "FSS-1000" / categories[5] / "2.png")
  with pytest.raises(FileNotFoundError, match=f"{categories[5]}/2.png"):
    registry.get_source("fss1000", "test", data_dir=str(tmp_path))
  for f in os.listdir(tmp_path / "FSS-1000" / categories[7]):
    os.remove(tmp_path / "FSS-1000" / categories[7] / f)
  with pytest.raises(FileNotFoundError, match=f"folder .*{categories[7]}/"):
    registry.get_source("fss1000", "test", data_dir=str(tmp_path))


# ------------------------------------------------------------- Cityscapes --
# cityscapesScripts labels.py: label id -> train id; all other ids ignored.
_CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7,
                         21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
                         28: 15, 31: 16, 32: 17, 33: 18}


def _write_cityscapes(root):
  ids = np.arange(48).reshape(6, 8) % 36  # 34, 35: unknown ids -> ignore.
  for split, city in (("train", "aachen"), ("val", "lindau")):
    for i in range(2):
      stem = f"{city}_{i:06d}_000019"
      _save(f"{root}/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png",
            _colour(i))
      _save(f"{root}/gtFine/{split}/{city}/{stem}_gtFine_labelIds.png",
            ((ids + i) % 36).astype(np.uint8))
  return ids


@pytest.mark.parametrize("layout", ["folder", "zip"])
def test_cityscapes_layouts(tmp_path, layout):
  ids = _write_cityscapes(tmp_path / "src")
  data_dir = tmp_path / "src"
  if layout == "zip":
    data_dir = tmp_path / "zips"
    data_dir.mkdir()
    for part in ("leftImg8bit", "gtFine"):
      _zip_folder(tmp_path / "src" / part,
                  data_dir / f"{part}_trainvaltest.zip", tmp_path / "src")
  source = registry.get_source("cityscapes", "validation",
                               data_dir=str(data_dir))
  assert source.label_names == list(label_names.CITYSCAPES_NAMES)
  examples = _examples(source)
  assert len(examples) == 2
  for i, ex in enumerate(examples):
    np.testing.assert_array_equal(ex["image"], _colour(i))
    raw = (ids + i) % 36
    expected = np.full(raw.shape, -1, np.int32)
    for label_id, train_id in _CITYSCAPES_TRAIN_IDS.items():
      expected[raw == label_id] = train_id
    np.testing.assert_array_equal(ex["mask"], expected)


def test_cityscapes_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="leftImg8bit_trainvaltest.zip"):
    registry.get_source("cityscapes", "train", data_dir=str(tmp_path))
  _write_cityscapes(tmp_path)
  os.remove(tmp_path / "gtFine/train/aachen/aachen_000001_000019_gtFine_"
            "labelIds.png")
  with pytest.raises(FileNotFoundError,
                     match="aachen_000001_000019_gtFine_labelIds.png"):
    registry.get_source("cityscapes", "train", data_dir=str(tmp_path))


def test_cityscapes_from_tfds(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=2):
    source = registry.get_source("cityscapes", "validation",
                                 data_dir=str(tmp_path), use_tfds=True,
                                 tfds_data_dir=str(tmp_path / "tfds"))
    examples = _examples(source, process_index=1, process_count=2)
  assert source.label_names == list(label_names.CITYSCAPES_NAMES)
  for ex in examples:
    assert ex["image"].shape == (1024, 2048, 3)
    assert ex["image"].dtype == np.uint8
    assert ex["mask"].shape == (1024, 2048) and ex["mask"].dtype == np.int32
    assert ex["mask"].min() >= -1 and ex["mask"].max() <= 18


# ------------------------------------------------- other mixture datasets --
def _raw_labels(seed, values):
  return np.random.default_rng(seed).choice(values, (6, 8)).astype(np.uint8)


def _write_bdd(root, legacy):
  raw = _raw_labels(5, [0, 5, 18, 19, 255])
  if legacy:
    _save(f"{root}/bdd100k/seg/images/val/7d2f7975-e0c1c5a7.jpg", _colour(1))
    _save(f"{root}/bdd100k/seg/labels/val/7d2f7975-e0c1c5a7_train_id.png", raw)
  else:
    _save(f"{root}/bdd100k/images/10k/val/7d2f7975-e0c1c5a7.jpg", _colour(1))
    _save(f"{root}/bdd100k/labels/sem_seg/masks/val/7d2f7975-e0c1c5a7.png",
          raw)
  return raw, np.where(raw < 19, raw.astype(np.int32), -1)


def _write_idd(root):
  raw = _raw_labels(6, [0, 4, 25, 26, 255])
  base = f"{root}/IDD_Segmentation"
  _save(f"{base}/leftImg8bit/val/119/000123_leftImg8bit.png", _colour(1))
  _save(f"{base}/gtFine/val/119/000123_gtFine_labellevel3Ids.png", raw)
  return raw, np.where(raw < 26, raw.astype(np.int32), -1)


def _write_mapillary(root, v2=False):
  raw = _raw_labels(7, [0, 13, 64, 65])
  labels_dir = "v1.2/labels" if v2 else "labels"  # v2.0 keeps v1.2 apart.
  _save(f"{root}/validation/images/-abc_DEF.jpg", _colour(1))
  _save(f"{root}/validation/{labels_dir}/-abc_DEF.png", raw, palette=True)
  labels = [{"readable": n.title(), "name": n}
            for n in (*label_names.MAPILLARY_VISTAS_NAMES, "unlabeled")]
  with open(f"{root}/config.json", "w") as f:
    json.dump({"labels": labels}, f)
  return raw, np.where(raw < 65, raw.astype(np.int32), -1)


def _write_sunrgbd(root):
  raw = _raw_labels(8, [0, 1, 37])
  _save(f"{root}/sun_rgbd/image/test/img-000042.jpg", _colour(1))
  _save(f"{root}/sun_rgbd/label37/test/00000042.png", raw)
  return raw, raw.astype(np.int32) - 1


@pytest.mark.parametrize("name,write", [
    ("bdd100k", lambda root: _write_bdd(root, legacy=False)),
    ("bdd100k", lambda root: _write_bdd(root, legacy=True)),
    ("idd", _write_idd),
    ("mapillary_vistas", _write_mapillary),
    ("mapillary_vistas", lambda root: _write_mapillary(root, v2=True)),
    ("sunrgbd", _write_sunrgbd),
])
def test_mixture_dataset_layouts(tmp_path, name, write):
  raw, expected = write(tmp_path)
  source = registry.get_source(name, "validation", data_dir=str(tmp_path))
  assert source.label_names == list(label_names.DATASET_LABEL_NAMES[name])
  (ex,) = _examples(source)
  np.testing.assert_allclose(ex["image"], _colour(1), atol=3)
  np.testing.assert_array_equal(ex["mask"], expected)


def test_idd_needs_generated_labels(tmp_path):
  _write_idd(tmp_path)
  os.remove(tmp_path / "IDD_Segmentation/gtFine/val/119/"
            "000123_gtFine_labellevel3Ids.png")
  with pytest.raises(FileNotFoundError, match="createLabels.py"):
    registry.get_source("idd", "validation", data_dir=str(tmp_path))


def test_mapillary_rejects_other_versions(tmp_path):
  _write_mapillary(tmp_path)
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"labels": [{"readable": "Bird"}] * 124}, f)
  with pytest.raises(ValueError, match="v1.2"):
    registry.get_source("mapillary_vistas", "validation",
                        data_dir=str(tmp_path))


def test_coco_panoptic(tmp_path):
  categories = [{"id": 1, "name": "person"}, {"id": 7, "name": "train"},
                {"id": 200, "name": "rug-merged"}]
  segments = {5: 1, 300: 200, 70000: 7}  # Segment id -> category id.
  ids = np.random.default_rng(9).choice([0, 5, 300, 70000, 999], (6, 8))
  _save(f"{tmp_path}/val2017/000000000139.jpg", _colour(2))
  rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1)
  _save(f"{tmp_path}/annotations/panoptic_val2017/000000000139.png",
        rgb.astype(np.uint8))
  annotations = {
      "categories": categories,
      "images": [{"id": 139, "file_name": "000000000139.jpg"}],
      "annotations": [{"image_id": 139, "file_name": "000000000139.png",
                       "segments_info": [{"id": s, "category_id": c}
                                         for s, c in segments.items()]}]}
  with open(tmp_path / "annotations/panoptic_val2017.json", "w") as f:
    json.dump(annotations, f)
  source = registry.get_source("coco_panoptic", "validation",
                               data_dir=str(tmp_path))
  assert len(source.label_names) == 133
  (ex,) = _examples(source)
  names = label_names.COCO_PANOPTIC_NAMES
  expected = np.full(ids.shape, -1, np.int32)
  for segment, name in ((5, "person"), (300, "rug-merged"), (70000, "train")):
    expected[ids == segment] = names.index(name)
  np.testing.assert_array_equal(ex["mask"], expected)
  np.testing.assert_allclose(ex["image"], _colour(2), atol=3)


def test_every_source_is_registered():
  assert {"ade20k", "bdd100k", "cityscapes", "coco_panoptic", "idd",
          "mapillary_vistas", "sunrgbd", "pascal5i", "coco20i", "fss1000"
          } <= set(registry.available_sources())
  for name, names in label_names.DATASET_LABEL_NAMES.items():
    with pytest.raises((ValueError, FileNotFoundError), match="data_dir"):
      registry.get_source(name, "validation")
