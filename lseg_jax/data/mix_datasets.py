"""The other six datasets of LSeg's mixture, in their official layouts, as a table.

  source = registry.get_source("cityscapes", "train", data_dir=DIR)

bdd100k, cityscapes (also from TFDS with `use_tfds=True`), coco_panoptic, idd,
mapillary_vistas and sunrgbd ("validation" = its test split), each with splits "train" and
"validation" (the seventh, ade20k, is in `ade20k`), are the `dataset_layouts.MixtureDataset`
rows of `DATASETS`; whatever a dataset marks as void becomes -1 (ignore). Downloads,
layouts and label mappings: docs/datasets.md, "The mixture datasets".
"""
from __future__ import annotations

import functools
import json

import numpy as np
import tensorflow as tf

from lseg_jax.data import dataset_files
from lseg_jax.data import registry
from lseg_jax.data.dataset_layouts import Layout, MixtureDataset, TfdsLayout, TRAINING_VALIDATION
from lseg_jax.data.dataset_layouts import Tree, make_source, renamed
from lseg_jax.data.label_names import COCO_PANOPTIC_NAMES
from lseg_jax.data.label_names import MAPILLARY_VISTAS_NAMES, SUNRGBD_NAMES
from lseg_jax.labels import IGNORE_INDEX

# Cityscapes label id (0..33) -> train id (cityscapesScripts `labels.py`);
# every id without a train id is ignored.
CITYSCAPES_TRAIN_IDS = np.array(
    [-1, -1, -1, -1, -1, -1, -1, 0, 1, -1, -1, 2, 3, 4, -1, -1, -1, 5, -1, 6,
     7, 8, 9, 10, 11, 12, 13, 14, 15, -1, -1, 16, 17, 18], np.int32)


def _sunrgbd_mask(image: str) -> str:
  """image/<split>/img-000042.jpg -> label37/<split>/00000042.png."""
  _, folder, name = image.split("/")
  number = int(name.rsplit(".", 1)[0][len("img-"):])
  return f"label37/{folder}/{number:08d}.png"


def _coco_panoptic(trees, folder, data_dir, expected) -> "CocoPanoptic":
  ann_file = f"{data_dir}/annotations/panoptic_{folder}2017.json"
  if not tf.io.gfile.exists(ann_file):
    raise FileNotFoundError(f"COCO panoptic: {ann_file} is missing. Expected: {expected}")
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
        raise ValueError(f"Mapillary Vistas: {tree.describe(config)} lists {len(names)} labels "
                         "that are not v1.2's 66; expected the v1.2 release.")
      return


_TRAIN_VAL = {"train": "train", "validation": "val", "val": "val"}
_MAPILLARY = dict(folders=("mapillary-vistas-dataset_public_v1.2",),
                  archives=("mapillary-vistas-dataset_public_v1.2.zip",
                            "mapillary-vistas-dataset_public_v2.0.zip"))
_BDD = ("bdd100k",)

