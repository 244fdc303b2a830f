"""The other datasets of LSeg's 7-dataset mixture, in their official layouts.

  source = registry.get_source("cityscapes", "train", data_dir=DIR)

Registered sources (label names in `label_names.py`; "ade20k" lives in
`ade20k.py`), each with splits "train" and "validation":
  bdd100k           BDD100K semantic segmentation, 19 classes (train ids).
  cityscapes        Cityscapes fine annotations, label ids -> 19 train ids;
                    also from TFDS `cityscapes/semantic_segmentation` with
                    `use_tfds=True`.
  coco_panoptic     COCO panoptic 2017 as semantic masks, 133 classes.
  idd               IDD segmentation (IDD 20k part I), 26 level-3 classes.
  mapillary_vistas  Mapillary Vistas v1.2, 65 classes.
  sunrgbd           SUN RGB-D, 37 classes ("validation" = its test split).
Everything a dataset marks as void / unlabeled becomes -1 (ignore). The
error raised when files are missing names the archive to download and where
to put it; docs/datasets.md has the details.
"""
from __future__ import annotations

import json

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from lseg_jax.data import dataset_files
from lseg_jax.data import registry
from lseg_jax.data.label_names import (
    BDD100K_NAMES, CITYSCAPES_NAMES, COCO_PANOPTIC_NAMES, IDD_LEVEL3_NAMES,
    MAPILLARY_VISTAS_NAMES, SUNRGBD_NAMES)
from lseg_jax.data.preprocess import IGNORE_INDEX

_TRAIN_VAL = {"train": "train", "validation": "val", "val": "val"}
# Cityscapes label id (0..33) -> train id (cityscapesScripts `labels.py`);
# every id without a train id is ignored.
CITYSCAPES_TRAIN_IDS = np.array(
    [-1, -1, -1, -1, -1, -1, -1, 0, 1, -1, -1, 2, 3, 4, -1, -1, -1, 5, -1, 6,
     7, 8, 9, 10, 11, 12, 13, 14, 15, -1, -1, 16, 17, 18], np.int32)


def _identity(num_classes):
  """Stored value k < num_classes is class k; the rest (255 = void) ignored."""
  return np.arange(num_classes)


def _files_source(label_names, trees, pattern, mask_pattern, mask_of, table,
                  dataset, expected):
  image_tree, mask_tree = trees
  images, masks = dataset_files.pair_files(
      image_tree, pattern, mask_tree, mask_pattern, mask_of, dataset=dataset,
      expected=expected)
  return dataset_files.FileSegmentation(
      label_names=label_names, image_tree=image_tree, images=images,
      mask_tree=mask_tree, masks=masks, value_table=table)


# ----------------------------------------------------------------- BDD100K --
BDD_EXPECTED = (
    "BDD100K from https://bdd-data.berkeley.edu/ (or https://dl.cv.ethz.ch/"
    "bdd100k/data/): bdd100k_images_10k.zip and "
    "bdd100k_sem_seg_labels_trainval.zip in {d}/ (read in place) or extracted "
    "there (giving {d}/bdd100k/images/10k/train/*.jpg and "
    "{d}/bdd100k/labels/sem_seg/masks/train/*.png); or the older "
    "bdd100k_seg.zip ({d}/bdd100k/seg/images/, {d}/bdd100k/seg/labels/).")


@registry.register("bdd100k")
def make_bdd100k(split: str, *, data_dir: str | None = None):
  """BDD100K 10k semantic segmentation: "train" (7,000), "validation"."""
  split = dataset_files.split_folder(split, _TRAIN_VAL, "BDD100K")
  expected = BDD_EXPECTED.format(d=data_dir)
  find = lambda marker, archive: dataset_files.find_root(  # noqa: E731
      data_dir, marker=marker, dataset="BDD100K", expected=expected,
      folders=("bdd100k",), archives=(archive,))
  try:  # The older single-archive release.
    tree = find("seg/labels", "bdd100k_seg.zip")
    return _files_source(
        BDD100K_NAMES, (tree, tree), f"seg/images/{split}/*.jpg",
        f"seg/labels/{split}/*_train_id.png",
        lambda p: f"seg/labels/{split}/{_stem(p)}_train_id.png",
        _identity(19), "BDD100K", expected)
  except FileNotFoundError:
    pass
  trees = (find("images/10k", "bdd100k_images_10k.zip"),
           find("labels/sem_seg", "bdd100k_sem_seg_labels_trainval.zip"))
  return _files_source(
      BDD100K_NAMES, trees, f"images/10k/{split}/*.jpg",
      f"labels/sem_seg/masks/{split}/*.png",
      lambda p: f"labels/sem_seg/masks/{split}/{_stem(p)}.png",
      _identity(19), "BDD100K", expected)


