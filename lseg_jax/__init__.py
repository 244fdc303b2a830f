"""lseg-jax: Language-driven Semantic Segmentation (LSeg) in JAX/Flax NNX."""

__version__ = "0.1.0"
