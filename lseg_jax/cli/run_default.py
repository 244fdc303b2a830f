r"""The built-in default, end to end on a CPU: train, evaluate, predict an image.

  python tools/run_default.py --workdir runs/synthetic_tiny

1. trains `configs/synthetic_tiny.py` (tiny LSeg, generated data; a few minutes on two
   cores) into WORKDIR (rerunning resumes; a finished run is not retrained);
2. evaluates the final checkpoint on the validation split with tools/eval.py
   (WORKDIR/eval.json);
3. segments a newly generated scene with tools/predict.py, labels given as text
   (WORKDIR/example.png -> WORKDIR/prediction.png, plus its label map and JSON).
Config overrides work as for tools/train.py (`--config.total_steps=...`).
"""
from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

from lseg_jax import train
from lseg_jax.cli import common
from lseg_jax.cli import eval as eval_cli
from lseg_jax.cli import predict
from lseg_jax.data import synthetic


def build_parser() -> argparse.ArgumentParser:
  p = common.new_parser(__doc__)
  common.add_config_arg(p, required=False, help_text=(
      "training config file[:arg] (default: configs/synthetic_tiny.py)"))
  p.add_argument("--workdir", default="runs/synthetic_tiny", help="output directory")
  return p


def main(argv=None) -> int:
  args = common.parse(build_parser(), argv)
  if args.config:
    config = common.load_config(args.config, args.overrides)
  else:
    # Lazily: `configs` is a folder of the project, not of the installed package.
    from configs import synthetic_tiny  # pylint: disable=g-import-not-at-top
    config = common.load_config(None, args.overrides, base=synthetic_tiny.get_config())
  if config.data.name != "synthetic":
    raise common.UserError(f"run_default.py runs the synthetic config; got data "
                           f"{config.data.name!r} (use tools/train.py for other configs)")
  common.setup_logging()
  workdir = os.path.abspath(args.workdir)

  summary = train.train_and_evaluate(config, workdir)
  if summary["preempted"]:
    print(f"training stopped at step {summary['step']}; rerun to resume")
    return 1

  # The evaluation reads the training config saved in the checkpoint.
  rc = eval_cli.main(["--checkpoint", workdir, "--out", os.path.join(workdir, "eval.json"),
                      "--no-progress"])
  if rc:
    return rc

  example = os.path.join(workdir, "example.png")
  kwargs = config.data.source_kwargs
  # A scene from the synthetic generator that is in neither split (another seed).
  image, _ = synthetic.generate_scene(np.random.default_rng(12345), kwargs.get("height", 64),
                                      kwargs.get("width", 64))
  Image.fromarray(image).save(example)
  rc = predict.main([
      "--checkpoint", workdir, "--image", example, "--labels", ",".join(synthetic.LABEL_NAMES),
      "--out", os.path.join(workdir, "prediction.png")])
  if rc:
    return rc
  print(f"\nTrained, evaluated and predicted in {workdir}:\n"
        f"  checkpoints/  eval.json  metrics.jsonl  example.png -> prediction.png")
  return 0


if __name__ == "__main__":
  common.entry_point(main)
