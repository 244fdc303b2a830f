"""The command-line tools' logic; `tools/*.py` parse nothing themselves and call `main`.

Importing this package (before any tool module loads TensorFlow, which reads the level
once) hides TensorFlow's C++ warnings, such as input threads reporting a failed decode
around the one `error: ...` line, unless the command line has `--verbose`, LSEG_DEBUG
is set, or the user set TF_CPP_MIN_LOG_LEVEL themselves.
"""
import os as _os
import sys as _sys

import lseg_jax as _lseg_jax

if (not _lseg_jax.TF_LOG_LEVEL_FROM_USER and "--verbose" not in _sys.argv[1:]
    and _os.environ.get("LSEG_DEBUG", "") in ("", "0")):
  _os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
