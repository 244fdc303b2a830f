"""Exact bilinear resizing with PyTorch's `F.interpolate` semantics.

`jax.image.resize` matches neither `align_corners=True` nor PyTorch's `align_corners=False`
source-index clamping, so LSeg parity needs its own op. Along each axis, output o interpolates x[i0]
and x[i1] with PyTorch's float32 taps and weights (`axis_taps`; no antialiasing).

No gathers: their gradients are scatter-adds, slow on every backend. Upsampling by an integer factor
r (every resize inside LSeg: the x2 steps of the decoder and the logits) is a stencil: output
r*i + p reads the input at i + d for a shift d that depends on the phase p only (clamped at the
borders), so each phase is shifted slices and a weight vector, and the phases interleave by a
reshape; the gradient is slices and adds. Any other size change (the position-embedding grid) is a
product with a small [out, in] interpolation matrix per axis. Both agree with PyTorch to float32
rounding (< 1e-6 relative, values and gradients).

Programs compiled for TPUs (`attention.target_platform()`) upsample by the matrix product too (each
phase by its rows of the matrix): there XLA turns the stencil's shifted slices, edge copies and
interleaving, and their gradients, into layout copies that move 3 to 6 times the bytes of the
product's input and output (docs/scaling.md), while the product costs the MXU ~1% of the train
step's FLOPs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lseg_jax.models import attention


def axis_taps(in_size: int, out_size: int, align_corners: bool):
  """Source indices i0, i1 and weights w0, w1 for one axis, float32 like PyTorch.

  Returns four arrays [out_size]: int32 i0, i1 and float32 w0, w1, with output o
  equal to x[i0[o]] * w0[o] + x[i1[o]] * w1[o].
  """
  dst = np.arange(out_size, dtype=np.float32)
  if align_corners:
    scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
    src = dst * scale
  else:
    # PyTorch's kernels compute (dst + 0.5) * scale - 0.5 as one fused multiply-add:
    # the exact float64 value rounded once to float32 gives the same taps.
    scale = np.float32(in_size / out_size)
    src = ((dst + np.float32(0.5)).astype(np.float64) * np.float64(scale) - 0.5)
    src = np.maximum(src.astype(np.float32), np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = (src - i0.astype(np.float32)).astype(np.float32)
  w0 = (np.float32(1) - w1).astype(np.float32)
  return i0, i1, w0, w1


@functools.lru_cache(maxsize=None)
def interpolation_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
  """The [out_size, in_size] float32 matrix M of one axis: y = M @ x."""
  i0, i1, w0, w1 = axis_taps(in_size, out_size, align_corners)
  m = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  m[rows, i0] += w0
  m[rows, i1] += w1
  m.setflags(write=False)
  return m


@functools.lru_cache(maxsize=None)
def _stencil(in_size: int, out_size: int, align_corners: bool):
  """Shifts and weights of an integer-factor upsampling, or None if it is not one.

  Returns (d0, d1, w1): d0, d1 tuples of r shifts, one per phase p, and float32
  weights w1 [r, in_size] such that output r*i + p interpolates x0 = x[clip(i + d0[p])]
  and x1 = x[clip(i + d1[p])] as x0 + (x1 - x0) * w1[p, i].
  """
  if out_size <= in_size or out_size % in_size:
    return None
  r = out_size // in_size
  taps = [t.reshape(in_size, r).T for t in axis_taps(in_size, out_size, align_corners)]
  i0, i1, _, w1 = taps  # each [r, in_size]; x0's weight 1 - w1 > 0: x0 is always used
  base = np.arange(in_size)
  shifts = []
  for idx, used_taps in ((i0, np.ones_like(w1, bool)), (i1, w1 != 0)):
    per_phase = []
    for p in range(r):
      used = used_taps[p]  # a tap of weight zero may read anything
      for d in sorted(set((idx[p] - base).tolist())):
        if np.array_equal(np.clip(base + d, 0, in_size - 1)[used], idx[p][used]):
          per_phase.append(d)
          break
      else:
        return None
    shifts.append(tuple(per_phase))
  return shifts[0], shifts[1], w1


def _shifted(x, axis: int, shifts):
  """{d: x[clip(i + d)] along `axis`} for every d in `shifts` (edge replication)."""
  n = x.shape[axis]
  lo, hi = max(0, -min(shifts)), max(0, max(shifts))
  edge = lambda i: jax.lax.slice_in_dim(x, i, i + 1, axis=axis)
  xp = jnp.concatenate([edge(0)] * lo + [x] + [edge(n - 1)] * hi, axis=axis)
  return {d: jax.lax.slice_in_dim(xp, lo + d, lo + d + n, axis=axis) for d in set(shifts)}


def _by_matmul() -> bool:
  return attention.target_platform() == "tpu"


def _phases(x, axis: int, r: int, align_corners: bool):
  """The r phases of an r-times upsampling along `axis`: phase p [..., n, ...] holds
  outputs r*i + p."""
  n = x.shape[axis]
  if _by_matmul():  # phase p: the rows r*i + p of the interpolation matrix
    m = interpolation_matrix(n, r * n, align_corners)
    return [_matmul_axis(x, axis, m[p::r]) for p in range(r)]
  d0, d1, w1 = _stencil(n, r * n, align_corners)
  shape = [1] * x.ndim
  shape[axis] = n
  taps = _shifted(x, axis, d0 + d1)
  # x0 + (x1 - x0) * w1, not x0 * w0 + x1 * w1: with a single product, the fused
  # multiply-add the compiler may form does not depend on how it orders the operands
  # (e.g. after folding a reversal into this loop), so every compiled copy of a
  # resize gives the same bits; flip averaging relies on that.
  return [taps[d0[p]] + (taps[d1[p]] - taps[d0[p]]) * jnp.asarray(w1[p], x.dtype).reshape(shape)
          for p in range(r)]


def _interleave(phases, axis: int):
  """Phases [..., n, ...] -> [..., r n, ...] with output r*i + p = phases[p][i]."""
  y = jnp.stack(phases, axis=axis + 1)  # [..., n, r, ...]
  return y.reshape(*y.shape[:axis], -1, *y.shape[axis + 2:])


def _matmul_axis(x, axis: int, m: np.ndarray):
  """y = m @ x along `axis` for an [out, in] matrix `m`."""
  y = jax.lax.dot_general(jnp.asarray(m, x.dtype), x, (((1,), (axis,)), ((), ())),
                          precision=jax.lax.Precision.HIGHEST)  # [out, rest...]
  return jnp.moveaxis(y, 0, axis)


def _resize_axis(x, axis: int, out_size: int, align_corners: bool):
  in_size = x.shape[axis]
  if in_size == out_size:  # identity for either convention
    return x
  if _stencil(in_size, out_size, align_corners) is not None and not _by_matmul():
    return _interleave(_phases(x, axis, out_size // in_size, align_corners), axis)
  return _matmul_axis(x, axis, interpolation_matrix(in_size, out_size, align_corners))


def resize_bilinear(x, size: tuple[int, int], align_corners: bool):
  """Bilinear resize of `x` [..., H, W, C] to `size` = (h, w), as torch does.

  Matches `F.interpolate(x_nchw, size=size, mode="bilinear", align_corners=align_corners)` (no
  antialias). PyTorch interpolates the width first, then the height; so do we.
  """
  if x.ndim < 3:
    raise ValueError(f"expected an array [..., H, W, C], got shape {x.shape}")
  h, w = size
  x = _resize_axis(x, x.ndim - 2, w, align_corners)
  return _resize_axis(x, x.ndim - 3, h, align_corners)


def upsample2x_align_corners(x):
  """[..., H, W, C] -> [..., 2H, 2W, C], bilinear with align_corners=True."""
  return resize_bilinear(x, (2 * x.shape[-3], 2 * x.shape[-2]), align_corners=True)


def upsample2x_phases(x) -> dict[tuple[int, int], jax.Array]:
  """The four phases of `upsample2x_align_corners(x)` without interleaving them:
  {(p, q): y[..., p::2, q::2, :]}, each [..., H, W, C], by the same arithmetic (the
  same bits as slicing the interleaved result). A per-pixel function of the upsampled
  array (the training loss) can run on the phases: on TPUs, interleaving costs a layout
  copy of the whole array and another of its gradient."""
  cols = _phases(x, x.ndim - 2, 2, True)  # width first, as resize_bilinear
  return {(p, q): row for q, col in enumerate(cols)
          for p, row in enumerate(_phases(col, x.ndim - 3, 2, True))}


def _tap(x, axis: int, d: int):
  return _shifted(x, axis, (d,))[d]


def upsampled_squared_norms(x):
  """sum(square(upsample2x_align_corners(x)), -1) [..., 2H, 2W] without making the
  upsampled [..., 2H, 2W, C] array: float32 rounding apart, the same values.

  Along the height, output 2i + p is y0 + (y1 - y0) h of two rows y0, y1 of the
  width-upsampled map y (one of its two phases), so its squared norm is
  (1 - h)^2 |y0|^2 + 2 (1 - h) h <y0, y1> + h^2 |y1|^2: the per-pixel norms and
  neighbour inner products of y, reductions that fuse with the arithmetic making y.
  """
  ah, h = x.ndim - 3, x.shape[-3]
  hd0, hd1, hw = _stencil(h, 2 * h, True)
  cols = []
  for y in _phases(x, x.ndim - 2, 2, True):
    norms = jnp.sum(jnp.square(y), axis=-1)  # [..., H, W]
    rows = []
    for p in range(2):
      w1 = jnp.asarray(hw[p], x.dtype).reshape(h, 1)
      dot = jnp.sum(_tap(y, ah, hd0[p]) * _tap(y, ah, hd1[p]), axis=-1)
      rows.append(jnp.square(1 - w1) * _tap(norms, ah, hd0[p])
                  + 2 * (1 - w1) * w1 * dot + jnp.square(w1) * _tap(norms, ah, hd1[p]))
    cols.append(_interleave(rows, ah))
  return _interleave(cols, x.ndim - 2)
