"""Zero-shot episode sources, following HSNet's protocol (as LSeg does).

  source = registry.get_source("pascal5i", "validation", data_dir=DIR, fold=0)

Each example is one query image with the binary mask of its episode class (0 other, 1 the
class, -1 ignore), `class_index` (into `source.class_names`, the fold's classes) and
`class_name`; LSeg evaluates zero-shot on the query images only, so no support image is
produced. Episode lists and order follow HSNet's loaders (`fewshot_data/data/*.py` of the
official LSeg code), read from HSNet's split files (`splits_dir=`, $LSEG_FEWSHOT_SPLITS or
DATA_DIR/splits). `shot` (config: `data.shot`) is the official `--nshot`: it decides which
episodes there are (COCO-20i's draw, FSS-1000's queries), not what an example holds. Each
dataset's layout, folds, splits and draws: docs/datasets.md, "Zero-shot episodes".
"""
from __future__ import annotations

import os
import pickle

import numpy as np

from lseg_jax.data import dataset_files
from lseg_jax.data import registry
from lseg_jax.data.label_names import COCO_FEWSHOT_NAMES, PASCAL_VOC_NAMES

NUM_FOLDS = 4
NUM_EVAL_EPISODES = 1000
_SPLITS = {"train": "trn", "validation": "val", "val": "val", "test": "val"}
_FSS_SPLITS = {"train": "trn", "validation": "val", "val": "val", "test": "test"}

HSNET_URL = "https://github.com/juhongm999/hsnet"
SPLITS_ENV = "LSEG_FEWSHOT_SPLITS"


def splits_file(splits_dir: str | None, data_dir: str | None, *parts: str) -> str:
  """Path of one of HSNet's split files, e.g. ("pascal", "val", "fold0.txt").

  Looked up in `splits_dir`, then $LSEG_FEWSHOT_SPLITS, then DATA_DIR/splits.
  """
  candidates = [d for d in (splits_dir, os.environ.get(SPLITS_ENV),
                            data_dir and os.path.join(data_dir, "splits")) if d]
  for d in candidates:
    path = os.path.join(d, *parts)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"HSNet split file {'/'.join(parts)} not found in {candidates or 'any folder'}. "
      f"Download the `data/splits` folder of HSNet ({HSNET_URL}; lang-seg has the "
      "same as fewshot_data/data/splits) and pass splits_dir=<that folder> "
      f"(config: data.source_kwargs), set ${SPLITS_ENV}, or put it at DATA_DIR/splits.")


class _PlainUnpickler(pickle.Unpickler):
  """HSNet's COCO pickles hold only dicts, lists, ints and strings: refuse any
  other object, so reading them runs no code."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(
        f"unexpected object {module}.{name} in an HSNet split pickle; expected only "
        "dicts of lists of image paths")


PASCAL_EXPECTED = (
    "HSNet's PASCAL-5i layout: the VOC2012 devkit (VOCtrainval_11-May-2012.tar "
    "from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/) extracted so that "
    "{d}/VOC2012/JPEGImages/*.jpg exist, and HSNet's SegmentationClassAug "
    f"masks (the Google Drive link in {HSNET_URL}) at "
    "{d}/VOC2012/SegmentationClassAug/*.png.")
COCO_EXPECTED = (
    "HSNet's COCO-20i layout: COCO 2014 images (train2014.zip, val2014.zip "
    "from http://images.cocodataset.org/zips/) extracted to "
    "{d}/COCO2014/train2014/*.jpg and {d}/COCO2014/val2014/*.jpg, and HSNet's "
    f"COCO 2014 masks (train2014.zip, val2014.zip: Google Drive links in "
    f"{HSNET_URL}) extracted to {{d}}/COCO2014/annotations/train2014/*.png "
    "and {d}/COCO2014/annotations/val2014/*.png.")
FSS_EXPECTED = (
    f"the FSS-1000 release of HSNet (Google Drive link in {HSNET_URL}) "
    "extracted to {d}/FSS-1000/<class>/<n>.jpg with masks <n>.png.")


def fold_classes(dataset: str, fold: int, split: str) -> list[int]:
  """Class ids (0-based) of `fold`'s "val" classes, or of the other folds'."""
  if fold not in range(NUM_FOLDS):
    raise ValueError(f"{dataset} fold={fold!r}; expected one of {list(range(NUM_FOLDS))}.")
  if dataset == "pascal5i":
    held_out = [fold * 5 + i for i in range(5)]
    num_classes = 20
  else:
    held_out = [fold + NUM_FOLDS * i for i in range(20)]
    num_classes = 80
  if split == "val":
    return held_out
  return [c for c in range(num_classes) if c not in held_out]


def _check_shot(shot, dataset):
  if not isinstance(shot, int) or isinstance(shot, bool) or shot < 0:
    raise ValueError(f"{dataset} shot={shot!r}; expected an integer >= 0 (the official "
                     "--nshot: 0 for the paper's zero-shot rows).")


def _read_pascal_list(split: str, fold: int, splits_dir, data_dir) -> list[tuple[str, int]]:
  """(image name, class id) lines of HSNet's PASCAL-5i split file."""
  with open(splits_file(splits_dir, data_dir, "pascal", split, f"fold{fold}.txt")) as f:
    lines = f.read().split()
  return [(line.split("__")[0], int(line.split("__")[1]) - 1) for line in lines]


