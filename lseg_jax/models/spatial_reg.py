"""LSeg's label-equivariant spatial regularisation blocks (paper Sec. 3.3).

One 3x3 single-channel conv is shared by every label channel (and by every repeat of the block, as
in lang-seg where `head_block` is one module applied `block_depth` times). It is written as a vmap
over the label axis, so permuting the labels permutes the output and nothing else. `BottleneckBlock`
(arch_option 1) adds the max over the candidate labels before the activation; `DepthwiseBlock`
(arch_option 2) does not.
"""
from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "lrelu": lambda x: jax.nn.leaky_relu(x, 0.01),  # torch nn.LeakyReLU default slope
    "tanh": jnp.tanh,
}
ARCH_OPTIONS = {0: None, 1: "bottleneck", 2: "depthwise"}


class SpatialRegularization(nnx.Module):
  """`arch_option` 1 (bottleneck) or 2 (depthwise), applied `block_depth` times."""

  def __init__(self, arch_option: int, block_depth: int, activation: str, *, rngs: nnx.Rngs):
    if arch_option not in (1, 2):
      raise ValueError(f"arch_option must be 1 (bottleneck) or 2 (depthwise), got {arch_option!r}")
    if activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    if block_depth < 0:
      raise ValueError(f"block_depth must be >= 0, got {block_depth}")
    self.bottleneck = arch_option == 1
    # lang-seg applies depth-1 activated blocks, then one without activation; so
    # depth 0 behaves as depth 1.
    self.block_depth = block_depth
    self.activation = activation
    bound = 1.0 / 3.0  # torch Conv2d(1, 1, 3) default init bound = 1/sqrt(9)
    self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (3, 3), jnp.float32, -bound, bound))
    self.bias = nnx.Param(jax.random.uniform(rngs.params(), (), jnp.float32, -bound, bound))

  def _conv(self, x):
    """x [B, H, W] -> [B, H, W]: 3x3 conv, zero padding 1."""
    y = jax.lax.conv_general_dilated(
        x[..., None], self.kernel[...][:, :, None, None].astype(x.dtype), (1, 1),
        ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST)
    return y[..., 0] + self.bias[...].astype(x.dtype)

  def _block(self, x, valid, act: bool):
    y = jax.vmap(self._conv, in_axes=-1, out_axes=-1)(x)
    if self.bottleneck:
      y = y + jnp.max(jnp.where(valid, x, -jnp.inf), axis=-1, keepdims=True)
    return ACTIVATIONS[self.activation](y) if act else y

  def __call__(self, logits, label_mask=None):
    """logits [B, H, W, L] -> [B, H, W, L].

    label_mask [B, L] (bool) excludes labels from the bottleneck max; their
    outputs are unspecified (the caller sets them to -inf).
    """
    b, _, _, num_labels = logits.shape
    valid = (jnp.ones((b, 1, 1, num_labels), bool) if label_mask is None
             else label_mask[:, None, None, :])
    x = jnp.where(valid, logits, 0.0)
    for _ in range(self.block_depth - 1):
      x = self._block(x, valid, act=True)
    return self._block(x, valid, act=False)
