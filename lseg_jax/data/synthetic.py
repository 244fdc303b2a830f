"""`lseg_synthetic`: a generated segmentation dataset that builds in seconds.

Each image is a noisy grey background with a few shapes drawn on it. Every class has its own
colour and texture, so a pixel's class can be told from its neighbourhood alone and a tiny model
reaches a high mIoU. A one-pixel band on shape boundaries is marked ignore (255 in the stored
PNG, -1 in raw examples).

Build it into a directory (tests use temporary ones):

  builder = synthetic.build(data_dir, height=64, width=64, num_train=512)
  source = registry.get_source("synthetic", "train", data_dir=data_dir)

The registered source builds the dataset on first use if it is missing.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from lseg_jax.data import preprocess
from lseg_jax.data import registry

LABEL_NAMES = ("background", "red disc", "green square", "blue triangle",
               "yellow stripes", "purple checker")
MASK_IGNORE = 255


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  """Image size [height, width], split sizes and generator seed."""
  height: int = 64
  width: int = 64
  num_train: int = 512
  num_validation: int = 64
  seed: int = 0


def make_config(height=64, width=64, num_train=512, num_validation=64, seed=0) -> SyntheticConfig:
  for key, value in dict(height=height, width=width).items():
    if value < 16:
      raise ValueError(f"Synthetic image {key}={value} is too small; expected >= 16.")
  return SyntheticConfig(
      name=f"{height}x{width}_n{num_train}_{num_validation}_s{seed}", version="1.0.0",
      height=height, width=width, num_train=num_train, num_validation=num_validation, seed=seed)


class LsegSynthetic(tfds.core.GeneratorBasedBuilder):
  """Shapes with class-specific colours and textures over a noisy background."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [make_config()]

  def _info(self) -> tfds.core.DatasetInfo:
    h, w = self.builder_config.height, self.builder_config.width
    return self.dataset_info_from_configs(
        description=__doc__.splitlines()[0],
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(h, w, 3)),
            "mask": tfds.features.Image(shape=(h, w, 1)),
            "file_name": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(label_names=list(LABEL_NAMES)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    return {"train": self._generate_examples("train", cfg.num_train),
            "validation": self._generate_examples("validation", cfg.num_validation)}

  def _generate_examples(self, split, num):
    cfg = self.builder_config
    split_id = {"train": 0, "validation": 1}[split]
    for i in range(num):
      rng = np.random.default_rng([cfg.seed, split_id, i])
      image, mask = generate_scene(rng, cfg.height, cfg.width)
      name = f"{split}_{i:06d}"
      yield name, {"image": image, "mask": mask[..., None], "file_name": name}


def generate_scene(rng: np.random.Generator, height: int, width: int):
  """One scene: image uint8 [H, W, 3] and mask uint8 [H, W] (255 = ignore)."""
  yy, xx = np.mgrid[0:height, 0:width]
  image = np.clip(rng.normal(110, 12, (height, width, 3)), 0, 255)
  mask = np.zeros((height, width), np.uint8)
  for _ in range(rng.integers(1, 5)):
    label = int(rng.integers(1, len(LABEL_NAMES)))
    region = _shape_region(label, rng, yy, xx, height, width)
    image[region] = _texture(label, rng, yy, xx)[region]
    mask[region] = label
  # Boundary pixels mix two classes after any resize: the band is "ignore".
  edge = np.zeros_like(mask, bool)
  edge[1:] |= mask[1:] != mask[:-1]
  edge[:-1] |= mask[:-1] != mask[1:]
  edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
  edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
  mask[edge] = MASK_IGNORE
  return image.astype(np.uint8), mask


def _shape_region(label, rng, yy, xx, height, width):
  size = min(height, width)
  cy, cx = rng.uniform(0, height), rng.uniform(0, width)
  r = rng.uniform(0.12, 0.3) * size
  if label in (1, 5):  # Discs.
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
  if label == 3:  # Upward triangle with apex (cy - r, cx).
    t = (yy - (cy - r)) / (2 * r)
    return (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * r)
  rh = r * rng.uniform(0.6, 1.4)  # Rectangles.
  return (np.abs(yy - cy) < rh) & (np.abs(xx - cx) < r)


_PLAIN = {1: [200., 30., 30.], 2: [30., 180., 40.], 3: [30., 50., 210.]}  # RGB


def _texture(label, rng, yy, xx):
  noise = rng.normal(0, 8, yy.shape + (3,))
  if label in _PLAIN:
    base = np.broadcast_to(_PLAIN[label], noise.shape)
  elif label == 4:
    stripe = ((yy // 3) % 2 == 0)[..., None]
    base = np.where(stripe, [230., 210., 20.], [60., 50., 0.])
  else:
    checker = (((yy // 4) + (xx // 4)) % 2 == 0)[..., None]
    base = np.where(checker, [150., 40., 170.], [240., 230., 245.])
  return np.clip(base + noise, 0, 255)


def build(data_dir: str | None = None, **config_kwargs) -> LsegSynthetic:
  """Generates the dataset (`make_config(**config_kwargs)`) into the TFDS `data_dir` (None:
  TFDS' default) if missing, and returns its builder."""
  config = make_config(**config_kwargs)
  if config.name in LsegSynthetic.builder_configs:
    config = config.name  # TFDS refuses a custom config named like a built-in.
  builder = LsegSynthetic(data_dir=data_dir, config=config)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


class EncodedSource(registry.Source):
  """An indexed source over in-memory encoded images and masks.

  Masks are single-channel PNGs with value = label index, `mask_ignore` = ignore. Suits small
  datasets (the synthetic one, benchmarks, tests).
  """

  def __init__(self, images: list[bytes], masks: list[bytes], file_names: list[str],
               label_names: list[str], mask_ignore: int = MASK_IGNORE):
    if not len(images) == len(masks) == len(file_names):
      raise ValueError(f"Got {len(images)} images, {len(masks)} masks and "
                       f"{len(file_names)} file names; expected equal counts.")
    self.label_names = list(label_names)
    self.num_examples = len(images)
    self._images = tf.constant(images, tf.string)
    self._masks = tf.constant(masks, tf.string)
    self._file_names = tf.constant(file_names, tf.string)
    self.mask_ignore = mask_ignore

  def file_name(self, index):
    return tf.gather(self._file_names, index)

  def load(self, index):
    return preprocess.decode_example(
        tf.gather(self._images, index), tf.gather(self._masks, index),
        self.file_name(index), mask_ignore=self.mask_ignore)


def source_from_tfds(builder: tfds.core.DatasetBuilder, split: str,
                     label_names: list[str]) -> EncodedSource:
  """Reads a small TFDS split (image, mask, file_name) into an EncodedSource, ordered by file
  name."""
  if split not in builder.info.splits:
    raise ValueError(f"Unknown split {split!r} of {builder.name}; expected one "
                     f"of {sorted(builder.info.splits)}.")
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders={
      "image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()})
  images, masks, names = [], [], []
  for ex in ds.as_numpy_iterator():
    images.append(ex["image"])
    masks.append(ex["mask"])
    names.append(ex["file_name"])
  # TFDS stores examples in hashed-key order; index i = i-th file name.
  order = sorted(range(len(names)), key=lambda i: names[i])
  return EncodedSource([images[i] for i in order], [masks[i] for i in order],
                       [names[i] for i in order], label_names)


_SOURCES: dict[tuple, EncodedSource] = {}


@registry.register("synthetic")
def make_source(split: str, *, data_dir: str | None = None, **config_kwargs) -> EncodedSource:
  """The synthetic dataset split ("train" / "validation"), built if missing.

  Sources are cached per (data_dir, config, split): pipelines ask for the same split several
  times (label table, train, eval).
  """
  key = (data_dir, split, tuple(sorted(config_kwargs.items())))
  if key not in _SOURCES:
    builder = build(data_dir, **config_kwargs)
    _SOURCES[key] = source_from_tfds(builder, split, list(LABEL_NAMES))
  return _SOURCES[key]
