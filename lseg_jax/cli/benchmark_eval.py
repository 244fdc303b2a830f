r"""Images/s of single-scale and multi-scale evaluation (random weights, cached labels).

  python tools/benchmark_eval.py                          # ViT-B/32, 150 labels
  python tools/benchmark_eval.py --backbone clip_vitl16_384 --dtype bfloat16

Runs the real evaluation code (`lseg_jax.evaluate.Evaluator`) on generated
batches: single scale on [B, 480, 480] crops (ADE20K's center-crop
validation), multi scale with the official protocol (6 scales of base 520,
480 windows at stride 320, flip) on images of --image-size (ADE20K's typical
512x683). Label embeddings are random [L, D] arrays: evaluation computes them
once per label set, so the text tower is not part of the cost. Compilation is
excluded (one warm-up batch / one warm-up crop batch).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from lseg_jax import distributed
from lseg_jax.cli import common


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n", 1)[1])
  p.add_argument("--backbone", default="clip_vitb32_384")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--labels", type=int, default=150, help="label set size (ADE20K: 150)")
  p.add_argument("--batch-size", type=int, default=None,
                 help="single-scale batch (default: 2 per device)")
  p.add_argument("--crop", type=int, default=480)
  p.add_argument("--single-batches", type=int, default=3, help="timed single-scale batches")
  p.add_argument("--multiscale-images", type=int, default=1, help="timed multi-scale images")
  p.add_argument("--image-size", default="512,683", help="H,W of multi-scale images")
  p.add_argument("--no-flip", action="store_true", help="multi scale without the flip pass")
  p.add_argument("--crops-per-device", type=int, default=2)
  p.add_argument("--json", default=None, help="also write the figures to this JSON file")
  common.add_distributed_args(p)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  common.setup_logging()
  common.start_jax(args)
  # pylint: disable=g-import-not-at-top
  from flax import nnx
  import jax
  import numpy as np
  from lseg_jax import evaluate, inference
  from lseg_jax.models import lseg
  # pylint: enable=g-import-not-at-top

  h, w = (int(s) for s in args.image_size.split(","))
  cfg = lseg.LSegConfig(backbone=args.backbone, dtype=args.dtype)
  t0 = time.time()
  model = lseg.LSeg(cfg, rngs=nnx.Rngs(0))
  model.eval()
  print(f"model {args.backbone} ({args.dtype}) built in {time.time() - t0:.1f}s; "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)
  rng = np.random.default_rng(0)
  names = [f"label {i}" for i in range(args.labels)]
  text = rng.normal(size=(args.labels, model.text_dim)).astype(np.float32)
  results = {"backbone": args.backbone, "dtype": args.dtype, "labels": args.labels,
             "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
             "cpu_count": os.cpu_count()}

  # Single scale: whole batches through the sharded jitted step.
  if args.single_batches > 0:
    b = args.batch_size or 2 * jax.local_device_count()
    batch = {"image": rng.uniform(-1, 1, (b, args.crop, args.crop, 3)).astype(np.float32),
             "label": rng.integers(-1, args.labels, (b, args.crop, args.crop)).astype(np.int32),
             "label_mask": np.ones((b, args.labels), bool), "valid": np.ones(b, bool)}
    ev = evaluate.Evaluator(model, names, text, episodic=False)
    t0 = time.time()
    ev.update(batch)
    print(f"single scale: compiled + first batch in {time.time() - t0:.1f}s", flush=True)
    t0 = time.time()
    for _ in range(args.single_batches):
      ev.update(batch)
    dt = time.time() - t0
    results["single_scale_images_per_s"] = args.single_batches * b / dt
    results["single_scale_batch"] = b
    print(f"single scale [{b}, {args.crop}, {args.crop}]: "
          f"{results['single_scale_images_per_s']:.3f} images/s", flush=True)

  # Multi scale: the official sliding-window protocol on whole images.
  if args.multiscale_images > 0:
    window = inference.SlidingWindow(crop_size=args.crop, flip=not args.no_flip)
    ev = evaluate.Evaluator(model, names, text, episodic=False, window=window,
                            crops_per_device=args.crops_per_device)
    runner = ev._infer.runner  # pylint: disable=protected-access
    t0 = time.time()
    runner(np.zeros((runner.batch_size, args.crop, args.crop, 3), np.float32), text,
           np.ones((runner.batch_size, args.labels), bool))
    print(f"multi scale: compiled + one crop batch in {time.time() - t0:.1f}s", flush=True)
    n = args.multiscale_images
    batch = {"image": rng.uniform(-1, 1, (n, h, w, 3)).astype(np.float32),
             "label": rng.integers(-1, args.labels, (n, h, w)).astype(np.int32),
             "label_mask": np.ones((n, args.labels), bool), "valid": np.ones(n, bool),
             "image_size": np.array([[h, w]] * n, np.int32)}
    crops = sum(len(inference.window_origins(*inference.scaled_size(h, w, s, window.base_size), args.crop,
                                             window.stride)[1]) for s in window.scales)
    t0 = time.time()
    ev.update(batch)
    dt = time.time() - t0
    results["multi_scale_images_per_s"] = n / dt
    results["multi_scale_windows_per_image"] = crops * (2 if window.flip else 1)
    results["multi_scale_image_size"] = [h, w]
    print(f"multi scale [{h}, {w}], {crops} windows x {2 if window.flip else 1} "
          f"(flip): {results['multi_scale_images_per_s']:.4f} images/s "
          f"({dt / n:.1f} s/image)", flush=True)

  print(json.dumps(results))
  if args.json and jax.process_index() == 0:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
  distributed.done()
  return 0


if __name__ == "__main__":
  common.entry_point(main)
