"""`ade20k`: ADE20K SceneParse150 from the official ADEChallengeData2016.zip.

  source = registry.get_source("ade20k", "train", data_dir=DIR)

DIR holds `ADEChallengeData2016.zip` (read in place, no need to extract) or
its extracted folder `ADEChallengeData2016/`; DIR may also be the archive or
the folder itself. Layout: `images/{training,validation}/*.jpg` and
`annotations/{training,validation}/*.png`, where label value 0 is "other"
(ignored, -1) and value k is class k - 1 of `label_names.ADE20K_NAMES`.

TFDS's `scene_parse150` is not a way in: it is built from the 2017 Places
challenge's instance annotations (100 classes in the red channel), not the
150-class semantic masks that LSeg trains and evaluates on.
"""
from __future__ import annotations

import numpy as np

from lseg_jax.data import dataset_files
from lseg_jax.data import registry
from lseg_jax.data.label_names import ADE20K_NAMES

URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
_SPLIT_FOLDERS = {"train": "training", "validation": "validation",
                  "val": "validation"}


def expected_layout(data_dir) -> str:
  return (f"the official ADEChallengeData2016.zip ({URL}) at "
          f"{data_dir}/ADEChallengeData2016.zip, or extracted so that "
          f"{data_dir}/ADEChallengeData2016/images/training/*.jpg and "
          f"{data_dir}/ADEChallengeData2016/annotations/training/*.png exist.")


@registry.register("ade20k")
def make_source(split: str, *, data_dir: str | None = None
                ) -> dataset_files.FileSegmentation:
  """ADE20K split "train" (20,210 images) or "validation" (2,000)."""
  folder = dataset_files.split_folder(split, _SPLIT_FOLDERS, "ADE20K")
  expected = expected_layout(data_dir)
  tree = dataset_files.find_root(
      data_dir, marker="annotations", dataset="ADE20K", expected=expected,
      folders=("ADEChallengeData2016",), archives=("ADEChallengeData2016.zip",))
  images, masks = dataset_files.pair_files(
      tree, f"images/{folder}/*.jpg", tree, f"annotations/{folder}/*.png",
      lambda p: "annotations" + p[len("images"):-len(".jpg")] + ".png",
      dataset="ADE20K", expected=expected)
  # Stored value 0 = "other" -> ignore; k -> class k - 1.
  table = np.arange(-1, len(ADE20K_NAMES))
  return dataset_files.FileSegmentation(
      label_names=ADE20K_NAMES, image_tree=tree, images=images,
      mask_tree=tree, masks=masks, value_table=table)
