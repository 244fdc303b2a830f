r"""Segment images with a text-defined label set (see `lseg_jax/cli/predict.py`).

  python tools/predict.py --checkpoint CKPT_DIR --image cat.jpg --labels "cat,grass,other" \
      --out cat_seg.png
"""

from lseg_jax.cli import common
from lseg_jax.cli import predict

if __name__ == "__main__":
  common.entry_point(predict.main)
