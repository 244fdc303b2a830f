r"""Evaluate a checkpoint on the eval split of a training config's data.

  python tools/eval.py --checkpoint CKPT_DIR --config configs/NAME.py[:ARGS] \
      [--multiscale] [--flip] [--out report.json]

Protocol (from the data): a fixed label set (ADE20K, ...) gives pixAcc and
mIoU as PyTorch-Encoding computes them; an episodic source (pascal5i,
coco20i, fss1000) gives HSNet's mIoU and FB-IoU over the fold's classes.
Inference:
  default         single scale: each eval batch as config.data prepares it
                  (sides padded to multiples of 32), sharded over all devices;
  --multiscale    the official test protocol: scales 0.5-1.75 of base size
                  520, sliding 480 crops at stride 320, padded borders,
                  logits summed; add --flip for the mirrored pass (the paper's
                  numbers are --multiscale --flip);
  --flip alone    the sliding window at scale 1.0 with flipping;
  --scales a,b,c  any other scale list (implies the sliding window).
The sliding window needs the original images: use a data config with
eval_resize="none" (the tool sets it unless --keep-eval-resize).

Writes a JSON report (metrics, per-class IoU, dataset, split, fold,
checkpoint, config) to --out (default CKPT_DIR/eval/<dataset>_<split>[_fold<k>]_<mode>.json)
and prints a table. See docs/evaluation.md for every paper table's command.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(spec: str):
  """configs/NAME.py[:ARG] -> the module's get_config(ARG) (or get_config())."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise SystemExit(f"error: --config file {path!r} does not exist; expected "
                     "configs/NAME.py[:ARGS]")
  module_spec = importlib.util.spec_from_file_location("eval_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise SystemExit(f"error: {path!r} defines no get_config()")
  return module.get_config(arg) if arg else module.get_config()


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n", 1)[1])
  p.add_argument("--checkpoint", required=True, help="checkpoint directory (Orbax)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--config", help="configs/NAME.py[:ARGS] (uses config.data)")
  src.add_argument("--data", help="a registered dataset name (ade20k, pascal5i, coco20i, "
                                  "fss1000, ...) instead of a config, e.g. for imported "
                                  "official checkpoints")
  p.add_argument("--eval-resize", default=None,
                 help="override data eval_resize (none | long_side | center_crop | ...)")
  p.add_argument("--multiscale", action="store_true", help="official multi-scale protocol")
  p.add_argument("--flip", action="store_true", help="add horizontally flipped windows")
  p.add_argument("--scales", default=None, help="comma-separated scales (sliding window)")
  p.add_argument("--base-size", type=int, default=None, help="default: config.data.base_size")
  p.add_argument("--crop-size", type=int, default=None, help="default: config.data.crop_size")
  p.add_argument("--split", default=None, help="override config.data.eval_split")
  p.add_argument("--fold", type=int, default=None, help="override config.data.fold")
  p.add_argument("--data-dir", default=None, help="override config.data.data_dir")
  p.add_argument("--keep-eval-resize", action="store_true",
                 help="keep config.data.eval_resize for the sliding window")
  p.add_argument("--batch-size", type=int, default=None,
                 help="eval batch per host (default: config.eval_batch_size / processes, "
                      "else 2 per local device)")
  p.add_argument("--crops-per-device", type=int, default=2, help="sliding-window crops per call")
  p.add_argument("--tokenizer", default=None, help="default: the checkpoint's")
  p.add_argument("--prompt", default=None,
                 help="label template (default: the checkpoint's; \"\" = bare names)")
  p.add_argument("--background-text", default=None,
                 help='episodes: the text embedded for the table\'s "other" label '
                      '(default: "others", as lang-seg\'s zero-shot code)')
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                 help="override the checkpoint's compute dtype")
  p.add_argument("--max-batches", type=int, default=None, help="stop early (smoke tests)")
  p.add_argument("--out", default=None, help="JSON report path")
  p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
  args = p.parse_args(argv)
  if args.scales is not None:
    try:
      args.scales = tuple(float(s) for s in args.scales.split(","))
    except ValueError:
      p.error(f"--scales {args.scales!r}: expected comma-separated numbers like 0.75,1.0,1.25")
  if args.multiscale and args.scales:
    p.error("--multiscale uses the official scales; give either it or --scales")
  return args


def make_window(args, data_cfg):
  from lseg_jax import inference  # pylint: disable=g-import-not-at-top
  if not (args.multiscale or args.flip or args.scales):
    return None
  scales = args.scales or (inference.OFFICIAL_SCALES if args.multiscale else (1.0,))
  return inference.SlidingWindow(
      scales=tuple(scales), flip=args.flip,
      base_size=args.base_size or int(data_cfg.get("base_size", None) or 520),
      crop_size=args.crop_size or int(data_cfg.get("crop_size", None) or 480))