@registry.register("pascal5i", episodic=True)
def make_pascal5i(split: str, *, data_dir: str | None = None, fold: int = 0,
                  shot: int = 0, splits_dir: str | None = None
                  ) -> dataset_files.FileEpisodes:
  """PASCAL-5i episodes of `fold` (0-3): "validation" (1000) or "train"; `shot`
  is checked but changes nothing (the queries are listed, not drawn)."""
  _check_shot(shot, "PASCAL-5i")
  split = dataset_files.split_folder(split, _SPLITS, "PASCAL-5i")
  classes = fold_classes("pascal5i", fold, split)
  if split == "val":
    listed = _read_pascal_list("val", fold, splits_dir, data_dir)
    episodes = [listed[i % len(listed)] for i in range(NUM_EVAL_EPISODES)]
  else:
    episodes = [e for f in range(NUM_FOLDS) if f != fold
                for e in _read_pascal_list("trn", f, splits_dir, data_dir)]
  expected = PASCAL_EXPECTED.format(d=data_dir)
  tree = dataset_files.find_root(data_dir, marker="SegmentationClassAug", dataset="PASCAL-5i",
                                 expected=expected, folders=("VOC2012", "VOCdevkit/VOC2012"))
  images = [f"JPEGImages/{name}.jpg" for name, _ in episodes]
  masks = [f"SegmentationClassAug/{name}.png" for name, _ in episodes]
  for paths, pattern in ((images, "JPEGImages/*.jpg"), (masks, "SegmentationClassAug/*.png")):
    dataset_files.check_present(tree, paths, pattern, dataset="PASCAL-5i", expected=expected)
  return dataset_files.FileEpisodes(
      class_names=[PASCAL_VOC_NAMES[c] for c in classes], image_tree=tree, images=images,
      mask_tree=tree, masks=masks, class_index=[classes.index(c) for _, c in episodes],
      foreground=[c + 1 for _, c in episodes], ignore_value=255)


def coco20i_image_lists(split: str, fold: int, splits_dir: str | None = None,
                        data_dir: str | None = None) -> dict[int, list[str]]:
  """HSNet's COCO-20i fold pickle: class id -> image paths ("val2014/COCO_...jpg")."""
  with open(splits_file(splits_dir, data_dir, "coco", split, f"fold{fold}.pkl"), "rb") as f:
    lists = _PlainUnpickler(f).load()
  if not isinstance(lists, dict):
    raise ValueError(f"HSNet COCO-20i split {split}/fold{fold}.pkl holds a "
                     f"{type(lists).__name__}; expected a dict class id -> image paths")
  return {int(c): [str(p) for p in paths] for c, paths in lists.items()}


def official_coco_draw(lists: dict[int, list[str]], classes: list[int],
                       num_episodes: int, shot: int = 0, seed: int = 0
                       ) -> tuple[list[int], list[str]]:
  """(class position in `classes`, query path) of each episode, drawn as HSNet's
  COCO-20i loader draws them after `fix_randseed(seed)` (module docstring).

  `np.random.choice(a, 1, replace=False)` is `permutation(len(a))[:1]` in NumPy's legacy
  generator, so each draw below consumes the stream exactly as one of the loader's calls does.
  """
  rng = np.random.RandomState(seed)
  class_pos, queries = [], []
  for _ in range(num_episodes):
    pos = int(rng.permutation(len(classes))[0])
    images = lists[classes[pos]]
    query = images[rng.permutation(len(images))[0]]
    if shot and all(p == query for p in images):
      raise ValueError(f"COCO-20i class {classes[pos]} lists only the query image "
                       f"{query}; a {shot}-shot episode needs another one (HSNet's "
                       "loader would draw forever)")
    supports = 0
    while supports < shot:
      supports += images[rng.permutation(len(images))[0]] != query
    class_pos.append(pos)
    queries.append(query)
  return class_pos, queries


