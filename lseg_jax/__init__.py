"""lseg-jax: Language-driven Semantic Segmentation (LSeg) in JAX/Flax NNX."""
import os as _os

# TensorFlow (the input pipelines) prints its oneDNN banner and other INFO lines from C++
# at import; warnings and errors still show. A user's own setting wins (the tools then
# leave it as it is: `lseg_jax.cli`).
TF_LOG_LEVEL_FROM_USER = "TF_CPP_MIN_LOG_LEVEL" in _os.environ
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__version__ = "0.1.0"