def default_out(args, data_cfg, mode) -> str:
  name = f"{data_cfg.name}_{data_cfg.get('eval_split', None) or 'validation'}"
  if data_cfg.get("fold", None) is not None:
    name += f"_fold{data_cfg.fold}"
  return os.path.join(args.checkpoint, "eval", f"{name}_{mode}.json")


def config_from_data(name: str):
  """A config holding only `data`: the input pipeline defaults for source `name`."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from lseg_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  data = input_pipeline.default_data_config()
  data.name = name
  if name in ("pascal5i", "coco20i", "fss1000"):  # the zero-shot episode sources
    # HSNet's protocol: query and mask resized to 480 x 480, scored there.
    data.eval_resize = "square"
  else:
    # Single scale: 480 center crops, PyTorch-Encoding's "val" mode that the official
    # training loop validates with (the sliding window switches to whole images).
    data.eval_resize = "center_crop"
  return ml_collections.ConfigDict({"data": data})


def main(argv=None) -> int:
  args = parse_args(argv)
  config = load_config(args.config) if args.config else config_from_data(args.data)
  if "data" not in config:
    raise SystemExit(f"error: config {args.config!r} has no 'data' field")

  # pylint: disable=g-import-not-at-top
  import jax
  from lseg_jax import checkpoint, evaluate
  from lseg_jax.data import input_pipeline
  # pylint: enable=g-import-not-at-top

  data_cfg = config.data
  with data_cfg.unlocked() if hasattr(data_cfg, "unlocked") else contextlib.nullcontext():
    if args.eval_resize:
      data_cfg.eval_resize = args.eval_resize
    if args.split:
      data_cfg.eval_split = args.split
    if args.fold is not None:
      data_cfg.fold = args.fold
    if args.data_dir:
      data_cfg.data_dir = args.data_dir
    window = make_window(args, data_cfg)
    if window is not None and not (args.keep_eval_resize or args.eval_resize):
      data_cfg.eval_resize = "none"
      data_cfg.eval_pad_to = None

  overrides = {"dtype": args.dtype} if args.dtype else {}
  model, meta = checkpoint.load_model(args.checkpoint, args.step, **overrides)
  embedder, tokenizer_spec, prompt = evaluate.checkpoint_label_embedder(
      model, meta, args.checkpoint, tokenizer=args.tokenizer, prompt=args.prompt)

  local = jax.local_device_count()
  batch = args.batch_size
  if batch is None and config.get("eval_batch_size"):
    batch = max(1, int(config.eval_batch_size) // jax.process_count())
  batch = batch or 2 * local
  it = input_pipeline.make_eval_iterator(data_cfg, batch_size=batch)
  episodic = "class_index" in it.dataset.element_spec
  text_names = list(it.label_names)
  if episodic:
    text_names[0] = args.background_text or evaluate.EPISODE_BACKGROUND_TEXT
  text_emb = embedder(text_names)
  evaluator = evaluate.Evaluator(model, it.label_names, text_emb, episodic=episodic,
                                 window=window, crops_per_device=args.crops_per_device)
  batches, num_batches = it, it.num_batches
  if args.max_batches is not None:
    batches = itertools.islice(it, args.max_batches)
    num_batches = min(num_batches or args.max_batches, args.max_batches)

  start = time.time()
  report = evaluate.evaluate(evaluator, batches, num_batches=num_batches,
                             progress=not args.no_progress)
  report.update({
      "dataset": data_cfg.name, "split": data_cfg.get("eval_split", None),
      "fold": data_cfg.get("fold", None),
      "eval_resize": data_cfg.get("eval_resize", None),
      "checkpoint": os.path.abspath(args.checkpoint),
      "step": meta.get("step", args.step), "config": args.config or f"--data {args.data}",
      "tokenizer": tokenizer_spec, "prompt": prompt,
      "background_text": text_names[0] if episodic else None,
      "num_labels": len(it.label_names), "skipped_examples": it.num_skipped,
      "seconds": round(time.time() - start, 2),
  })
  if args.max_batches is not None:
    report["max_batches"] = args.max_batches

  if jax.process_index() == 0:
    out = args.out or default_out(args, data_cfg, report["mode"])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
    title = (f"{report['dataset']} / {report['split']}"
             + (f" / fold {report['fold']}" if report["fold"] is not None else "")
             + f" ({report['protocol']}, {report['mode']})")
    print(title)
    print(evaluate.format_table(report))
    print(f"report: {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
