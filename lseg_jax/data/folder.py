"""`folder`: a user dataset stored as plain files.

Layout (one split, or one sub-folder per split):

  <data_dir>/[<split>/]images/<stem>.jpg|.jpeg|.png|.bmp   RGB images
  <data_dir>/[<split>/]masks/<stem>.png     greyscale PNG, value = label
                                            index, 255 = ignore (-> -1)
  <data_dir>/[<split>/]labels.txt or <data_dir>/labels.txt
                                            one label name per line

If `<data_dir>/<split>/images` exists that sub-folder is the split; otherwise
`<data_dir>` itself is used for every split. Files are read with tf.io.gfile,
so any path TensorFlow can open (local, gs://, ...) works.
"""
from __future__ import annotations

import os

from absl import logging
import tensorflow as tf

from lseg_jax.data import preprocess
from lseg_jax.data import registry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
MASK_IGNORE = 255


def read_label_names(path: str) -> list[str]:
  """Label names from a labels.txt (one per line; trailing blank lines ok)."""
  with tf.io.gfile.GFile(path) as f:
    lines = [line.strip() for line in f.read().splitlines()]
  while lines and not lines[-1]:
    lines.pop()
  for i, name in enumerate(lines):
    if not name:
      raise ValueError(f"{path} line {i + 1} is empty; expected one label "
                       "name per line (line i names mask value i - 1).")
  if not lines:
    raise ValueError(f"{path} names no labels.")
  for i, name in enumerate(lines):
    if name in lines[:i]:
      raise ValueError(f"{path} names label {name!r} twice.")
  return lines


class FolderSource(registry.Source):
  """Images and label masks matched by file stem (see module docstring)."""
  mask_ignore = MASK_IGNORE

  def __init__(self, root: str, labels_paths: tuple[str, ...] = ()):
    """Lists and matches the files of root/images and root/masks; the label names come
    from the first existing of `labels_paths` (default: root/labels.txt)."""
    images_dir = os.path.join(root, "images")
    masks_dir = os.path.join(root, "masks")
    for d in (images_dir, masks_dir):
      if not tf.io.gfile.isdir(d):
        raise ValueError(f"Folder dataset {root!r} has no {os.path.basename(d)}/ sub-folder; "
                         "expected images/, masks/ and labels.txt.")
    labels_paths = labels_paths or (os.path.join(root, "labels.txt"),)
    found = [p for p in labels_paths if tf.io.gfile.exists(p)]
    if not found:
      raise ValueError(f"Folder dataset {root!r} has no labels.txt; looked for "
                       f"{list(labels_paths)}.")
    self.label_names = read_label_names(found[0])
    images = sorted(f for f in tf.io.gfile.listdir(images_dir)
                    if f.lower().endswith(IMAGE_EXTENSIONS))
    if not images:
      raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {images_dir!r}.")
    masks = {os.path.splitext(f)[0]: f for f in tf.io.gfile.listdir(masks_dir)
             if f.lower().endswith(".png")}
    missing = [f for f in images if os.path.splitext(f)[0] not in masks]
    if missing:
      raise ValueError(f"{len(missing)} images in {images_dir!r} have no mask "
                       f"<stem>.png in {masks_dir!r}, e.g. {missing[:3]}.")
    stems = {os.path.splitext(f)[0] for f in images}
    if len(stems) < len(images):
      raise ValueError(f"{images_dir!r} holds several images with the same "
                       "stem; expected one image per mask.")
    unused = sorted(set(masks) - stems)
    if unused:
      logging.warning("%d masks in %s have no image, e.g. %s.", len(unused), masks_dir, unused[:3])
    self.num_examples = len(images)
    self._image_paths = tf.constant([os.path.join(images_dir, f) for f in images])
    self._mask_paths = tf.constant(
        [os.path.join(masks_dir, masks[os.path.splitext(f)[0]]) for f in images])

  def file_name(self, index):
    return tf.gather(self._image_paths, index)

  def load(self, index):
    image_path = self.file_name(index)
    return preprocess.decode_example(
        tf.io.read_file(image_path), tf.io.read_file(tf.gather(self._mask_paths, index)),
        image_path, mask_ignore=MASK_IGNORE)


@registry.register("folder")
def make_source(split: str, *, data_dir: str | None = None) -> FolderSource:
  """The folder dataset at `data_dir` (its `<split>/` sub-folder if present)."""
  if not data_dir:
    raise ValueError("The 'folder' dataset needs data_dir (the folder holding "
                     "images/, masks/ and labels.txt).")
  split_dir = os.path.join(data_dir, split)
  top_labels = os.path.join(data_dir, "labels.txt")
  if tf.io.gfile.isdir(os.path.join(split_dir, "images")):
    return FolderSource(split_dir, (os.path.join(split_dir, "labels.txt"), top_labels))
  return FolderSource(data_dir, (top_labels,))
