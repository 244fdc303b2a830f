"""ResNet image backbone (Bottleneck blocks), numerically equal to torchvision's `ResNet`.

Parameter names mirror torchvision (`conv1`, `bn1`, `layer1..4.N.{conv1..3, bn1..3}`,
`downsample.{0,1}`), so the conversion table to its state dicts is the identity up to
layouts. torchvision's v1.5 block is used: the stride of a stage sits on the 3x3 conv.
BatchNorm has PyTorch's semantics (`dpt.BatchNorm`). The classifier (`fc`) is not
part of the model: LSeg takes the four stage outputs.

    images [B, H, W, 3] -> conv1 7x7/2 -> bn1 -> relu -> maxpool 3x3/2
      -> layer1 [B, H/4, W/4, 256] -> layer2 [B, H/8, W/8, 512]
      -> layer3 [B, H/16, W/16, 1024] -> layer4 [B, H/32, W/32, 2048]
"""
from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from lseg_jax.models import attention
from lseg_jax.models import dpt

# Blocks per stage; "tiny" keeps torchvision's widths with one block per stage (tests).
RESNET_VARIANTS = {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
    "resnet_tiny": (1, 1, 1, 1),
}
EXPANSION = 4  # Bottleneck output width = 4 x its inner width
STAGE_PLANES = (64, 128, 256, 512)  # inner widths of the stages
STAGE_WIDTHS = tuple(EXPANSION * p for p in STAGE_PLANES)  # (256, 512, 1024, 2048)
OUTPUT_STRIDE = 32  # of layer4

# torchvision's init: kaiming_normal_(mode="fan_out", nonlinearity="relu").
_KAIMING_FAN_OUT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  layers: tuple[int, int, int, int]
  dtype: Any = jnp.float32  # compute dtype; parameters and BatchNorm statistics are float32


def decode_variant(variant: str, **overrides) -> ResNetConfig:
  """"resnet50" | "resnet101" | "resnet152" | "resnet_tiny" -> ResNetConfig."""
  if variant not in RESNET_VARIANTS:
    raise ValueError(f"unknown ResNet variant {variant!r}; expected one of "
                     f"{sorted(RESNET_VARIANTS)}")
  return ResNetConfig(layers=RESNET_VARIANTS[variant], **overrides)


def _conv(cin: int, cout: int, k: int, stride: int, *, dtype, rngs) -> nnx.Conv:
  pad = (k - 1) // 2
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding=((pad, pad), (pad, pad)),
                  use_bias=False, kernel_init=_KAIMING_FAN_OUT, dtype=dtype, rngs=rngs)


def max_pool_3x3_s2(x):
  """nn.MaxPool2d(3, stride=2, padding=1): padding never wins the max. [B, H, W, C].

  The init value is the Python scalar -inf, which lets JAX recognise the max monoid
  (and differentiate it); an array init value would not.
  """
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (stride) -> 1x1 convs with BatchNorm, plus the (projected) input."""

  def __init__(self, cin: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
    cout = EXPANSION * planes
    self.conv1 = _conv(cin, planes, 1, 1, dtype=dtype, rngs=rngs)
    self.bn1 = dpt.BatchNorm(planes, dtype=dtype)
    self.conv2 = _conv(planes, planes, 3, stride, dtype=dtype, rngs=rngs)
    self.bn2 = dpt.BatchNorm(planes, dtype=dtype)
    self.conv3 = _conv(planes, cout, 1, 1, dtype=dtype, rngs=rngs)
    self.bn3 = dpt.BatchNorm(cout, dtype=dtype)
    self.downsample = (nnx.List([_conv(cin, cout, 1, stride, dtype=dtype, rngs=rngs),
                                 dpt.BatchNorm(cout, dtype=dtype)])
                       if stride != 1 or cin != cout else None)

  def __call__(self, x):
    """[B, H, W, cin] -> [B, H/stride, W/stride, 4 * planes]."""
    out = jax.nn.relu(self.bn1(self.conv1(x)))
    if self.conv2.strides != 1 and attention.target_platform() == "tpu":
      # libtpu's compiler (jax[tpu] 0.10.2) crashes on v6e when the gradient of a
      # strided conv fuses with BatchNorm's backward (a stack overflow, the process gone):
      # the barrier keeps them apart. Values are the same.
      out = jax.lax.optimization_barrier(out)
    out = jax.nn.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    shortcut = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
    return jax.nn.relu(out + shortcut)


class ResNet(nnx.Module):
  """torchvision-layout ResNet returning the outputs of its four stages."""

  def __init__(self, cfg: ResNetConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = cfg.dtype
    self.conv1 = _conv(3, 64, 7, 2, dtype=dtype, rngs=rngs)
    self.bn1 = dpt.BatchNorm(64, dtype=dtype)
    cin = 64
    for i, (planes, blocks) in enumerate(zip(STAGE_PLANES, cfg.layers)):
      stage = []
      for j in range(blocks):
        stride = 2 if i > 0 and j == 0 else 1
        stage.append(Bottleneck(cin, planes, stride, dtype=dtype, rngs=rngs))
        cin = EXPANSION * planes
      setattr(self, f"layer{i + 1}", nnx.List(stage))

  def stem(self, images):
    """images [B, H, W, 3] -> [B, H/4, W/4, 64] (conv1, bn1, relu, maxpool)."""
    x = self.conv1(images.astype(self.cfg.dtype))
    return max_pool_3x3_s2(jax.nn.relu(self.bn1(x)))

  def __call__(self, images):
    """images [B, H, W, 3] -> the four stage outputs [B, H/4, W/4, 256],
    [B, H/8, W/8, 512], [B, H/16, W/16, 1024], [B, H/32, W/32, 2048].

    Any size works (sides are rounded as torchvision rounds them); LSeg's decoder needs
    multiples of `OUTPUT_STRIDE`, which it checks.
    """
    x = self.stem(images)
    outputs = []
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x)
      outputs.append(x)
    return outputs