def _stem(path):
  return path.rsplit("/", 1)[-1].rsplit(".", 1)[0]


# -------------------------------------------------------------- Cityscapes --
CITYSCAPES_EXPECTED = (
    "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
    "https://www.cityscapes-dataset.com/downloads/ (registration needed) in "
    "{d}/ (read in place) or extracted there, giving "
    "{d}/leftImg8bit/train/<city>/*_leftImg8bit.png and "
    "{d}/gtFine/train/<city>/*_gtFine_labelIds.png.")


@registry.register("cityscapes")
def make_cityscapes(split: str, *, data_dir: str | None = None,
                    use_tfds: bool = False, tfds_data_dir: str | None = None):
  """Cityscapes fine: "train" (2,975) or "validation" (500).

  With `use_tfds`, reads TFDS's `cityscapes/semantic_segmentation` from
  `tfds_data_dir`, preparing it first from the two zips in `data_dir` (its
  manual download folder) if needed.
  """
  folder = dataset_files.split_folder(split, _TRAIN_VAL, "Cityscapes")
  expected = CITYSCAPES_EXPECTED.format(d=data_dir)
  if use_tfds:
    builder = tfds.builder("cityscapes/semantic_segmentation",
                           data_dir=tfds_data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=data_dir))
    return TfdsSegmentation(
        builder, {"val": "validation"}.get(folder, folder),
        label_names=CITYSCAPES_NAMES, image_key="image_left",
        mask_key="segmentation_label", name_key="image_id",
        value_table=CITYSCAPES_TRAIN_IDS)
  trees = tuple(
      dataset_files.find_root(data_dir, marker=part, dataset="Cityscapes",
                              expected=expected,
                              archives=(f"{part}_trainvaltest.zip",))
      for part in ("leftImg8bit", "gtFine"))
  return _files_source(
      CITYSCAPES_NAMES, trees, f"leftImg8bit/{folder}/*/*_leftImg8bit.png",
      f"gtFine/{folder}/*/*_gtFine_labelIds.png",
      lambda p: ("gtFine" + p[len("leftImg8bit"):-len("_leftImg8bit.png")] +
                 "_gtFine_labelIds.png"),
      CITYSCAPES_TRAIN_IDS, "Cityscapes", expected)


class TfdsSegmentation(registry.Source):
  """A prepared TFDS segmentation dataset, streamed (not indexed)."""

  is_indexed = False

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str, *,
               label_names, image_key: str, mask_key: str, name_key: str,
               value_table: np.ndarray):
    splits = builder.info.splits
    if splits and split not in splits:
      raise ValueError(f"Unknown split {split!r} of {builder.name}; expected "
                       f"one of {sorted(splits)}.")
    self.label_names = list(label_names)
    self.num_examples = splits[split].num_examples if splits else None
    self._builder, self._split = builder, split
    self._keys = image_key, mask_key, name_key
    self._table = np.asarray(value_table, np.int32)

  def as_dataset(self, *, process_index=0, process_count=1, shuffle=False,
                 seed=0):
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} must be in "
                       f"[0, process_count={process_count}).")
    split = tfds.even_splits(self._split, n=process_count)[process_index]
    ds = self._builder.as_dataset(
        split=split, shuffle_files=shuffle,
        read_config=tfds.ReadConfig(shuffle_seed=seed))
    image_key, mask_key, name_key = self._keys

    def convert(ex):
      mask = tf.cast(ex[mask_key][..., 0], tf.int32)
      return {"image": ex[image_key],
              "mask": dataset_files.map_values(mask, self._table),
              "file_name": ex[name_key]}
    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)


# ----------------------------------------------------------- COCO panoptic --
COCO_PANOPTIC_EXPECTED = (
    "COCO 2017 from https://cocodataset.org/#download: train2017.zip and "
    "val2017.zip in {d}/ (read in place, or extracted to {d}/train2017/*.jpg, "
    "{d}/val2017/*.jpg), and panoptic_annotations_trainval2017.zip extracted "
    "in {d}/ (giving {d}/annotations/panoptic_train2017.json) with the "
    "archives inside it, {d}/annotations/panoptic_train2017.zip and "
    "panoptic_val2017.zip, read in place or extracted to "
    "{d}/annotations/panoptic_train2017/*.png.")


