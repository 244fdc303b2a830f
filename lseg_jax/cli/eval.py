r"""Evaluate a checkpoint with the evaluations of its training config.

  python tools/eval.py --checkpoint RUN_DIR [--multiscale] [--flip] [--out report.json]
  python tools/eval.py --checkpoint CKPT_DIR --config configs/NAME.py[:ARGS] [--config.KEY=V]
  python tools/eval.py --checkpoint CKPT_DIR --data fss1000
  python tools/eval.py --checkpoint CKPT --suite openvocab --data-dir ROOT [--protocol NAME]
      [--benchmarks a847,pc459,...] [--synonyms join|max|mean] [--out DIR]

Config: by default the training config saved in the checkpoint (with every
--config.* override given at training time); --config FILE[:ARG] uses a config file
instead, and --data NAME a registered dataset with its default evaluation (for
imported checkpoints, which carry no training config). --config.KEY=VALUE overrides
any field on top. Each entry of config.evals is evaluated (--eval NAME: one of them);
without entries, config.data's eval split.
Protocol (from the data source): a fixed label set (ADE20K, ...) gives pixAcc and mIoU,
an episodic source (pascal5i, coco20i, fss1000) HSNet's mIoU and FB-IoU over the fold's
classes. Inference: single scale by default; --multiscale [--flip] the official sliding
window (the paper's numbers are --multiscale --flip), --flip alone at scale 1.0, --scales
a,b,c any other scales; the sliding window sets eval_resize="none" unless
--keep-eval-resize. Writes a JSON report to --out (default
CKPT_DIR/eval/<dataset>_<split>[_fold<k>]_<mode>.json) and prints a table.

--suite openvocab: the open-vocabulary benchmarks under one protocol of
configs/openvocab.py, all read from --data-dir; a report per benchmark, then suite.json
and suite.md in --out (default CKPT_DIR/eval/openvocab_<protocol>); a rerun skips the
finished ones. Every mode, the report's fields and every paper table's command:
docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import os
import time

from etils import epath
import jax

from lseg_jax import checkpoint
from lseg_jax import distributed
from lseg_jax import evaluate
from lseg_jax import inference
from lseg_jax import openvocab
from lseg_jax import sharding
from lseg_jax.cli import common
from lseg_jax.data import input_pipeline


def build_parser() -> argparse.ArgumentParser:
  p = common.new_parser(__doc__)
  common.add_checkpoint_args(p)
  src = p.add_mutually_exclusive_group()
  common.add_config_arg(src, required=False, help_text=(
      "config file[:arg] whose evaluations to run (default: the checkpoint's training "
      "config)"))
  src.add_argument("--data", help="a registered dataset name (ade20k, pascal5i, coco20i, "
                                  "fss1000, ...) instead of a config, e.g. for imported "
                                  "official checkpoints")
  p.add_argument("--eval", default=None, help="run only this entry of config.evals")
  p.add_argument("--eval-resize", default=None,
                 help="override data eval_resize (none | long_side | center_crop | ...)")
  p.add_argument("--multiscale", action="store_true", help="official multi-scale protocol")
  p.add_argument("--flip", action="store_true", help="add horizontally flipped windows")
  p.add_argument("--scales", default=None, help="comma-separated scales (sliding window)")
  p.add_argument("--base-size", type=int, default=None, help="default: the data's base_size")
  p.add_argument("--crop-size", type=int, default=None, help="default: the data's crop_size")
  p.add_argument("--split", default=None, help="override the data's eval_split")
  p.add_argument("--fold", type=int, default=None, help="override the data's fold")
  p.add_argument("--shot", type=int, default=None,
                 help="episodes of the official --nshot N (default: the data's, else 0, "
                      "the paper's zero-shot setting; docs/evaluation.md)")
  p.add_argument("--data-dir", default=None, help="override the data's data_dir")
  p.add_argument("--keep-eval-resize", action="store_true",
                 help="keep the data's eval_resize for the sliding window")
  p.add_argument("--batch-size", type=int, default=None,
                 help="eval batch per host (default: the evaluation's batch size / "
                      "processes; with --data 2 per local device)")
  p.add_argument("--crops-per-device", type=int, default=2, help="sliding-window crops per call")
  p.add_argument("--background-text", default=None,
                 help='episodes: the text embedded for the table\'s "other" label '
                      '(default: "others", as lang-seg\'s zero-shot code)')
  p.add_argument("--max-batches", type=int, default=None,
                 help="stop after this many batches (default: the whole split)")
  p.add_argument("--out", default=None, help="JSON report path (--suite: a folder)")
  p.add_argument("--suite", default=None, choices=["openvocab"],
                 help="evaluate a benchmark suite (configs/SUITE.py) instead")
  p.add_argument("--protocol", default=None, help="the suite's protocol (configs/openvocab.py)")
  p.add_argument("--benchmarks", default=None, help="comma-separated suite benchmarks")
  p.add_argument("--synonyms", default=None, choices=openvocab.SYNONYMS,
                 help="override the protocol's synonym rule")
  p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
  distributed.add_arguments(p)
  return p


def parse_args(argv=None) -> argparse.Namespace:
  p = build_parser()
  args = common.parse(p, argv)
  if args.scales is not None:
    try:
      args.scales = tuple(float(s) for s in args.scales.split(","))
    except ValueError:
      p.error(f"--scales {args.scales!r}: expected comma-separated numbers like 0.75,1.0,1.25")
  if args.multiscale and args.scales:
    p.error("--multiscale uses the official scales; give either it or --scales")
  if args.scales is not None and not all(0 < s <= 16 for s in args.scales):
    p.error(f"--scales {','.join(map(str, args.scales))}: expected scales in (0, 16]")
  minimum = {"batch_size": 1, "base_size": 1, "crop_size": 1, "max_batches": 1,
             "crops_per_device": 1, "step": 0, "fold": 0, "shot": 0}
  for flag, low in minimum.items():
    value = getattr(args, flag)
    if value is not None and value < low:
      p.error(f"--{flag.replace('_', '-')} {value}: expected an integer >= {low}")
  return args


def default_out(checkpoint_dir: str, data_cfg, mode: str) -> str:
  name = f"{data_cfg.name}_{data_cfg.eval_split}"
  if data_cfg.fold is not None:
    name += f"_fold{data_cfg.fold}"
  return str(epath.Path(checkpoint_dir) / "eval" / f"{name}_{mode}.json")


def resolve_config(args, meta):
  if args.config:
    return common.load_config(args.config, args.overrides)
  if args.data:
    return common.load_config(None, args.overrides, base=data_only_config(args.data))
  if "config" not in meta:
    raise common.UserError(f"checkpoint {args.checkpoint!r} carries no training config "
                     "(imported checkpoints do not); pass --config FILE or --data NAME")
  return common.load_config(None, args.overrides, base=meta["config"])


def data_only_config(name: str) -> dict:
  """The config of a bare dataset name (`--data NAME`): the source's default evaluation."""
  # Episodes: HSNet's protocol, query and mask resized to 480 x 480 and scored there.
  # Fixed labels: 480 center crops, PyTorch-Encoding's "val" mode that the official
  # training loop validates with (the sliding window switches to whole images).
  resize = "square" if input_pipeline.is_episodic({"name": name}) else "center_crop"
  return {"data": {"name": name, "eval_resize": resize}}