DATASETS = (
    MixtureDataset(
        name="bdd100k", title="BDD100K", splits=_TRAIN_VAL,
        expected=(
            "BDD100K from https://bdd-data.berkeley.edu/ (or https://dl.cv.ethz.ch/bdd100k/data/): "
            "bdd100k_images_10k.zip and bdd100k_sem_seg_labels_trainval.zip in {d}/ (read in "
            "place) or extracted there (giving {d}/bdd100k/images/10k/train/*.jpg and "
            "{d}/bdd100k/labels/sem_seg/masks/train/*.png); or the older bdd100k_seg.zip "
            "({d}/bdd100k/seg/images/, {d}/bdd100k/seg/labels/)."),
        layouts=(
            # The older single-archive release.
            Layout(Tree("seg/labels", _BDD, ("bdd100k_seg.zip",)), None,
                   "seg/images/{split}/*.jpg", "seg/labels/{split}/*_train_id.png",
                   renamed(r"^seg/images/(.*)\.jpg$", r"seg/labels/\1_train_id.png")),
            Layout(Tree("images/10k", _BDD, ("bdd100k_images_10k.zip",)),
                   Tree("labels/sem_seg", _BDD, ("bdd100k_sem_seg_labels_trainval.zip",)),
                   "images/10k/{split}/*.jpg", "labels/sem_seg/masks/{split}/*.png",
                   renamed(r"^images/10k/(.*)\.jpg$", r"labels/sem_seg/masks/\1.png")))),
    MixtureDataset(
        name="cityscapes", title="Cityscapes", splits=_TRAIN_VAL,
        expected=(
            "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
            "https://www.cityscapes-dataset.com/downloads/ (registration needed) in {d}/ (read in "
            "place) or extracted there, giving {d}/leftImg8bit/train/<city>/*_leftImg8bit.png and "
            "{d}/gtFine/train/<city>/*_gtFine_labelIds.png."),
        layouts=(Layout(
            Tree("leftImg8bit", archives=("leftImg8bit_trainvaltest.zip",)),
            Tree("gtFine", archives=("gtFine_trainvaltest.zip",)),
            "leftImg8bit/{split}/*/*_leftImg8bit.png", "gtFine/{split}/*/*_gtFine_labelIds.png",
            renamed(r"^leftImg8bit/(.*)_leftImg8bit\.png$", r"gtFine/\1_gtFine_labelIds.png")),),
        value_table=CITYSCAPES_TRAIN_IDS,
        tfds=TfdsLayout("cityscapes/semantic_segmentation",
                        {"train": "train", "val": "validation"}, image_key="image_left",
                        mask_key="segmentation_label", name_key="image_id")),
    MixtureDataset(
        name="coco_panoptic", title="COCO panoptic", splits=_TRAIN_VAL,
        expected=(
            "COCO 2017 from https://cocodataset.org/#download: train2017.zip and val2017.zip in "
            "{d}/ (read in place, or extracted to {d}/train2017/*.jpg, {d}/val2017/*.jpg), and "
            "panoptic_annotations_trainval2017.zip extracted in {d}/ (giving "
            "{d}/annotations/panoptic_train2017.json) with the archives inside it, "
            "{d}/annotations/panoptic_train2017.zip and panoptic_val2017.zip, read in place or "
            "extracted to {d}/annotations/panoptic_train2017/*.png."),
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
            "https://idd.insaan.iiit.ac.in/) extracted to {d}/IDD_Segmentation/ "
            "(leftImg8bit/train/<seq>/*_leftImg8bit.png, "
            "gtFine/train/<seq>/*_gtFine_polygons.json), then the level-3 label PNGs generated "
            "next to the polygons with the AutoNUE toolkit "
            "(https://github.com/AutoNUE/public-code): python preperation/createLabels.py "
            "--datadir {d}/IDD_Segmentation --id-type level3Id, giving "
            "gtFine/train/<seq>/*_gtFine_labellevel3Ids.png."),
        layouts=(Layout(
            Tree("gtFine", ("IDD_Segmentation",)), None,
            "leftImg8bit/{split}/*/*_leftImg8bit.*", "gtFine/{split}/*/*_gtFine_labellevel3Ids.png",
            renamed(r"^leftImg8bit/(.*)_leftImg8bit\.[^/]*$",
                    r"gtFine/\1_gtFine_labellevel3Ids.png")),)),
    MixtureDataset(
        name="mapillary_vistas", title="Mapillary Vistas", splits=TRAINING_VALIDATION,
        expected=(
            "Mapillary Vistas v1.2 (mapillary-vistas-dataset_public_v1.2.zip) or v2.0 from "
            "https://www.mapillary.com/dataset/vistas, in {d}/ (read in place) or extracted there, "
            "giving {d}/training/images/*.jpg and {d}/training/labels/*.png (v1.2) or "
            "{d}/training/v1.2/labels/*.png (v2.0 archive)."),
        layouts=(
            # The v2.0 archive keeps the v1.2 labels in their own folder.
            Layout(Tree("{split}/v1.2/labels", **_MAPILLARY), None,
                   "{split}/images/*.jpg", "{split}/v1.2/labels/*.png",
                   renamed(r"^([^/]*)/images/(.*)\.jpg$", r"\1/v1.2/labels/\2.png")),
            Layout(Tree("{split}", **_MAPILLARY), None,
                   "{split}/images/*.jpg", "{split}/labels/*.png",
                   renamed(r"^([^/]*)/images/(.*)\.jpg$", r"\1/labels/\2.png"))),
        # Value 65 ("Unlabeled") falls past the table: ignored.
        check=_check_mapillary_config),
    MixtureDataset(
        name="sunrgbd", title="SUN RGB-D",
        splits={"train": "train", "test": "test", "validation": "test", "val": "test"},
        expected=(
            "SUN RGB-D's 37-class segmentation as PNGs: "
            "{d}/image/{{train,test}}/img-NNNNNN.jpg with labels "
            "{d}/label37/{{train,test}}/NNNNNNNN.png (value 0 = unlabeled, k = class k), the "
            "layout of sun_rgbd.tgz (http://cvgl.stanford.edu/data2/sun_rgbd.tgz, as used by "
            "MSeg); the official release (http://rgbd.cs.princeton.edu/) keeps these labels "
            "in SUNRGBDtoolbox/Metadata/SUNRGBD2Dseg.mat."),
        layouts=(Layout(Tree("label37", ("sun_rgbd", "SUNRGBD")), None,
                        "image/{split}/img-*.jpg", "label37/{split}/*.png", _sunrgbd_mask),),
        value_table=np.arange(-1, len(SUNRGBD_NAMES))),
)

