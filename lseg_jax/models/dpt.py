"""DPT decoder of LSeg: readout, reassemble, and BatchNorm fusion blocks.

Names follow lang-seg (`act_postprocess{1..4}`, `scratch.layer{1..4}_rn`,
`scratch.refinenet{1..4}.resConfUnit{1,2}`, `out_conv`) so that the conversion table
to the official checkpoints stays close to the identity.
"""
from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from lseg_jax.models import conv, resize

# Per reassemble level: ("deconv", factor) | ("conv_s2",) | ("none",), as lang-seg.
REASSEMBLE = {
    16: (("deconv", 4), ("deconv", 2), ("none",), ("conv_s2",)),
    32: (("deconv", 8), ("deconv", 4), ("deconv", 2), ("none",)),
}
READOUTS = ("ignore", "add", "project")


class Readout(nnx.Module):
  """Readout token handling: "ignore" | "add" | "project" (concat + Linear + GELU)."""

  def __init__(self, mode: str, width: int, *, dtype: Any, rngs: nnx.Rngs):
    if mode not in READOUTS:
      raise ValueError(f"unknown readout {mode!r}; expected one of {READOUTS}")
    self.mode = mode
    if mode == "project":
      self.project = nnx.Linear(2 * width, width, dtype=dtype, rngs=rngs)

  def __call__(self, tokens):
    """tokens [B, 1 + N, C] (class token first) -> [B, N, C]."""
    patches, cls = tokens[:, 1:], tokens[:, :1]
    if self.mode == "ignore":
      return patches
    if self.mode == "add":
      return patches + cls
    features = jnp.concatenate([patches, jnp.broadcast_to(cls, patches.shape)], axis=-1)
    return jax.nn.gelu(self.project(features), approximate=False)


class ConvTransposeKxK(nnx.Module):
  """ConvTranspose2d with kernel == stride, padding 0: every input pixel writes its own
  k x k output patch, so it is one exact einsum. Kernel [k, k, Cin, Cout]."""

  def __init__(self, cin: int, cout: int, k: int, *, dtype: Any, rngs: nnx.Rngs):
    self.k = k
    self.dtype = dtype
    bound = 1.0 / (cout * k * k) ** 0.5
    self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (k, k, cin, cout),
                                               jnp.float32, -bound, bound))
    self.bias = nnx.Param(jax.random.uniform(rngs.params(), (cout,), jnp.float32, -bound, bound))

  def __call__(self, x):
    """[B, H, W, Cin] -> [B, kH, kW, Cout]."""
    b, h, w, _ = x.shape
    kernel = self.kernel[...].astype(self.dtype)
    y = jnp.einsum("bhwi,acio->bhawco", x.astype(self.dtype), kernel)
    y = y.reshape(b, h * self.k, w * self.k, -1)
    return y + self.bias[...].astype(self.dtype)


class Reassemble(nnx.Module):
  """One `act_postprocessN`: readout, tokens -> grid, 1x1 conv, resample."""

  def __init__(self, readout: str, vit_width: int, width: int, resample: tuple, *,
               dtype: Any, rngs: nnx.Rngs):
    self.readout = Readout(readout, vit_width, dtype=dtype, rngs=rngs)
    self.conv = conv.Conv(vit_width, width, (1, 1), dtype=dtype, rngs=rngs)
    if resample[0] == "deconv":
      self.resample = ConvTransposeKxK(width, width, resample[1], dtype=dtype, rngs=rngs)
    elif resample[0] == "conv_s2":
      self.resample = conv.Conv(width, width, (3, 3), strides=2, padding=((1, 1), (1, 1)),
                                dtype=dtype, rngs=rngs)
    else:
      self.resample = None

  def __call__(self, tokens, grid: tuple[int, int]):
    """tokens [B, 1 + gh*gw, C] -> [B, h', w', width]."""
    x = self.readout(tokens)
    x = x.reshape(x.shape[0], grid[0], grid[1], x.shape[-1])
    x = self.conv(x)
    return x if self.resample is None else self.resample(x)


class BatchNorm(nnx.Module):
  """BatchNorm2d with PyTorch's semantics: normalise with the biased batch variance,
  track the *unbiased* one with momentum 0.1, eps 1e-5. Channels last."""

  def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5,
               dtype: Any = jnp.float32):
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.use_running_average = False  # set by `model.train()` / `model.eval()`
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    """x [..., C]; statistics over all other axes (the global batch when sharded)."""
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      xf = x.astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      n = xf.size // xf.shape[-1]
      m = self.momentum
      self.mean[...] = (1 - m) * self.mean[...] + m * mean
      self.var[...] = (1 - m) * self.var[...] + m * var * (n / max(n - 1, 1))
      self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
    inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
    y = (x.astype(jnp.float32) - mean) * inv + self.bias[...]
    return y.astype(self.dtype)


class ResidualConvUnit(nnx.Module):
  """relu -> conv3x3 -> BN -> relu -> conv3x3 -> BN, plus the input."""

  def __init__(self, features: int, *, dtype: Any, rngs: nnx.Rngs):
    conv3x3 = lambda: conv.Conv(features, features, (3, 3), padding=((1, 1), (1, 1)),
                                use_bias=False, dtype=dtype, rngs=rngs)
    self.conv1 = conv3x3()
    self.bn1 = BatchNorm(features, dtype=dtype)
    self.conv2 = conv3x3()
    self.bn2 = BatchNorm(features, dtype=dtype)

  def __call__(self, x):
    out = self.bn1(self.conv1(jax.nn.relu(x)))
    out = self.bn2(self.conv2(jax.nn.relu(out)))
    return out + x


class FusionBlock(nnx.Module):
  """`FeatureFusionBlock_custom` with BN: (x + rcu1(skip)) -> rcu2 -> x2 -> 1x1 conv."""

  def __init__(self, features: int, *, dtype: Any, rngs: nnx.Rngs):
    self.resConfUnit1 = ResidualConvUnit(features, dtype=dtype, rngs=rngs)
    self.resConfUnit2 = ResidualConvUnit(features, dtype=dtype, rngs=rngs)
    self.out_conv = conv.Conv(features, features, (1, 1), dtype=dtype, rngs=rngs)

  def __call__(self, x, skip=None, *, upsample: bool = True):
    """x [B, h, w, F], skip [B, h, w, F] or None -> [B, 2h, 2w, F] ([B, h, w, F] with
    upsample=False: the caller upsamples)."""
    if skip is not None:
      x = x + self.resConfUnit1(skip)
    x = self.resConfUnit2(x)
    # lang-seg upsamples, then applies out_conv. A 1x1 conv commutes with bilinear
    # upsampling (both linear; each output's interpolation weights sum to 1, so the
    # bias passes through), so it runs before, at a quarter of the pixels.
    x = self.out_conv(x)
    return resize.upsample2x_align_corners(x) if upsample else x