def sliding_window(args, data_cfg) -> inference.SlidingWindow | None:
  """The multi-scale protocol the command line asks for; None for single scale."""
  if not (args.multiscale or args.flip or args.scales):
    return None
  scales = args.scales or (inference.OFFICIAL_SCALES if args.multiscale else (1.0,))
  return inference.SlidingWindow(
      scales=tuple(scales), flip=args.flip,
      base_size=args.base_size or data_cfg.base_size,
      crop_size=args.crop_size or data_cfg.crop_size)


def select_evaluations(config, args) -> list[evaluate.Evaluation]:
  """The config's evaluations (`evaluate.Evaluation.from_config`) with the command
  line's data and protocol flags laid over them (unset flags keep the config's value).

  --batch-size is per process; without it, the evaluation's, or 2 per local device for a bare
  dataset (--data NAME).

  Raises:
    UserError: no evaluation has the chosen name, or one report is asked of several.
  """
  evals = evaluate.Evaluation.from_config(config)
  if args.eval is not None:
    named = [ev for ev in evals if ev.name == args.eval]
    if not named:
      raise common.UserError(f"--eval {args.eval!r} is not among the config's "
                             f"evaluations {[ev.name for ev in evals]}")
    evals = named
  if args.out and len(evals) > 1:
    raise common.UserError(f"--out names one report but the config has {len(evals)} "
                           f"evaluations {[ev.name for ev in evals]}; add --eval NAME")
  for ev in evals:
    data = ev.data
    with data.unlocked():
      for field, value in (("eval_resize", args.eval_resize),
                           ("eval_split", args.split), ("data_dir", args.data_dir)):
        if value:
          data[field] = value
      for field in ("fold", "shot"):  # 0 is one of each: set unless None
        if getattr(args, field) is not None:
          data[field] = getattr(args, field)
      ev.window = sliding_window(args, data)
      if ev.window is not None and not (args.keep_eval_resize or args.eval_resize):
        data.eval_resize = "none"
        data.eval_pad_to = None
    if args.batch_size:
      ev.batch_size = args.batch_size * jax.process_count()
    elif args.data:
      ev.batch_size = 2 * jax.local_device_count() * jax.process_count()
    ev.num_batches = args.max_batches
    ev.background_text = args.background_text
    ev.crops_per_device = args.crops_per_device
  return evals


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.config and not os.path.isfile(args.config.partition(":")[0]):
    raise common.UserError(f"--config file {args.config.partition(':')[0]!r} does not "
                     "exist; expected configs/NAME.py[:ARGS]")
  common.setup_logging()
  if args.suite:
    return run_suite(args)
  common.start_jax(args)

  model, meta, embedder, tokenizer_spec, prompt = common.load_checkpoint(args)
  config = resolve_config(args, meta)
  evals = select_evaluations(config, args)
  mesh = sharding.make_mesh(config.mesh)
  ckpt_dir = checkpoint.resolve_directory(args.checkpoint)
  for ev in evals:
    start = time.time()
    report = ev.run(model, embedder, mesh=mesh, progress=not args.no_progress)
    report.update({
        "checkpoint": ckpt_dir, "step": meta.get("step", args.step),
        "config": args.config or (f"--data {args.data}" if args.data else "checkpoint"),
        "tokenizer": tokenizer_spec, "prompt": prompt,
        "seconds": round(time.time() - start, 2),
    })
    if jax.process_index() == 0:
      out = args.out or default_out(ckpt_dir, ev.data, report["mode"])
      openvocab.write_json(out, report)  # in one piece, local or remote
      print(f"{report['dataset']} / {report['split']}"
            + (f" / fold {report['fold']}" if report["fold"] is not None else "")
            + f" ({report['protocol']}, {report['mode']})")
      print(evaluate.format_table(report))
      print(f"report: {out}")
  distributed.done()
  return 0


