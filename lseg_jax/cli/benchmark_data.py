r"""Examples/sec of the training input pipeline on ADE20K-shaped data.

Encodes generated scenes as JPEG images and PNG masks (150 labels) at an
ADE20K-like size, then times the full per-host train pipeline: decode, the
LSeg augmentation (random scale 0.5-2.0 of base 520, flip, pad, crop 480),
normalise, batch.

  python tools/benchmark_data.py --batch_size=16 --num_batches=20
"""
import os
import time

from absl import flags
import numpy as np

from lseg_jax.data import input_pipeline  # first: it loads TensorFlow quietly
from lseg_jax.data import registry
from lseg_jax.data import synthetic
import tensorflow as tf  # pylint: disable=g-bad-import-order

_HEIGHT = flags.DEFINE_integer("height", 512, "Image height.")
_WIDTH = flags.DEFINE_integer("width", 683, "Image width.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 32, "Distinct images.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Batch size.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 20, "Timed batches.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed batches first.")
_CROP = flags.DEFINE_integer("crop_size", 480, "Training crop.")
_BASE = flags.DEFINE_integer("base_size", 520, "Base size of random scaling.")
_PARALLEL = flags.DEFINE_integer("num_parallel_calls", -1,
                                 "tf.data parallelism (-1 = AUTOTUNE).")
NUM_LABELS = 150


def make_source(height, width, num_images):
  """An in-memory source of JPEG scenes with 150-label PNG masks."""
  images, masks = [], []
  for i in range(num_images):
    image, mask = synthetic.generate_scene(np.random.default_rng(i), height,
                                           width)
    # Spread the 6 synthetic classes over a 150-label table.
    mask = np.where(mask == synthetic.MASK_IGNORE, mask,
                    (mask.astype(np.int32) * 29 + i) % NUM_LABELS)
    images.append(tf.io.encode_jpeg(image, quality=90).numpy())
    masks.append(tf.io.encode_png(mask.astype(np.uint8)[..., None]).numpy())
  return synthetic.EncodedSource(images, masks,
                                 [f"bench_{i}" for i in range(num_images)],
                                 [f"label_{i}" for i in range(NUM_LABELS)])


def main(argv):
  del argv
  source = make_source(_HEIGHT.value, _WIDTH.value, _NUM_IMAGES.value)
  registry.register("benchmark")(lambda split, **kw: source)
  cfg = input_pipeline.default_data_config()
  cfg.update(dict(name="benchmark", crop_size=_CROP.value,
                  base_size=_BASE.value,
                  num_parallel_calls=_PARALLEL.value))
  it = input_pipeline.make_train_iterator(
      cfg, global_batch_size=_BATCH.value, seed=0, process_index=0,
      process_count=1)
  for _ in range(_WARMUP.value):
    next(it)
  start = time.perf_counter()
  for _ in range(_NUM_BATCHES.value):
    batch = next(it)
  seconds = time.perf_counter() - start
  assert batch["image"].shape == (_BATCH.value, _CROP.value, _CROP.value, 3)
  rate = _NUM_BATCHES.value * _BATCH.value / seconds
  print(f"{rate:.1f} examples/sec ({_HEIGHT.value}x{_WIDTH.value} JPEG -> "
        f"crop {_CROP.value}, batch {_BATCH.value}, {_NUM_BATCHES.value} "
        f"batches in {seconds:.1f} s, {os.cpu_count()} CPUs)")

