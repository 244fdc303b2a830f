r"""Trains LSeg from a config file.

  python tools/train.py --config configs/synthetic_tiny.py --workdir runs/synthetic_tiny
  python tools/train.py --config configs/ade20k.py:variant=vitl16 --workdir ckpts/ade20k_l16 \
      --config.init.timm_vit=vit_large_patch16_384.safetensors --config.init.clip=ViT-B-32.pt

Overrides: `--config.key=value` (the config is locked: keys must exist). Rerunning a
command on the same --workdir resumes from its latest checkpoint.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from lseg_jax import train  # pylint: disable=g-import-not-at-top
  train.quiet_library_logs()
  summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(f"finished at step {summary['step']}"
        + (" (stopped early; rerun to resume)" if summary["preempted"] else "")
        + "".join(f", {k} {v:.4f}" for k, v in summary["eval"].items()))


if __name__ == "__main__":
  app.run(main)
