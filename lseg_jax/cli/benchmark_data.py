r"""Examples/sec of the training input pipeline on ADE20K-shaped data.

Encodes generated scenes as JPEG images and PNG masks (150 labels) at an ADE20K-like size,
then times the full per-host train pipeline: decode, the LSeg augmentation (random scale
0.5-2.0 of base 520, flip, pad, crop 480), normalise, batch.

  python tools/benchmark_data.py --batch_size=16 --num_batches=20
"""
import inspect
import os
import time

from absl import flags
import numpy as np

from lseg_jax.data import input_pipeline  # first: it loads TensorFlow quietly
from lseg_jax.data import registry
from lseg_jax.data import synthetic
import tensorflow as tf  # pylint: disable=g-bad-import-order

NUM_LABELS = 150


def make_source(height, width, num_images):
  """An in-memory source of JPEG scenes with 150-label PNG masks."""
  images, masks = [], []
  for i in range(num_images):
    image, mask = synthetic.generate_scene(np.random.default_rng(i), height, width)
    # Spread the 6 synthetic classes over a 150-label table.
    mask = np.where(mask == synthetic.MASK_IGNORE, mask,
                    (mask.astype(np.int32) * 29 + i) % NUM_LABELS)
    images.append(tf.io.encode_jpeg(image, quality=90).numpy())
    masks.append(tf.io.encode_png(mask.astype(np.uint8)[..., None]).numpy())
  return synthetic.EncodedSource(images, masks, [f"bench_{i}" for i in range(num_images)],
                                 [f"label_{i}" for i in range(NUM_LABELS)])


# The data source "benchmark": the pairs of the latest `measure` call (registered
# once, so that `measure` can run more than once in a process).
_SOURCE = {}
registry.register("benchmark")(lambda split, **kw: _SOURCE["source"])


def measure(*, height: int = 512, width: int = 683, num_images: int = 32, batch_size: int = 16,
            num_batches: int = 20, warmup: int = 3, crop_size: int = 480, base_size: int = 520,
            num_parallel_calls: int = -1) -> dict:
  """Times the per-host train pipeline on `num_images` generated JPEG/PNG pairs of
  height x width; returns {"images_per_s", "seconds", ...the settings}."""
  _SOURCE["source"] = make_source(height, width, num_images)
  cfg = input_pipeline.default_data_config()
  cfg.update(dict(name="benchmark", crop_size=crop_size, base_size=base_size,
                  num_parallel_calls=num_parallel_calls))
  it = input_pipeline.make_train_iterator(
      cfg, global_batch_size=batch_size, seed=0, process_index=0, process_count=1)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(it)
  seconds = time.perf_counter() - start
  assert batch["image"].shape == (batch_size, crop_size, crop_size, 3)
  return {"images_per_s": round(num_batches * batch_size / seconds, 2),
          "seconds": round(seconds, 2), "image_size": [height, width],
          "crop_size": crop_size, "base_size": base_size, "batch_size": batch_size,
          "num_batches": num_batches, "cpu_count": os.cpu_count()}


# One flag per `measure` argument, with its default (num_parallel_calls -1: AUTOTUNE).
for _name, _param in inspect.signature(measure).parameters.items():
  flags.DEFINE_integer(_name, _param.default, f"measure({_name}=...)")


def main(argv):
  del argv
  r = measure(**{name: flags.FLAGS[name].value for name in inspect.signature(measure).parameters})
  print(f"{r['images_per_s']:.1f} examples/sec ({r['image_size'][0]}x{r['image_size'][1]} JPEG "
        f"-> crop {r['crop_size']}, batch {r['batch_size']}, {r['num_batches']} "
        f"batches in {r['seconds']:.1f} s, {r['cpu_count']} CPUs)")