@registry.register("coco_panoptic")
def make_coco_panoptic(split: str, *, data_dir: str | None = None):
  """COCO panoptic 2017, "train" (118,287) or "validation" (5,000)."""
  split = dataset_files.split_folder(split, _TRAIN_VAL, "COCO panoptic")
  expected = COCO_PANOPTIC_EXPECTED.format(d=data_dir)

  def find(base, marker):
    return dataset_files.find_root(
        base, marker=marker, dataset="COCO panoptic", expected=expected,
        archives=(f"{marker}.zip",))
  image_tree = find(data_dir, f"{split}2017")
  mask_tree = find(f"{data_dir}/annotations", f"panoptic_{split}2017")
  ann_file = f"{data_dir}/annotations/panoptic_{split}2017.json"
  if not tf.io.gfile.exists(ann_file):
    raise FileNotFoundError(f"COCO panoptic: {ann_file} is missing. "
                            f"Expected: {expected}")
  with tf.io.gfile.GFile(ann_file) as f:
    return CocoPanoptic(json.load(f), image_tree, f"{split}2017", mask_tree,
                        f"panoptic_{split}2017", expected)


class CocoPanoptic(dataset_files.FilePairs):
  """COCO panoptic PNGs (segment id = R + 256 G + 256^2 B) as class masks.

  Every segment, crowd regions included, takes its category's class; pixels
  of no segment (id 0) are ignored.
  """

  def __init__(self, annotations: dict, image_tree, image_folder, mask_tree,
               mask_folder, expected):
    class_of = {}
    for cat in annotations["categories"]:
      if cat["name"] not in COCO_PANOPTIC_NAMES:
        raise ValueError(f"COCO panoptic category {cat['name']!r} is not one "
                         "of the 133 of panoptic_coco_categories.json.")
      class_of[cat["id"]] = COCO_PANOPTIC_NAMES.index(cat["name"])
    image_file = {im["id"]: im["file_name"] for im in annotations["images"]}
    anns = sorted(annotations["annotations"], key=lambda a: a["file_name"])
    images = [f"{image_folder}/{image_file[a['image_id']]}" for a in anns]
    masks = [f"{mask_folder}/{a['file_name']}" for a in anns]
    for tree, paths, pattern in ((image_tree, images, f"{image_folder}/*"),
                                 (mask_tree, masks, f"{mask_folder}/*.png")):
      dataset_files.check_present(tree, paths, pattern,
                                  dataset="COCO panoptic", expected=expected)
    super().__init__(image_tree, images, mask_tree, masks)
    self.label_names = list(COCO_PANOPTIC_NAMES)
    # Per image, its segment ids sorted, behind a sentinel id 0 (-> ignore) so
    # that every lookup has a row to land on.
    ids, classes, starts = [], [], [0]
    for a in anns:
      segs = sorted((s["id"], class_of[s["category_id"]])
                    for s in a["segments_info"])
      ids += [0] + [s for s, _ in segs]
      classes += [IGNORE_INDEX] + [c for _, c in segs]
      starts.append(len(ids))
    self._seg_ids = tf.constant(ids, tf.int32)
    self._seg_classes = tf.constant(classes, tf.int32)
    self._seg_starts = tf.constant(starts, tf.int32)

  def load(self, index):
    image, png, name = self._read(index)
    rgb = tf.cast(tf.io.decode_png(png, channels=3), tf.int32)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    start = self._seg_starts[index]
    size = self._seg_starts[index + 1] - start
    seg_ids = tf.slice(self._seg_ids, [start], [size])
    seg_classes = tf.slice(self._seg_classes, [start], [size])
    flat = tf.reshape(ids, [-1])
    pos = tf.minimum(tf.searchsorted(seg_ids, flat), size - 1)
    mask = tf.where(tf.gather(seg_ids, pos) == flat,
                    tf.gather(seg_classes, pos), IGNORE_INDEX)
    mask = tf.reshape(mask, tf.shape(ids))
    dataset_files.check_same_size(image, mask, name)
    return {"image": image, "mask": mask, "file_name": name}


# --------------------------------------------------------------------- IDD --
IDD_EXPECTED = (
    "IDD Segmentation (IDD 20k part I, idd-segmentation.tar.gz from "
    "https://idd.insaan.iiit.ac.in/) extracted to {d}/IDD_Segmentation/ "
    "(leftImg8bit/train/<seq>/*_leftImg8bit.png, gtFine/train/<seq>/"
    "*_gtFine_polygons.json), then the level-3 label PNGs generated next to "
    "the polygons with the AutoNUE toolkit (https://github.com/AutoNUE/"
    "public-code): python preperation/createLabels.py --datadir "
    "{d}/IDD_Segmentation --id-type level3Id, giving "
    "gtFine/train/<seq>/*_gtFine_labellevel3Ids.png.")


