"""Self-contained PyTorch LSeg (no dependency on the official lang-seg repository)."""
from lseg_jax.torch_lseg.lseg import LSegTorch, TorchLSegConfig, VARIANTS

__all__ = ["LSegTorch", "TorchLSegConfig", "VARIANTS"]
