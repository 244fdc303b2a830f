"""The one model-apply path: images, label embeddings, label mask -> logits.

`forward(apply, mesh)` is the jitted, sharded forward pass of an LSeg graph, built once per (graph,
mesh, dtype) and cached. Evaluation, the sliding-window inference, the whole-image predictor (hence
tools/predict.py and the demo) and the benchmark all run it; variants compose on top of its output
(flip sums, masking, argmax and confusion counts) instead of being programs of their own.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp

from lseg_jax import sharding
from lseg_jax.models import attention


@dataclasses.dataclass(frozen=True)
class LSegApply:
  """apply(state, images [N,h,w,3], text_emb [L,D] or [N,L,D], label_mask [N,L] or
  None) -> logits [N,h,w,L] of an LSeg graph. Hashable by its graphdef, so the
  jitted forward is compiled once per model structure."""
  graphdef: Any

  def __call__(self, state, images, text_emb, label_mask=None):
    return nnx.merge(self.graphdef, state)(images, text_emb, label_mask)

  def embed_pixels(self, state, images):
    return nnx.merge(self.graphdef, state).embed_pixels(images)


def model_apply(model: nnx.Module) -> tuple[LSegApply, Any]:
  """(apply, state): a pure, hashable function of an LSeg model and its state."""
  graphdef, state = nnx.split(model)
  return LSegApply(graphdef), state


@functools.lru_cache(maxsize=None)
def forward(apply: Callable, mesh: jax.sharding.Mesh, dtype: Any = jnp.float32, *,
            flip: bool = False, with_embeddings: bool = False) -> Callable:
  """The jitted forward of `apply` on `mesh`, cached per (apply, mesh, dtype, options).

  Returns fn(state, images [B,H,W,3], text_emb [L,D] or [B,L,D], label_mask [B,L]
  or None) -> logits [B,H,W,L], the batch split over every axis of `mesh` (B a
  multiple of its size). Images are cast to `dtype` first. The state keeps the
  sharding it has (a sharded train state stays where it is).

  Options, each a variant of the same program: `flip` adds the mirrored-back logits of the mirrored
  images, f(x) + flip(f(flip(x))) (the sum stays in the program: summed outside it, the last bit of
  some logits changes); `with_embeddings` (an `LSegApply`) returns (logits, pixel embeddings
  [B,H/2,W/2,D]) from one program, where XLA computes their shared features once.
  """
  dtype = jnp.dtype(dtype)

  def program(state, images, text_emb, label_mask):
    images = images.astype(dtype)
    logits = apply(state, images, text_emb, label_mask)
    if flip:
      logits = logits + apply(state, images[:, :, ::-1], text_emb, label_mask)[:, :, ::-1]
    if with_embeddings:
      return logits, apply.embed_pixels(state, images)
    return logits

  def fn(*args):
    with attention.kernel_mesh(mesh):  # TPU attention kernels run per device
      return program(*args)

  batch = sharding.batch_sharding(mesh)
  return jax.jit(fn, out_shardings=(batch, batch) if with_embeddings else batch)