@registry.register("idd")
def make_idd(split: str, *, data_dir: str | None = None):
  """IDD level-3 segmentation: "train" (6,993) or "validation" (981)."""
  split = dataset_files.split_folder(split, _TRAIN_VAL, "IDD")
  expected = IDD_EXPECTED.format(d=data_dir)
  tree = dataset_files.find_root(
      data_dir, marker="gtFine", dataset="IDD", expected=expected,
      folders=("IDD_Segmentation",))
  return _files_source(
      IDD_LEVEL3_NAMES, (tree, tree), f"leftImg8bit/{split}/*/*_leftImg8bit.*",
      f"gtFine/{split}/*/*_gtFine_labellevel3Ids.png",
      lambda p: ("gtFine" + p[len("leftImg8bit"):p.rindex("_leftImg8bit.")] +
                 "_gtFine_labellevel3Ids.png"),
      _identity(len(IDD_LEVEL3_NAMES)), "IDD", expected)


# -------------------------------------------------------- Mapillary Vistas --
MAPILLARY_EXPECTED = (
    "Mapillary Vistas v1.2 (mapillary-vistas-dataset_public_v1.2.zip) or v2.0 "
    "from https://www.mapillary.com/dataset/vistas, in {d}/ (read in place) or "
    "extracted there, giving {d}/training/images/*.jpg and "
    "{d}/training/labels/*.png (v1.2) or {d}/training/v1.2/labels/*.png "
    "(v2.0 archive).")


@registry.register("mapillary_vistas")
def make_mapillary_vistas(split: str, *, data_dir: str | None = None):
  """Mapillary Vistas v1.2: "train" (18,000) or "validation" (2,000)."""
  folder = dataset_files.split_folder(
      split, {"train": "training", "validation": "validation",
              "val": "validation"}, "Mapillary Vistas")
  expected = MAPILLARY_EXPECTED.format(d=data_dir)
  tree = dataset_files.find_root(
      data_dir, marker=folder, dataset="Mapillary Vistas", expected=expected,
      folders=("mapillary-vistas-dataset_public_v1.2",),
      archives=("mapillary-vistas-dataset_public_v1.2.zip",
                "mapillary-vistas-dataset_public_v2.0.zip"))
  # The v2.0 archive keeps the v1.2 labels in their own folder.
  labels = f"{folder}/v1.2/labels"
  if not tree.glob(f"{labels}/*.png"):
    labels = f"{folder}/labels"
  _check_mapillary_config(tree)
  # Value 65 ("Unlabeled") falls past the table: ignored.
  return _files_source(
      MAPILLARY_VISTAS_NAMES, (tree, tree), f"{folder}/images/*.jpg",
      f"{labels}/*.png", lambda p: f"{labels}/{_stem(p)}.png",
      _identity(len(MAPILLARY_VISTAS_NAMES)), "Mapillary Vistas", expected)


def _check_mapillary_config(tree):
  """The label list of the v1.2 config, if shipped, must be ours."""
  for config in ("config_v1.2.json", "config.json"):
    if tree.glob(config):
      labels = json.loads(tree.read_bytes(config))["labels"]
      names = [label["readable"].lower() for label in labels]
      if names[:-1] != list(MAPILLARY_VISTAS_NAMES):
        raise ValueError(
            f"Mapillary Vistas: {tree.describe(config)} lists {len(names)} "
            "labels that are not v1.2's 66; expected the v1.2 release.")
      return


# --------------------------------------------------------------- SUN RGB-D --
SUNRGBD_EXPECTED = (
    "SUN RGB-D's 37-class segmentation as PNGs: {d}/image/{{train,test}}/"
    "img-NNNNNN.jpg with labels {d}/label37/{{train,test}}/NNNNNNNN.png "
    "(value 0 = unlabeled, k = class k), the layout of sun_rgbd.tgz "
    "(http://cvgl.stanford.edu/data2/sun_rgbd.tgz, as used by MSeg); the "
    "official release (http://rgbd.cs.princeton.edu/) keeps these labels in "
    "SUNRGBDtoolbox/Metadata/SUNRGBD2Dseg.mat.")


@registry.register("sunrgbd")
def make_sunrgbd(split: str, *, data_dir: str | None = None):
  """SUN RGB-D: "train" (5,285) or "test" / "validation" (5,050)."""
  folder = dataset_files.split_folder(
      split, {"train": "train", "test": "test", "validation": "test",
              "val": "test"}, "SUN RGB-D")
  expected = SUNRGBD_EXPECTED.format(d=data_dir)
  tree = dataset_files.find_root(
      data_dir, marker="label37", dataset="SUN RGB-D", expected=expected,
      folders=("sun_rgbd", "SUNRGBD"))
  return _files_source(
      SUNRGBD_NAMES, (tree, tree), f"image/{folder}/img-*.jpg",
      f"label37/{folder}/*.png",
      lambda p: f"label37/{folder}/{int(_stem(p)[len('img-'):]):08d}.png",
      np.arange(-1, len(SUNRGBD_NAMES)), "SUN RGB-D", expected)
