"""Tiny open-vocabulary benchmark fixtures in their prepared (detectron2) layouts.

`write_<name>(root, num_images)` writes benchmark <name>'s validation files under
the datasets root `root`, as CAT-Seg's `datasets/prepare_*.py` leave them;
`write_all(root)` writes every benchmark. `expected_mask(name, i)` is the mask
(the data contract's: class index, -1 ignore) the source must yield for example i,
`expected_image(name, i)` its image. Label values span each benchmark's whole class
range over the first ceil((L + 1) / 768) images (2 for A-847), ids above 255
included, and every image has ignored pixels.
"""
import os
import zlib

import numpy as np
from PIL import Image

H, W = 24, 32  # 768 pixels per image.
NUM_CLASSES = {"a847": 847, "pc459": 459, "a150": 150, "pc59": 59, "pas20": 20,
               "pas21": 21, "pas20b": 21}


def _stem(name, i):
  if name in ("a847", "a150"):
    return f"ADE_val_{i + 1:08d}"
  return f"{2008 if name in ('pc459', 'pc59') else 2007}_{i:06d}"


def expected_image(name, i):
  """uint8 [H, W, 3]: one colour per image file (the benchmarks share files)."""
  seed = zlib.crc32(_stem(name, i).encode())
  return np.full((H, W, 3), [seed % 256, 60 + seed // 256 % 128, 90], np.uint8)


def _covering(num_values, i):
  """int32 [H, W]: values 0..num_values-1, image i taking the next H * W of them."""
  values = (np.arange(H * W) + i * H * W) % num_values
  return np.random.default_rng(i).permutation(values).reshape(H, W).astype(np.int32)


def _voc_ids(i):
  """The VOC 2012 label map of image i: 0 background, 1..20 classes, 255 boundary."""
  ids = _covering(22, i)
  return np.where(ids == 21, 255, ids)


def expected_mask(name, i):
  """int32 [H, W]: class indices of example i of source `name`, -1 ignore."""
  if name.startswith("pas"):
    ids = _voc_ids(i)
    classes = np.where(ids == 0, 20 if name != "pas20" else -1, ids - 1)
    return np.where(ids == 255, -1, classes).astype(np.int32)
  # -1 first, then every class.
  return _covering(NUM_CLASSES[name] + 1, i) - 1


def _save(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, quality=100)


def _write(root, name, num_images, image_dir, label_dir, ext, stored, other=True):
  for i in range(num_images):
    stem = _stem(name, i)
    _save(f"{root}/{image_dir}/{stem}.jpg", expected_image(name, i))
    _save(f"{root}/{label_dir}/{stem}.{ext}", stored(i))
  if other:  # An image of another split, without a label file: not an example.
    _save(f"{root}/{image_dir}/{_stem(name, num_images + 7)}.jpg",
          expected_image(name, num_images + 7))


def _tiff16(name):
  # As the preparation scripts store them: uint16, ignore = 65535.
  return lambda i: np.where(expected_mask(name, i) < 0, 65535,
                            expected_mask(name, i)).astype(np.uint16)


def write_a847(root, num_images=2) -> None:
  _write(root, "a847", num_images, "ADE20K_2021_17_01/images_detectron2/validation",
         "ADE20K_2021_17_01/annotations_detectron2/validation", "tif", _tiff16("a847"))


def write_pc459(root, num_images=2) -> None:
  _write(root, "pc459", num_images, "VOCdevkit/VOC2010/JPEGImages",
         "VOCdevkit/VOC2010/annotations_detectron2/pc459_val", "tif", _tiff16("pc459"))


def write_pc59(root, num_images=2) -> None:
  _write(root, "pc59", num_images, "VOCdevkit/VOC2010/JPEGImages",
         "VOCdevkit/VOC2010/annotations_detectron2/pc59_val", "png",
         lambda i: (expected_mask("pc59", i) % 256).astype(np.uint8))  # -1 -> 255


def write_a150(root, num_images=2) -> None:
  # The official ADEChallengeData2016 annotations: 0 = other (ignored), k = class k - 1.
  _write(root, "a150", num_images, "ADEChallengeData2016/images/validation",
         "ADEChallengeData2016/annotations/validation", "png",
         lambda i: (expected_mask("a150", i) + 1).astype(np.uint8), other=False)


def _write_voc(root, name, num_images, folder):
  _write(root, name, num_images, "VOCdevkit/VOC2012/JPEGImages",
         f"VOCdevkit/VOC2012/{folder}/val", "png",
         lambda i: (expected_mask(name, i) % 256).astype(np.uint8))


def write_pas20(root, num_images=2) -> None:
  _write_voc(root, "pas20", num_images, "annotations_detectron2")


def write_pas21(root, num_images=2) -> None:
  _write_voc(root, "pas21", num_images, "annotations_detectron2_bg")


def write_pas20b(root, num_images=2) -> None:
  _write_voc(root, "pas20b", num_images, "annotations_detectron2_bg")


def write_all(root) -> None:
  for write in (write_a847, write_pc459, write_a150, write_pc59, write_pas20,
                write_pas21, write_pas20b):
    write(root)
