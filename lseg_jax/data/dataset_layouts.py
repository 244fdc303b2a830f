"""Datasets stored as image and label files in an official layout, as table rows.

A `MixtureDataset` row says where a dataset's files are (`Layout`s of `Tree`s, tried
in order) and how stored label values become classes; `make_source` reads a split of
it. The rows: ADE20K in `ade20k`, the other datasets of LSeg's mixture in
`mix_datasets`, the open-vocabulary benchmarks in `openvocab`.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Mapping

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from lseg_jax.data import dataset_files
from lseg_jax.data import registry
from lseg_jax.data.label_names import DATASET_LABEL_NAMES


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

  def find(self, data_dir, folder, *, dataset, expected) -> dataset_files.FileTree:
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
      pairs them, or `image_of` does).
    image_of: label path -> its image's path. When set, the label files make
      the split (as detectron2's `load_sem_seg` pairs a prepared layout: its
      image folder may hold other splits' images).
  """
  images: Tree
  masks: Tree | None
  image_glob: str
  mask_glob: str
  mask_of: Callable[[str], str] | None
  image_of: Callable[[str], str] | None = None


@dataclasses.dataclass(frozen=True)
class TfdsLayout:
  """A prepared TFDS dataset holding the same examples (`use_tfds=True`)."""
  name: str
  splits: Mapping[str, str]  # split folder -> TFDS split
  image_key: str
  mask_key: str
  name_key: str


# `MixtureDataset.splits` of the datasets whose folders are "training" and "validation".
TRAINING_VALIDATION = {"train": "training", "validation": "validation", "val": "validation"}


@dataclasses.dataclass(frozen=True)
class MixtureDataset:
  """One dataset stored as image and label files (of the mixture or a benchmark): a row.

  Attributes:
    name: registry name (its label names: `DATASET_LABEL_NAMES[name]`).
    title: the dataset's name in messages.
    splits: split name -> the split's folder name.
    expected: what to download and where to put it ("{d}" = data_dir).
    layouts: the layouts it may be stored in, tried in order.
    value_table: stored label value v -> class `value_table[v]` (-1 ignore;
      values past the table are ignored); None: v is class v.
    ignore_value: the stored value of ignore; when set, the table is unused,
      every other stored value is its class and one outside [0, L) fails the
      example with an error naming it (`dataset_files.FileSegmentation`).
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
  ignore_value: int | None = None
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


def make_source(dataset: MixtureDataset, split: str, *, data_dir: str | None = None,
                use_tfds: bool = False, tfds_data_dir: str | None = None) -> registry.Source:
  """`dataset`'s split read from `data_dir` (registered as `dataset.name`).

  With `use_tfds` (datasets with a `tfds` layout), reads the TFDS dataset from `tfds_data_dir`,
  preparing it first from the archives in `data_dir` (its manual download folder) if needed.
  """
  folder = dataset_files.split_folder(split, dataset.splits, dataset.title)
  expected = dataset.expected.format(d=data_dir)
  if use_tfds:
    if dataset.tfds is None:
      raise ValueError(f"{dataset.title} has no TFDS version; got use_tfds=True, expected False.")
    builder = tfds.builder(dataset.tfds.name, data_dir=tfds_data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=data_dir))
    return TfdsSegmentation(
        builder, dataset.tfds.splits[folder], label_names=dataset.label_names,
        image_key=dataset.tfds.image_key, mask_key=dataset.tfds.mask_key,
        name_key=dataset.tfds.name_key, value_table=dataset.values)
  layout, trees = _find_layout(dataset, folder, data_dir, expected)
  if dataset.check is not None:
    dataset.check(trees[0])
  if dataset.build is not None:
    return dataset.build(trees, folder, data_dir, expected)
  image_glob = layout.image_glob.format(split=folder)
  mask_glob = layout.mask_glob.format(split=folder)
  pair = functools.partial(dataset_files.pair_files, dataset=dataset.title, expected=expected)
  if layout.image_of is None:
    images, masks = pair(trees[0], image_glob, trees[1], mask_glob, layout.mask_of)
  else:
    masks, images = pair(trees[1], mask_glob, trees[0], image_glob, layout.image_of)
  return dataset_files.FileSegmentation(
      label_names=dataset.label_names, image_tree=trees[0], images=images, mask_tree=trees[1],
      masks=masks, value_table=dataset.values, ignore_value=dataset.ignore_value)


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


def renamed(pattern: str, replacement: str) -> Callable[[str], str]:
  """Image path -> label path by one regular-expression substitution."""
  return functools.partial(re.sub, pattern, replacement)


class TfdsSegmentation(registry.Source):
  """A prepared TFDS segmentation dataset, streamed (not indexed)."""

  is_indexed = False

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str, *, label_names, image_key: str,
               mask_key: str, name_key: str, value_table: np.ndarray):
    splits = builder.info.splits
    if splits and split not in splits:
      raise ValueError(f"Unknown split {split!r} of {builder.name}; expected "
                       f"one of {sorted(splits)}.")
    self.label_names = list(label_names)
    self.num_examples = splits[split].num_examples if splits else None
    self._builder, self._split = builder, split
    self._keys = image_key, mask_key, name_key
    self._table = np.asarray(value_table, np.int32)

  def as_dataset(self, *, process_index=0, process_count=1, shuffle=False, seed=0):
    registry.check_process(process_index, process_count)
    split = tfds.even_splits(self._split, n=process_count)[process_index]
    ds = self._builder.as_dataset(
        split=split, shuffle_files=shuffle, read_config=tfds.ReadConfig(shuffle_seed=seed))
    image_key, mask_key, name_key = self._keys

    def convert(ex):
      mask = tf.cast(ex[mask_key][..., 0], tf.int32)
      return {"image": ex[image_key], "mask": dataset_files.map_values(mask, self._table),
              "file_name": ex[name_key]}
    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