@registry.register("coco20i", episodic=True)
def make_coco20i(split: str, *, data_dir: str | None = None, fold: int = 0,
                 num_episodes: int | None = None, episode_seed: int = 0,
                 shot: int = 0, splits_dir: str | None = None
                 ) -> dataset_files.FileEpisodes:
  """COCO-20i episodes of `fold` (0-3): the official draw for `shot` with
  `episode_seed` 0 (the default); another seed departs from the paper's episodes."""
  _check_shot(shot, "COCO-20i")
  if not isinstance(episode_seed, int) or isinstance(episode_seed, bool) or not (
      0 <= episode_seed < 2**32):
    raise ValueError(f"COCO-20i episode_seed={episode_seed!r}; expected an integer in "
                     "[0, 2**32) (0: the official episodes)")
  split = dataset_files.split_folder(split, _SPLITS, "COCO-20i")
  classes = fold_classes("coco20i", fold, split)
  coco_split = "val2014" if split == "val" else "train2014"
  lists = coco20i_image_lists(split, fold, splits_dir, data_dir)
  missing = [c for c in classes if not lists.get(c)]
  if missing:
    raise ValueError(f"HSNet COCO-20i split {split}/fold{fold}.pkl lists no image for "
                     f"classes {missing}")
  if num_episodes is None:
    num_episodes = (NUM_EVAL_EPISODES if split == "val" else
                    len({p for c in classes for p in lists[c]}))
  class_pos, paths = official_coco_draw(lists, classes, num_episodes, shot, episode_seed)
  expected = COCO_EXPECTED.format(d=data_dir)
  tree = dataset_files.find_root(
      data_dir, marker="annotations", dataset="COCO-20i", expected=expected, folders=("COCO2014",))
  images = list(paths)
  masks = ["annotations/" + os.path.splitext(p)[0] + ".png" for p in paths]
  for paths, pattern in ((images, f"{coco_split}/*.jpg"),
                         (masks, f"annotations/{coco_split}/*.png")):
    dataset_files.check_present(tree, paths, pattern, dataset="COCO-20i", expected=expected)
  return dataset_files.FileEpisodes(
      class_names=[COCO_FEWSHOT_NAMES[c] for c in classes], image_tree=tree,
      images=images, mask_tree=tree, masks=masks, class_index=class_pos,
      foreground=[classes[p] + 1 for p in class_pos])


@registry.register("fss1000", episodic=True)
def make_fss1000(split: str, *, data_dir: str | None = None, shot: int = 0,
                 splits_dir: str | None = None) -> dataset_files.FileEpisodes:
  """FSS-1000 episodes: "train" (520 classes), "validation" / "test" (240); "test"
  has 2,400 episodes with shot 0 (the default, the paper's), 2,160 with shot 1."""
  _check_shot(shot, "FSS-1000")
  split = dataset_files.split_folder(split, _FSS_SPLITS, "FSS-1000")
  with open(splits_file(splits_dir, data_dir, "fss", f"{split}.txt")) as f:
    categories = sorted(f.read().split("\n")[:-1])
  expected = FSS_EXPECTED.format(d=data_dir)
  tree = dataset_files.find_root(
      data_dir, marker=categories[0], dataset="FSS-1000", expected=expected,
      folders=("FSS-1000",), archives=("FSS-1000.zip",))
  files = {}
  for path in tree.glob("*/*"):
    files.setdefault(path.split("/")[0], []).append(path)
  images, class_index = [], []
  for index, category in enumerate(categories):
    paths = sorted(files.get(category, []))
    if not paths:
      raise FileNotFoundError(
          f"FSS-1000: class folder {tree.describe(category)}/ is missing or "
          f"empty. Expected: {expected}")
    if split == "test" and shot == 1:
      paths = paths[1:]  # HSNet's 1-shot support image.
    queries = [p for p in paths if p.split("/")[1].split(".")[1] == "jpg"]
    images += queries
    class_index += [index] * len(queries)
  masks = [p.split("/")[0] + "/" + p.split("/")[1].split(".")[0] + ".png" for p in images]
  dataset_files.check_present(tree, masks, "*/*.png", dataset="FSS-1000", expected=expected)
  return dataset_files.FileEpisodes(
      class_names=categories, image_tree=tree, images=images, mask_tree=tree, masks=masks,
      class_index=class_index, foreground=[1] * len(images), luma_threshold=128)
