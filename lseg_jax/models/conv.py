"""Convolutions of the decoder written as the matrix products they are.

`nnx.Conv` lowers every convolution to `lax.conv_general_dilated`. For a 1x1
kernel that is a matrix product over the channel axis, but its transpose for the
kernel gradient becomes a convolution whose window is the whole feature map
(e.g. 192x192 for `head1` at a 384-px crop), which XLA's CPU backend runs more
than ten times slower than the equivalent matrix product. `pointwise_conv` is a
drop-in `conv_general_dilated` for `nnx.Conv(..., conv_general_dilated=...)` that
turns such convolutions into one `dot_general`, so the parameters, their names and
their initialisation stay those of `nnx.Conv`.
"""
from __future__ import annotations

from flax import nnx
from jax import lax


def _is_pointwise(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                  dimension_numbers, feature_group_count) -> bool:
  if lhs.ndim != 4 or rhs.ndim != 4:
    return False
  channels_last = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  ones = (1, 1)
  zero_padding = padding == "VALID" or padding == "SAME" or (
      not isinstance(padding, str) and all(tuple(p) == (0, 0) for p in padding))
  return (tuple(rhs.shape[:2]) == ones
          and tuple(window_strides) == ones
          and zero_padding
          and tuple(lhs_dilation or ones) == ones
          and tuple(rhs_dilation or ones) == ones
          and feature_group_count == 1
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == channels_last)


def pointwise_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """`lax.conv_general_dilated` that computes 1x1 convolutions as a matrix product.

  For a channels-last input [B, H, W, Cin] and kernel [1, 1, Cin, Cout] with unit
  strides and no padding or dilation it returns `lhs @ rhs.reshape(Cin, Cout)`
  ([B, H, W, Cout]); any other convolution goes to `lax.conv_general_dilated`
  unchanged.
  """
  if not _is_pointwise(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                       dimension_numbers, feature_group_count):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision, **kwargs)
  kwargs.pop("out_sharding", None)
  kernel = rhs.reshape(rhs.shape[-2], rhs.shape[-1])
  return lax.dot_general(lhs, kernel, (((lhs.ndim - 1,), (0,)), ((), ())),
                         precision=precision, **kwargs)


def Conv1x1(in_features: int, out_features: int, **kwargs) -> nnx.Conv:  # pylint: disable=invalid-name
  """`nnx.Conv(in_features, out_features, (1, 1), ...)` run as a matrix product."""
  return nnx.Conv(in_features, out_features, (1, 1), conv_general_dilated=pointwise_conv,
                  **kwargs)


__all__ = ["Conv1x1", "pointwise_conv"]
