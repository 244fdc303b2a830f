"""The seven datasets of LSeg's mixture, in their official layouts, as a table.

  source = registry.get_source("cityscapes", "train", data_dir=DIR)

Registered sources (label names in `label_names.DATASET_LABEL_NAMES`), each
with splits "train" and "validation":
  ade20k            ADE20K SceneParse150, 150 classes.
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

Each dataset is one `MixtureDataset` row of `DATASETS`: its split folders,
where its files are (`Layout`s, tried in order: the first whose trees are
found is read) and how stored label values become classes. TFDS's
`scene_parse150` is not a way into ADE20K: it is built from the 2017 Places
challenge's instance annotations (100 classes in the red channel), not the
150-class semantic masks that LSeg trains and evaluates on.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Callable, Mapping

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from lseg_jax.data import dataset_files
from lseg_jax.data import registry
from lseg_jax.data.label_names import ADE20K_NAMES, COCO_PANOPTIC_NAMES
from lseg_jax.data.label_names import DATASET_LABEL_NAMES
from lseg_jax.data.label_names import MAPILLARY_VISTAS_NAMES, SUNRGBD_NAMES
from lseg_jax.labels import IGNORE_INDEX

# Cityscapes label id (0..33) -> train id (cityscapesScripts `labels.py`);
# every id without a train id is ignored.
CITYSCAPES_TRAIN_IDS = np.array(
    [-1, -1, -1, -1, -1, -1, -1, 0, 1, -1, -1, 2, 3, 4, -1, -1, -1, 5, -1, 6,
     7, 8, 9, 10, 11, 12, 13, 14, 15, -1, -1, 16, 17, 18], np.int32)


@dataclasses.dataclass(frozen=True)
class Tree:
  """Where one file tree of a dataset is (see `dataset_files.find_root`).

  Every string may hold "{split}", the split's folder name.

  Attributes:
    marker: a sub-folder the tree's root must contain.
    folders: names the dataset's top folder may have under data_dir.
    archives: file names of the official .zip archives.
    under: a sub-folder of data_dir to look in ("" = data_dir itself).
  """
  marker: str
  folders: tuple[str, ...] = ()
  archives: tuple[str, ...] = ()
  under: str = ""

  def find(self, data_dir, folder, *, dataset,
           expected) -> dataset_files.FileTree:
    """This tree of split folder `folder` under `data_dir`."""
    fill = functools.partial(str.format, split=folder)
    base = data_dir
    if data_dir and self.under:
      base = f"{data_dir}/{fill(self.under)}"
    return dataset_files.find_root(
        base, marker=fill(self.marker), dataset=dataset, expected=expected,
        folders=self.folders, archives=tuple(map(fill, self.archives)))


@dataclasses.dataclass(frozen=True)
class Layout:
  """One on-disk layout: the trees and how images pair with label files.

  Attributes:
    images: the tree of the images.
    masks: the tree of the label files (None: the images' tree).
    image_glob: glob of the images in their tree ("{split}" = split folder).
    mask_glob: a glob that matches every label file in its tree.
    mask_of: image path -> its label file's path (None: the row's `build`
      pairs them).
  """
  images: Tree
  masks: Tree | None
  image_glob: str
  mask_glob: str
  mask_of: Callable[[str], str] | None


@dataclasses.dataclass(frozen=True)
class TfdsLayout:
  """A prepared TFDS dataset holding the same examples (`use_tfds=True`)."""
  name: str
  splits: Mapping[str, str]  # split folder -> TFDS split
  image_key: str
  mask_key: str
  name_key: str


@dataclasses.dataclass(frozen=True)
class MixtureDataset:
  """One dataset of the mixture: a row of `DATASETS`.

  Attributes:
    name: registry name (its label names: `DATASET_LABEL_NAMES[name]`).
    title: the dataset's name in messages.
    splits: split name -> the split's folder name.
    expected: what to download and where to put it ("{d}" = data_dir).
    layouts: the layouts it may be stored in, tried in order.
    value_table: stored label value v -> class `value_table[v]` (-1 ignore;
      values past the table are ignored); None: v is class v.
    check: called with the images' tree before reading (version checks).
    build: (trees, split folder, data_dir, expected) -> Source, for
      datasets whose labels are not one PNG per image.
    tfds: the TFDS dataset `use_tfds=True` reads, if any.
  """
  name: str
  title: str
  splits: Mapping[str, str]
  expected: str
  layouts: tuple[Layout, ...]
  value_table: np.ndarray | None = None
  check: Callable[[dataset_files.FileTree], None] | None = None
  build: Callable[..., registry.Source] | None = None
  tfds: TfdsLayout | None = None

  @property
  def label_names(self) -> tuple[str, ...]:
    return DATASET_LABEL_NAMES[self.name]

  @property
  def values(self) -> np.ndarray:
    """int32 [V]: the value table, stored value -> class."""
    if self.value_table is None:
      return np.arange(len(self.label_names), dtype=np.int32)
    return np.asarray(self.value_table, np.int32)


def make_source(dataset: MixtureDataset, split: str, *,
                data_dir: str | None = None, use_tfds: bool = False,
                tfds_data_dir: str | None = None) -> registry.Source:
  """`dataset`'s split read from `data_dir` (registered as `dataset.name`).

  With `use_tfds` (datasets with a `tfds` layout), reads the TFDS dataset
  from `tfds_data_dir`, preparing it first from the archives in `data_dir`
  (its manual download folder) if needed.
  """
  folder = dataset_files.split_folder(split, dataset.splits, dataset.title)
  expected = dataset.expected.format(d=data_dir)
  if use_tfds:
    return _tfds_source(dataset, folder, data_dir, tfds_data_dir)
  layout, trees = _find_layout(dataset, folder, data_dir, expected)
  if dataset.check is not None:
    dataset.check(trees[0])
  if dataset.build is not None:
    return dataset.build(trees, folder, data_dir, expected)
  images, masks = dataset_files.pair_files(
      trees[0], layout.image_glob.format(split=folder), trees[1],
      layout.mask_glob.format(split=folder), layout.mask_of,
      dataset=dataset.title, expected=expected)
  return dataset_files.FileSegmentation(
      label_names=dataset.label_names, image_tree=trees[0], images=images,
      mask_tree=trees[1], masks=masks, value_table=dataset.values)


def _find_layout(dataset, folder, data_dir, expected):
  """The first layout whose trees exist: (layout, (image tree, mask tree))."""
  find = functools.partial(Tree.find, data_dir=data_dir, folder=folder,
                           dataset=dataset.title, expected=expected)
  for i, layout in enumerate(dataset.layouts):
    try:
      image_tree = find(layout.images)
      mask_tree = image_tree if layout.masks is None else find(layout.masks)
      return layout, (image_tree, mask_tree)
    except FileNotFoundError:
      if i == len(dataset.layouts) - 1:
        raise


def _tfds_source(dataset, folder, data_dir, tfds_data_dir):
  if dataset.tfds is None:
    raise ValueError(f"{dataset.title} has no TFDS version; got "
                     "use_tfds=True, expected False.")
  builder = tfds.builder(dataset.tfds.name, data_dir=tfds_data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=data_dir))
  return TfdsSegmentation(
      builder, dataset.tfds.splits[folder], label_names=dataset.label_names,
      image_key=dataset.tfds.image_key, mask_key=dataset.tfds.mask_key,
      name_key=dataset.tfds.name_key, value_table=dataset.values)


def _renamed(pattern: str, replacement: str) -> Callable[[str], str]:
  """Image path -> label path by one regular-expression substitution."""
  return functools.partial(re.sub, pattern, replacement)


def _sunrgbd_mask(image: str) -> str:
  """image/<split>/img-000042.jpg -> label37/<split>/00000042.png."""
  _, folder, name = image.split("/")
  number = int(name.rsplit(".", 1)[0][len("img-"):])
  return f"label37/{folder}/{number:08d}.png"


def _coco_panoptic(trees, folder, data_dir, expected) -> "CocoPanoptic":
  ann_file = f"{data_dir}/annotations/panoptic_{folder}2017.json"
  if not tf.io.gfile.exists(ann_file):
    raise FileNotFoundError(f"COCO panoptic: {ann_file} is missing. "
                            f"Expected: {expected}")
  with tf.io.gfile.GFile(ann_file) as f:
    return CocoPanoptic(json.load(f), trees[0], f"{folder}2017", trees[1],
                        f"panoptic_{folder}2017", expected)


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


ADE20K_URL = (
    "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip")
_TRAIN_VAL = {"train": "train", "validation": "val", "val": "val"}
_TRAINING_VALIDATION = {"train": "training", "validation": "validation",
                        "val": "validation"}
_MAPILLARY = dict(folders=("mapillary-vistas-dataset_public_v1.2",),
                  archives=("mapillary-vistas-dataset_public_v1.2.zip",
                            "mapillary-vistas-dataset_public_v2.0.zip"))
_BDD = ("bdd100k",)

DATASETS = (
    MixtureDataset(
        name="ade20k", title="ADE20K", splits=_TRAINING_VALIDATION,
        expected=(
            f"the official ADEChallengeData2016.zip ({ADE20K_URL}) at "
            "{d}/ADEChallengeData2016.zip, or extracted so that "
            "{d}/ADEChallengeData2016/images/training/*.jpg and "
            "{d}/ADEChallengeData2016/annotations/training/*.png exist."),
        layouts=(Layout(
            Tree("annotations", ("ADEChallengeData2016",),
                 ("ADEChallengeData2016.zip",)), None,
            "images/{split}/*.jpg", "annotations/{split}/*.png",
            _renamed(r"^images/(.*)\.jpg$", r"annotations/\1.png")),),
        # Stored value 0 = "other" -> ignore; k -> class k - 1.
        value_table=np.arange(-1, len(ADE20K_NAMES))),
    MixtureDataset(
        name="bdd100k", title="BDD100K", splits=_TRAIN_VAL,
        expected=(
            "BDD100K from https://bdd-data.berkeley.edu/ (or "
            "https://dl.cv.ethz.ch/bdd100k/data/): bdd100k_images_10k.zip and "
            "bdd100k_sem_seg_labels_trainval.zip in {d}/ (read in place) or "
            "extracted there (giving {d}/bdd100k/images/10k/train/*.jpg and "
            "{d}/bdd100k/labels/sem_seg/masks/train/*.png); or the older "
            "bdd100k_seg.zip ({d}/bdd100k/seg/images/, "
            "{d}/bdd100k/seg/labels/)."),
        layouts=(
            # The older single-archive release.
            Layout(Tree("seg/labels", _BDD, ("bdd100k_seg.zip",)), None,
                   "seg/images/{split}/*.jpg",
                   "seg/labels/{split}/*_train_id.png",
                   _renamed(r"^seg/images/(.*)\.jpg$",
                            r"seg/labels/\1_train_id.png")),
            Layout(Tree("images/10k", _BDD, ("bdd100k_images_10k.zip",)),
                   Tree("labels/sem_seg", _BDD,
                        ("bdd100k_sem_seg_labels_trainval.zip",)),
                   "images/10k/{split}/*.jpg",
                   "labels/sem_seg/masks/{split}/*.png",
                   _renamed(r"^images/10k/(.*)\.jpg$",
                            r"labels/sem_seg/masks/\1.png")))),
    MixtureDataset(
        name="cityscapes", title="Cityscapes", splits=_TRAIN_VAL,
        expected=(
            "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
            "https://www.cityscapes-dataset.com/downloads/ (registration "
            "needed) in {d}/ (read in place) or extracted there, giving "
            "{d}/leftImg8bit/train/<city>/*_leftImg8bit.png and "
            "{d}/gtFine/train/<city>/*_gtFine_labelIds.png."),
        layouts=(Layout(
            Tree("leftImg8bit", archives=("leftImg8bit_trainvaltest.zip",)),
            Tree("gtFine", archives=("gtFine_trainvaltest.zip",)),
            "leftImg8bit/{split}/*/*_leftImg8bit.png",
            "gtFine/{split}/*/*_gtFine_labelIds.png",
            _renamed(r"^leftImg8bit/(.*)_leftImg8bit\.png$",
                     r"gtFine/\1_gtFine_labelIds.png")),),
        value_table=CITYSCAPES_TRAIN_IDS,
        tfds=TfdsLayout("cityscapes/semantic_segmentation",
                        {"train": "train", "val": "validation"},
                        image_key="image_left", mask_key="segmentation_label",
                        name_key="image_id")),
    MixtureDataset(
        name="coco_panoptic", title="COCO panoptic", splits=_TRAIN_VAL,
        expected=(
            "COCO 2017 from https://cocodataset.org/#download: train2017.zip "
            "and val2017.zip in {d}/ (read in place, or extracted to "
            "{d}/train2017/*.jpg, {d}/val2017/*.jpg), and "
            "panoptic_annotations_trainval2017.zip extracted in {d}/ (giving "
            "{d}/annotations/panoptic_train2017.json) with the archives "
            "inside it, {d}/annotations/panoptic_train2017.zip and "
            "panoptic_val2017.zip, read in place or extracted to "
            "{d}/annotations/panoptic_train2017/*.png."),
        layouts=(Layout(
            Tree("{split}2017", archives=("{split}2017.zip",)),
            Tree("panoptic_{split}2017", archives=("panoptic_{split}2017.zip",),
                 under="annotations"),
            "{split}2017/*", "panoptic_{split}2017/*.png", None),),
        build=_coco_panoptic),
    MixtureDataset(
        name="idd", title="IDD", splits=_TRAIN_VAL,
        expected=(
            "IDD Segmentation (IDD 20k part I, idd-segmentation.tar.gz from "
            "https://idd.insaan.iiit.ac.in/) extracted to "
            "{d}/IDD_Segmentation/ (leftImg8bit/train/<seq>/*_leftImg8bit.png, "
            "gtFine/train/<seq>/*_gtFine_polygons.json), then the level-3 "
            "label PNGs generated next to the polygons with the AutoNUE "
            "toolkit (https://github.com/AutoNUE/public-code): python "
            "preperation/createLabels.py --datadir {d}/IDD_Segmentation "
            "--id-type level3Id, giving "
            "gtFine/train/<seq>/*_gtFine_labellevel3Ids.png."),
        layouts=(Layout(
            Tree("gtFine", ("IDD_Segmentation",)), None,
            "leftImg8bit/{split}/*/*_leftImg8bit.*",
            "gtFine/{split}/*/*_gtFine_labellevel3Ids.png",
            _renamed(r"^leftImg8bit/(.*)_leftImg8bit\.[^/]*$",
                     r"gtFine/\1_gtFine_labellevel3Ids.png")),)),
    MixtureDataset(
        name="mapillary_vistas", title="Mapillary Vistas",
        splits=_TRAINING_VALIDATION,
        expected=(
            "Mapillary Vistas v1.2 (mapillary-vistas-dataset_public_v1.2.zip) "
            "or v2.0 from https://www.mapillary.com/dataset/vistas, in {d}/ "
            "(read in place) or extracted there, giving "
            "{d}/training/images/*.jpg and {d}/training/labels/*.png (v1.2) "
            "or {d}/training/v1.2/labels/*.png (v2.0 archive)."),
        layouts=(
            # The v2.0 archive keeps the v1.2 labels in their own folder.
            Layout(Tree("{split}/v1.2/labels", **_MAPILLARY), None,
                   "{split}/images/*.jpg", "{split}/v1.2/labels/*.png",
                   _renamed(r"^([^/]*)/images/(.*)\.jpg$",
                            r"\1/v1.2/labels/\2.png")),
            Layout(Tree("{split}", **_MAPILLARY), None,
                   "{split}/images/*.jpg", "{split}/labels/*.png",
                   _renamed(r"^([^/]*)/images/(.*)\.jpg$",
                            r"\1/labels/\2.png"))),
        # Value 65 ("Unlabeled") falls past the table: ignored.
        check=_check_mapillary_config),
    MixtureDataset(
        name="sunrgbd", title="SUN RGB-D",
        splits={"train": "train", "test": "test", "validation": "test",
                "val": "test"},
        expected=(
            "SUN RGB-D's 37-class segmentation as PNGs: "
            "{d}/image/{{train,test}}/img-NNNNNN.jpg with labels "
            "{d}/label37/{{train,test}}/NNNNNNNN.png (value 0 = unlabeled, "
            "k = class k), the layout of sun_rgbd.tgz "
            "(http://cvgl.stanford.edu/data2/sun_rgbd.tgz, as used by MSeg); "
            "the official release (http://rgbd.cs.princeton.edu/) keeps these "
            "labels in SUNRGBDtoolbox/Metadata/SUNRGBD2Dseg.mat."),
        layouts=(Layout(
            Tree("label37", ("sun_rgbd", "SUNRGBD")), None,
            "image/{split}/img-*.jpg", "label37/{split}/*.png",
            _sunrgbd_mask),),
        value_table=np.arange(-1, len(SUNRGBD_NAMES))),
)

for _dataset in DATASETS:
  registry.register(_dataset.name)(functools.partial(make_source, _dataset))


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
    registry.check_process(process_index, process_count)
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
