r"""Trains LSeg from a config file.

  python tools/train.py --config configs/synthetic_tiny.py --workdir runs/synthetic_tiny
  python tools/train.py --config configs/ade20k.py:variant=vitl16 --workdir ckpts/ade20k_l16 \
      --config.init.timm_vit=vit_large_patch16_384.safetensors --config.init.clip=ViT-B-32.pt

Overrides: `--config.KEY=VALUE` for any field of the completed config (see
`lseg_jax.config`; unknown keys are refused). Rerunning a command on the same
--workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import argparse
import sys

from lseg_jax import distributed
from lseg_jax.cli import common


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n", 1)[1])
  common.add_config_arg(p, required=True, help_text="training config file[:arg]")
  p.add_argument("--workdir", required=True, help=(
      "directory for checkpoints and metrics (local, or any path etils.epath reads, "
      "e.g. gs://bucket/run)"))
  common.add_distributed_args(p)
  return p


def main(argv=None) -> int:
  args = common.parse(build_parser(), argv)
  config = common.load_config(args.config, args.overrides)
  common.setup_logging()
  common.start_jax(args)
  from lseg_jax import train  # pylint: disable=g-import-not-at-top
  summary = train.train_and_evaluate(config, args.workdir)
  import jax  # pylint: disable=g-import-not-at-top
  distributed.done()
  if jax.process_index():
    return 0
  print(f"finished at step {summary['step']}"
        + (" (stopped early; rerun to resume)" if summary["preempted"] else "")
        + "".join(f", {k} {v:.4f}" for k, v in summary["eval"].items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
