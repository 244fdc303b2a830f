r"""Interactive segmentation in the browser (see `lseg_jax/cli/demo.py`).

  python tools/demo.py [--checkpoint DIR] [--host 127.0.0.1] [--port 7860]
"""
import sys

from lseg_jax.cli import demo

if __name__ == "__main__":
  sys.exit(demo.main())
