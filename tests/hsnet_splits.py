"""Tiny split files in HSNet's `data/splits` layout, written by the tests.

The real lists are HSNet's (not redistributed here); these follow the same formats:
pascal/{trn,val}/fold{k}.txt lines "<image>__<class id, 1-based>", fss/{trn,val,test}.txt
one class per line, coco/{trn,val}/fold{k}.pkl {class id: ["val2014/COCO_....jpg"]}.
"""
import os
import pickle

import numpy as np
from PIL import Image

from lseg_jax.data import fewshot

FSS_CLASSES = {"test": [f"fss_test_{i:02d}" for i in range(20)],
               "val": [f"fss_val_{i:02d}" for i in range(3)],
               "trn": [f"fss_trn_{i:02d}" for i in range(3)]}


def pascal_list(split: str, fold: int, per_class: int = 2) -> list[tuple[str, int]]:
  """(image name, 0-based class) entries of the tiny PASCAL-5i list."""
  classes = fewshot.fold_classes("pascal5i", fold, split)
  return [(f"2008_{fold}{c:02d}{i:03d}", c) for c in classes for i in range(per_class)]


def coco_lists(split: str, fold: int) -> dict[int, list[str]]:
  coco = "val2014" if split == "val" else "train2014"
  return {c: [f"{coco}/COCO_{coco}_{100 * c + i:012d}.jpg" for i in (1, 2)]
          for c in fewshot.fold_classes("coco20i", fold, split)}


def write(root) -> str:
  """Writes every split file under ROOT/splits; returns that folder."""
  splits = os.path.join(root, "splits")
  for split in ("trn", "val"):
    for fold in range(fewshot.NUM_FOLDS):
      for name, entries in (("pascal", pascal_list(split, fold)),):
        os.makedirs(os.path.join(splits, name, split), exist_ok=True)
        with open(os.path.join(splits, name, split, f"fold{fold}.txt"), "w") as f:
          f.writelines(f"{n}__{c + 1:02d}\n" for n, c in entries)
      os.makedirs(os.path.join(splits, "coco", split), exist_ok=True)
      with open(os.path.join(splits, "coco", split, f"fold{fold}.pkl"), "wb") as f:
        pickle.dump(coco_lists(split, fold), f)
  os.makedirs(os.path.join(splits, "fss"), exist_ok=True)
  for split, names in FSS_CLASSES.items():
    with open(os.path.join(splits, "fss", f"{split}.txt"), "w", newline="\r\n") as f:
      f.writelines(n + "\n" for n in names)
  return splits


def write_fss_images(root, splits=("test",), shots=(1, 2), size=(24, 28), seed=1) -> None:
  """Random FSS-1000 images ROOT/FSS-1000/<class>/<n>.jpg and binary masks <n>.png for
  every class of `splits` (HSNet uses 1.jpg as the support image)."""
  rng = np.random.default_rng(seed)
  for split in splits:
    for category in sorted(FSS_CLASSES[split]):
      os.makedirs(os.path.join(root, "FSS-1000", category), exist_ok=True)
      for n in shots:
        base = os.path.join(root, "FSS-1000", category, str(n))
        Image.fromarray(rng.integers(0, 256, (*size, 3)).astype(np.uint8)).save(base + ".jpg")
        Image.fromarray(rng.choice([0, 255], size).astype(np.uint8)).save(base + ".png")
