r"""Segment images with a text-defined label set.

  python tools/predict.py --checkpoint CKPT_DIR --image cat.jpg \
      --labels "cat,grass,other" --out cat_seg.png \
      [--prompt "a photo of a {}."] [--logits-out cat_logits.npz] \
      [--embeddings-out cat_emb.npy]
  python tools/predict.py --checkpoint CKPT_DIR --images photos/ \
      --labels-file labels.txt --out results/

Writes, for each image (BASE = OUT without ".png" for --image OUT.png, else
OUT/<image stem>): BASE.png, the image with label colours blended over it and a legend in
label order (with area %); BASE_labels.png, the label map (pixel value = label index);
BASE.json (labels, areas, sizes, prompt, checkpoint); with --logits-out the float32
[L, H, W] logits, with --embeddings-out the float16 [H'/2, W'/2, D] pixel embeddings (a
file for --image, a folder for --images). Single scale by default, --multiscale the
official multi-scale + flip protocol; --max-side N first shrinks larger images. Formats,
image modes and input sizes: docs/evaluation.md, "Prediction".
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import jax
from jax.experimental import multihost_utils
import numpy as np

from lseg_jax import distributed
from lseg_jax import predict as predict_lib
from lseg_jax.cli import common


def build_parser() -> argparse.ArgumentParser:
  p = common.new_parser(__doc__)
  common.add_checkpoint_args(p)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--image", help="one image file")
  src.add_argument("--images", help="a folder of images")
  lab = p.add_mutually_exclusive_group(required=True)
  lab.add_argument("--labels", help=(
      'comma-separated label names, e.g. "dog,grass,other"; write \\, for a comma inside '
      'a name ("red disc\\, large,other"); any other backslash is refused'))
  lab.add_argument("--labels-file", help="a text file with one label name per line")
  p.add_argument("--out", required=True, help="OUT.png (with --image) or an output folder")
  p.add_argument("--logits-out", default=None, help="OUT.npz (--image) or a folder (--images)")
  p.add_argument("--embeddings-out", default=None, help="OUT.npy (--image) or a folder (--images)")
  p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity in [0, 1]")
  p.add_argument("--multiscale", action="store_true",
                 help="the official multi-scale + flip protocol (slower)")
  p.add_argument("--max-side", type=int, default=None,
                 help="shrink images whose long side is longer to this many pixels")
  distributed.add_arguments(p)
  return p


def parse_args(argv=None):
  p = build_parser()
  args = common.parse(p, argv)
  if not 0 <= args.alpha <= 1:
    p.error(f"--alpha {args.alpha} must be in [0, 1]")
  if args.max_side is not None and args.max_side < 32:
    p.error(f"--max-side {args.max_side} must be at least 32")
  if args.multiscale and args.embeddings_out:
    p.error("--embeddings-out comes from the single-scale protocol; drop --multiscale")
  if args.step is not None and args.step < 0:
    p.error(f"--step {args.step}: expected a checkpoint step >= 0")
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
  if args.labels_file is not None and not os.path.isfile(args.labels_file):
    raise common.UserError(f"--labels-file {args.labels_file!r} does not exist; expected "
                           "a text file with one label name per line")
  try:
    if args.labels is not None:
      return predict_lib.parse_labels(args.labels)
    return predict_lib.read_labels_file(args.labels_file)
  except (OSError, ValueError) as e:
    raise common.UserError(f"{e}") from None


def list_images(args) -> list[str]:
  if args.image:
    if not os.path.isfile(args.image):
      raise common.UserError(f"--image {args.image!r} does not exist")
    return [args.image]
  if not os.path.isdir(args.images):
    raise common.UserError(f"--images {args.images!r} is not a folder")
  paths = predict_lib.list_images(args.images)
  if not paths:
    raise common.UserError(f"no images ({', '.join(predict_lib.IMAGE_EXTENSIONS)}) in "
                     f"{args.images!r}")
  return paths


def output_stems(paths: list[str]) -> dict[str, str]:
  """{image path: output stem}: the file's stem, or stem_EXT where two images share a
  stem (good.jpg and good.png -> good_jpg, good_png), so no output overwrites another."""
  stems = {p: os.path.splitext(os.path.basename(p))[0] for p in paths}
  counts = collections.Counter(stems.values())
  out = {p: f"{stem}_{os.path.splitext(p)[1].lstrip('.').lower()}" if counts[stem] > 1
         else stem for p, stem in stems.items()}
  if len(set(out.values())) != len(out):
    raise common.UserError(f"images in {os.path.dirname(paths[0])!r} give the same output "
                           "name; rename them")
  return out


def output_paths(args, stem: str) -> dict[str, str | None]:
  """{"base": BASE of `Prediction.save`, "logits", "embeddings": a path or None}."""
  paths = {"base": (args.out[:-4] if args.image and args.out.lower().endswith(".png")
                    else os.path.join(args.out, stem))}
  for key, out, ext in (("logits", args.logits_out, ".npz"),
                        ("embeddings", args.embeddings_out, ".npy")):
    paths[key] = out and (out if args.image else os.path.join(out, stem + ext))
  return paths


def main(argv=None) -> int:
  args = parse_args(argv)
  labels = read_labels(args)
  images = list_images(args)

  common.setup_logging()
  common.start_jax(args)
  if jax.process_index() != 0:
    # Prediction files come from process 0 alone; the others wait for it.
    multihost_utils.sync_global_devices("predict done")
    distributed.done()
    return 0

  model, meta, embedder, tokenizer_spec, _ = common.load_checkpoint(args)
  segmenter = predict_lib.Segmenter(model, embedder, window=predict_lib.default_window(meta))
  protocol = predict_lib.MULTI_SCALE if args.multiscale else predict_lib.SINGLE_SCALE

  stems = output_stems(images)
  failed = []
  for path in images:
    try:
      predict_one(args, path, stems[path], labels, segmenter, protocol, tokenizer_spec)
    except common.UserError as e:
      if args.image:
        raise
      failed.append((path, str(e)))
      print(f"error: {e}", file=sys.stderr)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("predict done")
  distributed.done()
  if failed:
    print(f"error: {len(failed)} of {len(images)} images failed:\n" + "\n".join(
        f"  {p}: {why}" for p, why in failed), file=sys.stderr)
    return common.USER_ERROR_EXIT
  return 0


def predict_one(args, path, stem, labels, segmenter, protocol, tokenizer_spec):
  """Segments one image and writes its outputs (nothing when the prediction fails)."""
  try:
    source = predict_lib.load_image(path, max_side=args.max_side)
  except ValueError as e:
    raise common.UserError(f"cannot read image: {e}") from None
  try:
    result = segmenter(source.image, labels, protocol=protocol,
                       embeddings=args.embeddings_out is not None)
  except predict_lib.NonFiniteLogitsError:
    raise common.UserError(
        f"the model's logits for {path!r} are not finite (NaN/Inf): checkpoint "
        f"{args.checkpoint!r} holds non-finite weights or is damaged; no prediction "
        "written") from None
  except ValueError as e:
    raise common.UserError(f"{path!r}: {e}") from None
  warnings = source.warnings + result.warnings
  for message in warnings:
    print(f"warning: {message}", file=sys.stderr)
  paths = output_paths(args, stem)
  for p in paths.values():
    if p:
      os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
  files = {}
  if paths["logits"]:
    np.savez(paths["logits"], logits=np.ascontiguousarray(
        result.logits.transpose(2, 0, 1), np.float32), labels=np.array(labels))
    files["logits"] = os.path.basename(paths["logits"])
  if paths["embeddings"]:
    np.save(paths["embeddings"], result.embeddings.astype(np.float16))
    files["embeddings"] = os.path.basename(paths["embeddings"])
    files["embeddings_shape"] = list(result.embeddings.shape)
  written = result.save(paths["base"], alpha=args.alpha, image=path,
                        checkpoint=os.path.abspath(args.checkpoint), tokenizer=tokenizer_spec,
                        **source.report_fields(), warnings=warnings, **files)
  print(f"{path}: {result.summary()} -> {written['overlay']}")


if __name__ == "__main__":
  common.entry_point(main)