for _dataset in DATASETS:
  registry.register(_dataset.name)(functools.partial(make_source, _dataset))


class CocoPanoptic(dataset_files.FilePairs):
  """COCO panoptic PNGs (segment id = R + 256 G + 256^2 B) as class masks.

  Every segment, crowd regions included, takes its category's class; pixels
  of no segment (id 0) are ignored.
  """

  def __init__(self, annotations: dict, image_tree, image_folder, mask_tree, mask_folder, expected):
    class_of = {}
    for cat in annotations["categories"]:
      if cat["name"] not in COCO_PANOPTIC_NAMES:
        raise ValueError(f"COCO panoptic category {cat['name']!r} is not one of the 133 of "
                         "panoptic_coco_categories.json.")
      class_of[cat["id"]] = COCO_PANOPTIC_NAMES.index(cat["name"])
    image_file = {im["id"]: im["file_name"] for im in annotations["images"]}
    anns = sorted(annotations["annotations"], key=lambda a: a["file_name"])
    images = [f"{image_folder}/{image_file[a['image_id']]}" for a in anns]
    masks = [f"{mask_folder}/{a['file_name']}" for a in anns]
    for tree, paths, pattern in ((image_tree, images, f"{image_folder}/*"),
                                 (mask_tree, masks, f"{mask_folder}/*.png")):
      dataset_files.check_present(tree, paths, pattern, dataset="COCO panoptic", expected=expected)
    super().__init__(image_tree, images, mask_tree, masks)
    self.label_names = list(COCO_PANOPTIC_NAMES)
    # Per image, its segment ids sorted, behind a sentinel id 0 (-> ignore) so
    # that every lookup has a row to land on.
    ids, classes, starts = [], [], [0]
    for a in anns:
      segs = sorted((s["id"], class_of[s["category_id"]]) for s in a["segments_info"])
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
    mask = tf.where(tf.gather(seg_ids, pos) == flat, tf.gather(seg_classes, pos), IGNORE_INDEX)
    mask = tf.reshape(mask, tf.shape(ids))
    dataset_files.check_same_size(image, mask, name)
    return {"image": image, "mask": mask, "file_name": name}
