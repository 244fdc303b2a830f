"""The open-vocabulary segmentation benchmarks, in their prepared layouts, as a table.

  source = registry.get_source("a847", "validation", data_dir=ROOT)

ROOT is the detectron2 datasets root (`DETECTRON2_DATASETS`) that CAT-Seg's
`datasets/prepare_*.py` scripts fill; each source (a847, pc459, pc59, pas20, pas21, pas20b,
a150) reads one prepared folder, whose label files make the split. A stored value is its
class and the ignore value (65535 in the TIFF maps, 255 in the PNGs) reads as -1; pas20b
scores 59 names (`Source.scored_names`, `Source.scored_class`). Folders, preparation and
class lists: docs/datasets.md, "Open-vocabulary benchmarks".
"""
from __future__ import annotations

import dataclasses
import functools

from lseg_jax.data import registry
from lseg_jax.data.ade20k import ADE20K
from lseg_jax.data.dataset_layouts import Layout, MixtureDataset, Tree, make_source, renamed
from lseg_jax.data.label_names import class_names

_VAL = {"validation": "val", "val": "val"}
_PREPARE = ("the detectron2 datasets root, prepared by CAT-Seg's "
            "(github.com/cvlab-kaist/CAT-Seg) datasets/{script}, so that {files} exist "
            "under {{d}} (docs/datasets.md).")


def _voc(name, title, annotations):
  """A PASCAL VOC 2012 benchmark read from `annotations`/val/*.png."""
  return MixtureDataset(
      name=name, title=title, splits=_VAL, ignore_value=255,
      expected=_PREPARE.format(script="prepare_voc.py", files=(
          f"VOCdevkit/VOC2012/JPEGImages/*.jpg and VOCdevkit/VOC2012/{annotations}/val/*.png")),
      layouts=(Layout(
          Tree(annotations, ("VOCdevkit/VOC2012",)), None, "JPEGImages/*.jpg",
          f"{annotations}/{{split}}/*.png", None,
          image_of=renamed(rf"^{annotations}/[^/]*/(.*)\.png$", r"JPEGImages/\1.jpg")),))


def _context(name, ext, ignore_value):
  """PASCAL Context (VOC2010 images) read from annotations_detectron2/<name>_val."""
  folder = f"annotations_detectron2/{name}_{{split}}"
  return MixtureDataset(
      name=name, title=f"PASCAL Context ({name})", splits=_VAL, ignore_value=ignore_value,
      expected=_PREPARE.format(script=f"prepare_pascal_context_{name[2:]}.py", files=(
          f"VOCdevkit/VOC2010/JPEGImages/*.jpg and VOCdevkit/VOC2010/{folder.format(split='val')}"
          f"/*.{ext}")),
      layouts=(Layout(
          Tree(folder, ("VOCdevkit/VOC2010",)), None, "JPEGImages/*.jpg", f"{folder}/*.{ext}", None,
          image_of=renamed(rf"^annotations_detectron2/[^/]*/(.*)\.{ext}$", r"JPEGImages/\1.jpg")),))


BENCHMARKS = (
    MixtureDataset(
        name="a847", title="ADE20K-Full (A-847)",
        splits={"validation": "validation", "val": "validation"},
        expected=_PREPARE.format(
            script="prepare_ade20k_full.py",
            files="ADE20K_2021_17_01/images_detectron2/validation/*.jpg and "
                  "ADE20K_2021_17_01/annotations_detectron2/validation/*.tif"),
        layouts=(Layout(
            Tree("annotations_detectron2/{split}", ("ADE20K_2021_17_01",)), None,
            "images_detectron2/{split}/*.jpg", "annotations_detectron2/{split}/*.tif",
            None, image_of=renamed(r"^annotations_detectron2/([^/]*)/(.*)\.tif$",
                                   r"images_detectron2/\1/\2.jpg")),),
        ignore_value=65535),
    _context("pc459", "tif", 65535),
    _context("pc59", "png", 255),
    _voc("pas20", "PASCAL VOC 20 (PAS-20)", "annotations_detectron2"),
    _voc("pas21", "PASCAL VOC 21 (PAS-21)", "annotations_detectron2_bg"),
    _voc("pas20b", "PASCAL VOC 20b (PAS-20b)", "annotations_detectron2_bg"),
    dataclasses.replace(ADE20K, name="a150", title="ADE20K-150 (A-150)",
                        splits={"validation": "validation", "val": "validation"}),
)


def _make(dataset: MixtureDataset, split: str, **kwargs) -> registry.Source:
  source = make_source(dataset, split, **kwargs)
  if dataset.name == "pas20b":
    # A scored name that is not one of the masks' classes counts as background.
    source.scored_names = class_names("voc20b")
    labels = source.label_names
    source.scored_class = [labels.index(n) if n in labels else labels.index("background")
                           for n in source.scored_names]
  return source


for _dataset in BENCHMARKS:
  registry.register(_dataset.name)(functools.partial(_make, _dataset))
