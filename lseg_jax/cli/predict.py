r"""Segment images with a text-defined label set.

  python tools/predict.py --checkpoint CKPT_DIR --image cat.jpg \
      --labels "cat,grass,other" --out cat_seg.png \
      [--prompt "a photo of a {}."] [--logits-out cat_logits.npz] \
      [--embeddings-out cat_emb.npy]
  python tools/predict.py --checkpoint CKPT_DIR --images photos/ \
      --labels-file labels.txt --out results/

Writes, for each image (BASE = OUT without ".png" for --image OUT.png, else
OUT/<image stem>):
  BASE.png          the image with label colours blended over it and a legend
                    listing the labels in the given order (with area %);
  BASE_labels.png   the label map: pixel value = label index (8-bit for up to
                    256 labels, 16-bit above);
  BASE.json         labels, per-label area fractions, sizes, prompt, checkpoint.
  --logits-out      float32 [L, H, W] logits at the image size, key "logits"
                    (and "labels"); a .npz file for --image, a folder for --images.
  --embeddings-out  float16 [H'/2, W'/2, D] L2-normalised pixel embeddings
                    (`model.embed_pixels`, before the dot product with the
                    label embeddings); H', W' = the model input size below.

Input: RGB, normalised with mean 0.5 / std 0.5. Sides that are multiples of
the model's size multiple (32) are used as they are; otherwise the image is
resized (bilinear) to the nearest multiples of 32 and the logits are resized
back to the original size before the argmax (`lseg_jax.inference.ImagePredictor`).

Label embeddings: the checkpoint's frozen CLIP text tower, once per label set,
with --prompt or else the checkpoint's training template (meta
"text_template"; none = bare names). Tokenizer: --tokenizer, else the
checkpoint meta's "tokenizer" (a folder, a hub name, or "byte-level" for the
tiny offline models; relative folders are looked up in the checkpoint folder
first), else openai/clip-vit-base-patch32 (local Hugging Face cache first).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image, ImageOps

from lseg_jax import distributed
from lseg_jax.cli import common

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n", 1)[1])
  common.add_checkpoint_args(p)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--image", help="one image file")
  src.add_argument("--images", help="a folder of images")
  lab = p.add_mutually_exclusive_group(required=True)
  lab.add_argument("--labels", help='comma-separated label names, e.g. "dog,grass,other"')
  lab.add_argument("--labels-file", help="a text file with one label name per line")
  p.add_argument("--out", required=True, help="OUT.png (with --image) or an output folder")
  p.add_argument("--logits-out", default=None, help="OUT.npz (--image) or a folder (--images)")
  p.add_argument("--embeddings-out", default=None,
                 help="OUT.npy (--image) or a folder (--images)")
  p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity in [0, 1]")
  common.add_distributed_args(p)
  return p


def parse_args(argv=None):
  p = build_parser()
  args = common.parse(p, argv)
  if not 0 <= args.alpha <= 1:
    p.error(f"--alpha {args.alpha} must be in [0, 1]")
  if args.images and args.out.lower().endswith(".png"):
    p.error(f"--out {args.out!r} names a PNG file but --images needs an output folder")
  for flag, ext in (("logits_out", ".npz"), ("embeddings_out", ".npy")):
    value = getattr(args, flag)
    if value and args.image and not value.lower().endswith(ext):
      p.error(f"--{flag.replace('_', '-')} {value!r} must end in {ext} with --image")
    if value and args.images and value.lower().endswith(ext):
      p.error(f"--{flag.replace('_', '-')} {value!r} must be a folder with --images")
  return args


def read_labels(args) -> list[str]:
  if args.labels is not None:
    labels = [s.strip() for s in args.labels.split(",")]
  else:
    with open(args.labels_file, encoding="utf-8") as f:
      labels = [line.strip() for line in f]
    labels = [s for s in labels if s]
  if not labels or any(not s for s in labels):
    raise SystemExit(f"error: empty label in {args.labels or args.labels_file!r}; expected "
                     "non-empty names separated by commas (or one per line)")
  return labels


def list_images(args) -> list[str]:
  if args.image:
    if not os.path.isfile(args.image):
      raise SystemExit(f"error: --image {args.image!r} does not exist")
    return [args.image]
  if not os.path.isdir(args.images):
    raise SystemExit(f"error: --images {args.images!r} is not a folder")
  paths = sorted(os.path.join(args.images, f) for f in os.listdir(args.images)
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise SystemExit(f"error: no images ({', '.join(IMAGE_EXTENSIONS)}) in {args.images!r}")
  return paths


def load_image(path: str) -> np.ndarray:
  try:
    with Image.open(path) as im:
      return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
  except OSError as e:
    raise SystemExit(f"error: cannot read image {path!r}: {e}") from e


def output_paths(args, image_path: str) -> dict[str, str | None]:
  stem = os.path.splitext(os.path.basename(image_path))[0]
  if args.image and args.out.lower().endswith(".png"):
    base = args.out[:-4]
  else:
    base = os.path.join(args.out, stem)
  paths = {"overlay": base + ".png", "labels": base + "_labels.png", "json": base + ".json",
           "logits": None, "embeddings": None}
  if args.logits_out:
    paths["logits"] = (args.logits_out if args.image
                       else os.path.join(args.logits_out, stem + ".npz"))
  if args.embeddings_out:
    paths["embeddings"] = (args.embeddings_out if args.image
                           else os.path.join(args.embeddings_out, stem + ".npy"))
  return paths


def _makedirs_for(path):
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)


def save_label_map(path: str, label_map: np.ndarray, num_labels: int):
  dtype = np.uint8 if num_labels <= 256 else np.uint16
  Image.fromarray(label_map.astype(dtype)).save(path)


def main(argv=None) -> int:
  args = parse_args(argv)
  labels = read_labels(args)
  images = list_images(args)

  common.setup_logging()
  common.start_jax(args)
  # pylint: disable=g-import-not-at-top
  import jax
  from jax.experimental import multihost_utils
  from lseg_jax import inference, visualize
  # pylint: enable=g-import-not-at-top
  if jax.process_index() != 0:
    # Prediction files come from process 0 alone; the others wait for it.
    multihost_utils.sync_global_devices("predict done")
    distributed.done()
    return 0

  model, _, embedder, tokenizer_spec, prompt = common.load_checkpoint(args)
  text_emb = embedder(labels)
  predictor = inference.ImagePredictor(model)

  for path in images:
    image = load_image(path)
    out = predictor(image, text_emb, embeddings=args.embeddings_out is not None)
    paths = output_paths(args, path)
    for p in paths.values():
      if p:
        _makedirs_for(p)
    label_map = out["label_map"]
    visualize.overlay_with_legend(image, label_map, labels, alpha=args.alpha).save(
        paths["overlay"])
    save_label_map(paths["labels"], label_map, len(labels))
    areas = visualize.area_fractions(label_map, len(labels))
    report = {
        "image": path, "size": list(image.shape[:2]), "model_input_size": list(out["input_size"]),
        "labels": labels, "prompt": prompt,
        "area_fraction": {name: float(a) for name, a in zip(labels, areas)},
        "label_map": os.path.basename(paths["labels"]),
        "checkpoint": os.path.abspath(args.checkpoint), "tokenizer": tokenizer_spec,
    }
    if paths["logits"]:
      np.savez(paths["logits"], logits=np.ascontiguousarray(
          out["logits"].transpose(2, 0, 1), np.float32), labels=np.array(labels))
      report["logits"] = os.path.basename(paths["logits"])
    if paths["embeddings"]:
      np.save(paths["embeddings"], out["embeddings"].astype(np.float16))
      report["embeddings"] = os.path.basename(paths["embeddings"])
      report["embeddings_shape"] = list(out["embeddings"].shape)
    with open(paths["json"], "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
    summary = ", ".join(f"{n} {100 * a:.1f}%" for n, a in zip(labels, areas))
    print(f"{path}: {summary} -> {paths['overlay']}")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("predict done")
  distributed.done()
  return 0


if __name__ == "__main__":
  sys.exit(main())
