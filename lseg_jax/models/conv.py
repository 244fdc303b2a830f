"""The decoder's convolutions, lowered the way each backend runs them fastest.

`Conv` is `nnx.Conv` (same parameters, names and initialisation) with its own
`conv_general_dilated`:

- 1x1 kernels are one matrix product over the channel axis. As convolutions, their kernel gradient
  becomes a convolution whose window is the whole feature map (192x192 for `head1` at a 384-px
  crop), which XLA's CPU backend ran at under 10 GFLOP/s: 3.9 s of a 12.5 s ViT-B/32 training step.
- On the CPU, stride-1 KxK kernels (the 3x3 convolutions of the fusion blocks) keep XLA's forward
  and input-gradient convolutions but compute the kernel gradient as one matrix product of the
  width-shifted inputs with the row-shifted output gradients: XLA's own kernel-gradient convolution
  ran ~2.7x slower than the forward one (0.32 s vs 0.12 s CPU for a [2, 96, 96, 256] 3x3 conv;
  0.19 s this way). GPUs and TPUs keep XLA's convolution gradients.
- Everything else is `lax.conv_general_dilated` unchanged.
"""
from __future__ import annotations

import functools

from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp

_NHWC = ("NHWC", "HWIO", "NHWC")


def _explicit_padding(padding, kernel_hw):
  if isinstance(padding, str):
    if padding == "VALID":
      return ((0, 0), (0, 0))
    if padding == "SAME":  # stride 1: total k - 1, the extra one at the end
      return tuple(((k - 1) // 2, k // 2) for k in kernel_hw)
    return None
  return tuple(tuple(int(v) for v in p) for p in padding)


def _plain_2d(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
              feature_group_count) -> bool:
  """A channels-last 2-D convolution with unit strides, no dilation and no groups."""
  if lhs.ndim != 4 or rhs.ndim != 4:
    return False
  ones = (1, 1)
  return (tuple(window_strides) == ones
          and tuple(lhs_dilation or ones) == ones
          and tuple(rhs_dilation or ones) == ones
          and feature_group_count == 1
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))


def _pointwise(lhs, rhs, precision, **kwargs):
  """[B, H, W, Cin] x [1, 1, Cin, Cout] -> [B, H, W, Cout] as one dot_general."""
  kernel = rhs.reshape(rhs.shape[-2], rhs.shape[-1])
  return lax.dot_general(lhs, kernel, (((lhs.ndim - 1,), (0,)), ((), ())),
                         precision=precision, **kwargs)


def _conv(x, k, padding, precision):
  return lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=_NHWC,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_kernel_grad(x, k, padding, precision):
  """Stride-1 conv [B, H, W, Cin] x [kh, kw, Cin, Cout] whose kernel gradient is one
  matrix product (see the module docstring)."""
  return _conv(x, k, padding, precision)


def _fwd(x, k, padding, precision):
  return _conv(x, k, padding, precision), (x, k)


def _bwd(padding, precision, res, g):
  x, k = res
  kh, kw, cin, _ = k.shape
  (pt, pb), (pl, pr) = padding
  # Input gradient: the correlation of g with the rotated, transposed kernel.
  gx = _conv(g, jnp.flip(k, (0, 1)).swapaxes(2, 3),
             ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)), precision)
  # Kernel gradient dK[i, j] = sum over b, h, w of xpad[b, h+i, w+j] (x) g[b, h, w], as
  # one matrix product: the width taps side by side (xpad[.., w+j, :] for each j) against
  # the row taps of g side by side (g shifted down by i rows, zero-padded), contracted
  # over every padded pixel: [kw*Cin, kh*Cout] holds dK[i, j] in block (j, i).
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  wo = g.shape[2]
  cols = jnp.concatenate([xp[:, :, j:j + wo] for j in range(kw)], axis=-1)
  rows = jnp.concatenate(
      [jnp.pad(g, ((0, 0), (i, kh - 1 - i), (0, 0), (0, 0))) for i in range(kh)], axis=-1)
  gk = lax.dot_general(cols.reshape(-1, kw * cin), rows.reshape(-1, rows.shape[-1]),
                       (((0,), (0,)), ((), ())), precision=precision,
                       preferred_element_type=jnp.float32)
  gk = gk.reshape(kw, cin, kh, -1).transpose(2, 0, 1, 3).astype(k.dtype)
  return gx.astype(x.dtype), gk


_conv_matmul_kernel_grad.defvjp(_fwd, _bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """`lax.conv_general_dilated` with the fast paths of the module docstring.

  Same arguments and result as `lax.conv_general_dilated`; the fast paths apply to
  channels-last inputs [B, H, W, Cin] and kernels [kh, kw, Cin, Cout].
  """
  extra = {k: v for k, v in kwargs.items() if v is not None}
  pads = _explicit_padding(padding, rhs.shape[:2])
  if (_plain_2d(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
                feature_group_count)
      and pads is not None and min(min(p) for p in pads) >= 0
      and "out_sharding" not in extra):
    if tuple(rhs.shape[:2]) == (1, 1) and pads == ((0, 0), (0, 0)):
      return _pointwise(lhs, rhs, precision, **extra)
    if jax.default_backend() == "cpu" and not extra:
      return _conv_matmul_kernel_grad(lhs, rhs, pads, precision)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)


def Conv(in_features: int, out_features: int, kernel_size, **kwargs) -> nnx.Conv:  # pylint: disable=invalid-name
  """`nnx.Conv(...)` computed with this module's `conv_general_dilated`."""
  return nnx.Conv(in_features, out_features, kernel_size,
                  conv_general_dilated=conv_general_dilated, **kwargs)
