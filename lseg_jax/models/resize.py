"""Exact bilinear resizing with PyTorch's `F.interpolate` semantics.

`jax.image.resize` matches neither `align_corners=True` nor PyTorch's
`align_corners=False` source-index clamping, so LSeg parity needs its own op.
Each axis is a gather of two neighbours and a weighted sum, as PyTorch does
(no antialiasing).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def axis_taps(in_size: int, out_size: int, align_corners: bool):
  """Source indices i0, i1 and weights w0, w1 for one axis, float32 like PyTorch."""
  dst = np.arange(out_size, dtype=np.float32)
  if align_corners:
    scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
    src = dst * scale
  else:
    scale = np.float32(in_size / out_size)
    src = np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = (src - i0.astype(np.float32)).astype(np.float32)
  w0 = (np.float32(1) - w1).astype(np.float32)
  return i0, i1, w0, w1


def _resize_axis(x, axis: int, out_size: int, align_corners: bool):
  in_size = x.shape[axis]
  if in_size == out_size:  # identity for either convention
    return x
  i0, i1, w0, w1 = axis_taps(in_size, out_size, align_corners)
  shape = [1] * x.ndim
  shape[axis] = out_size
  w0 = jnp.asarray(w0, x.dtype).reshape(shape)
  w1 = jnp.asarray(w1, x.dtype).reshape(shape)
  return jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1


def resize_bilinear(x, size: tuple[int, int], align_corners: bool):
  """Bilinear resize of `x` [..., H, W, C] to `size` = (h, w), as torch does.

  Matches `F.interpolate(x_nchw, size=size, mode="bilinear",
  align_corners=align_corners)` (no antialias). PyTorch interpolates the
  width first, then the height; so do we.
  """
  if x.ndim < 3:
    raise ValueError(f"expected an array [..., H, W, C], got shape {x.shape}")
  h, w = size
  x = _resize_axis(x, x.ndim - 2, w, align_corners)
  return _resize_axis(x, x.ndim - 3, h, align_corners)


def upsample2x_align_corners(x):
  """[..., H, W, C] -> [..., 2H, 2W, C], bilinear with align_corners=True."""
  return resize_bilinear(x, (2 * x.shape[-3], 2 * x.shape[-2]), align_corners=True)