def suite_config(args):
  """The suite's protocol config: configs/SUITE.py:protocol=NAME (next to the package)."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  path = os.path.join(root, "configs", f"{args.suite}.py")
  arg = f":protocol={args.protocol}" if args.protocol else ""
  return common.read_config_file(path + arg)


def run_suite(args) -> int:
  """--suite: every benchmark under one protocol (`lseg_jax.openvocab.run_suite`)."""
  if args.config or args.data or args.multiscale or args.flip or args.scales:
    raise common.UserError("--suite takes its protocol from --protocol; drop --config, "
                           "--data, --multiscale, --flip and --scales")
  if not args.data_dir:
    raise common.UserError("--suite needs --data-dir ROOT, the folder of every benchmark")
  protocol = suite_config(args)
  common.start_jax(args)
  model, meta, embedder, tokenizer_spec, prompt = common.load_checkpoint(args)
  ckpt_dir = checkpoint.resolve_directory(args.checkpoint)
  out = args.out or str(epath.Path(ckpt_dir) / "eval" / f"{args.suite}_{protocol.name}")
  summary = openvocab.run_suite(
      model, embedder, protocol, data_dir=args.data_dir, out_dir=out,
      benchmarks=args.benchmarks.split(",") if args.benchmarks else None,
      synonyms=args.synonyms, batch_size=args.batch_size,
      crops_per_device=args.crops_per_device, progress=not args.no_progress,
      info={"checkpoint": ckpt_dir, "step": meta.get("step", args.step),
            "tokenizer": tokenizer_spec, "prompt": prompt})
  if jax.process_index() == 0:
    print(openvocab.markdown(summary), end="")
    print(f"reports: {out}")
  distributed.done()
  return 0


if __name__ == "__main__":
  common.entry_point(main)
