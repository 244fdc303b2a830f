"""ViT image backbone with DPT hooks, numerically equal to timm's VisionTransformer.

Parameter names mirror timm (`patch_embed.proj`, `blocks.N.attn.qkv`, ...), so the
conversion table is close to the identity. As in lang-seg's `forward_flex`, the
position embeddings of the 384-px pretraining grid are resized bilinearly
(PyTorch `align_corners=False`, no antialias) to the input grid on every call.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from lseg_jax.models import attention, resize

# `reassemble` names the DPT reassemble style lang-seg uses for the patch size:
# "16": ConvTranspose x4, ConvTranspose x2, none, strided 3x3 conv;
# "32": ConvTranspose x8, x4, x2, none.
VIT_VARIANTS = {
    "L/16": dict(width=1024, depth=24, heads=16, mlp_dim=4096, patch=16,
                 hooks=(5, 11, 17, 23), num_classes=1000),
    "B/32": dict(width=768, depth=12, heads=12, mlp_dim=3072, patch=32,
                 hooks=(2, 5, 8, 11), num_classes=1000),
    # Tiny variants with the same structure, for fast tests.
    "tiny/16": dict(width=32, depth=4, heads=2, mlp_dim=64, patch=16,
                    hooks=(0, 1, 2, 3), num_classes=1000),
    "tiny/32": dict(width=32, depth=4, heads=2, mlp_dim=64, patch=32,
                    hooks=(0, 1, 2, 3), num_classes=1000),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  width: int
  depth: int
  heads: int
  mlp_dim: int
  patch: int
  hooks: tuple[int, ...]
  num_classes: int = 1000  # timm's unused classifier head; kept for checkpoint interop
  pretrain_size: int = 384  # the position embeddings' grid is pretrain_size // patch
  dtype: Any = jnp.float32
  # "auto" | "xla" | "cudnn": see `lseg_jax.models.attention`.
  attention: str = "auto"
  # Rematerialisation of each block in the backward pass: see `REMAT_POLICIES`.
  remat: str = "none"

  @property
  def pretrain_grid(self) -> int:
    return self.pretrain_size // self.patch


# Per-block rematerialisation (`jax.checkpoint`): what the backward pass keeps from
# the forward pass of a block. "none": everything XLA keeps; "dots": the outputs of
# the dense layers (qkv, proj, fc1, fc2), recomputing the attention scores and the
# elementwise ops; "full": only the block's input, recomputing the whole block.
# On the CPU, "none" still runs each block under jax.checkpoint, saving everything
# (nothing is recomputed): without these block boundaries XLA fused the LayerNorm
# gradients of many blocks into a few very large loops that recompute shared terms,
# and the ViT-B/32 training step was 5% slower (2.47 s vs 2.35 s).
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def decode_variant(variant: str, **overrides) -> ViTConfig:
  """"L/16" | "B/32" | "tiny/16" | "tiny/32" -> ViTConfig."""
  if variant not in VIT_VARIANTS:
    raise ValueError(f"unknown ViT variant {variant!r}; expected one of {sorted(VIT_VARIANTS)}")
  return ViTConfig(**{**VIT_VARIANTS[variant], **overrides})


def _layer_norm(dim, cfg, rngs):
  # use_fast_variance=False: E[(x-mean)^2] like torch, not E[x^2]-mean^2.
  return nnx.LayerNorm(dim, epsilon=1e-6, use_fast_variance=False, dtype=cfg.dtype, rngs=rngs)


class PatchEmbed(nnx.Module):

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.proj = nnx.Conv(3, cfg.width, (cfg.patch, cfg.patch), strides=cfg.patch,
                         padding="VALID", dtype=cfg.dtype, rngs=rngs)

  def __call__(self, x):
    """[B, H, W, 3] -> [B, H/p, W/p, C]."""
    return self.proj(x)


class Attention(nnx.Module):

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    attention.check_implementation(cfg.attention)
    self.heads = cfg.heads
    self.implementation = cfg.attention
    self.qkv = nnx.Linear(cfg.width, 3 * cfg.width, dtype=cfg.dtype, rngs=rngs)
    self.proj = nnx.Linear(cfg.width, cfg.width, dtype=cfg.dtype, rngs=rngs)

  def __call__(self, x):
    """[B, N, C] -> [B, N, C]."""
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = attention.dot_product_attention(q, k, v, self.implementation)
    return self.proj(out.reshape(b, n, c))


class Mlp(nnx.Module):

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(cfg.width, cfg.mlp_dim, dtype=cfg.dtype, rngs=rngs)
    self.fc2 = nnx.Linear(cfg.mlp_dim, cfg.width, dtype=cfg.dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.norm1 = _layer_norm(cfg.width, cfg, rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.norm2 = _layer_norm(cfg.width, cfg, rngs)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


def _rematerialised(block: Block, x, policy):
  """block(x) under `jax.checkpoint(policy=policy)`. A block holds parameters only
  (nothing it writes back), so it goes in as a pure state and is rebuilt inside."""
  graphdef, state = nnx.split(block)
  return jax.checkpoint(lambda state, x: nnx.merge(graphdef, state)(x), policy=policy)(state, x)


class VisionTransformer(nnx.Module):
  """timm-layout ViT returning the token sequences after the hooked blocks."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    if cfg.remat not in REMAT_POLICIES:
      raise ValueError(f"unknown remat {cfg.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
    self.cfg = cfg
    init = nnx.initializers.normal(0.02)
    g = cfg.pretrain_grid
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, cfg.width), jnp.float32))
    self.pos_embed = nnx.Param(init(rngs.params(), (1, 1 + g * g, cfg.width), jnp.float32))
    self.patch_embed = PatchEmbed(cfg, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
    # Unused by LSeg (the hooks take un-normalised block outputs) but part of
    # the timm and lang-seg checkpoints, so kept for lossless import/export.
    self.norm = _layer_norm(cfg.width, cfg, rngs)
    self.head = nnx.Linear(cfg.width, cfg.num_classes, rngs=rngs) if cfg.num_classes else None

  def grid_size(self, height: int, width: int) -> tuple[int, int]:
    p = self.cfg.patch
    if height % p or width % p:
      raise ValueError(f"image size {height}x{width} is not a multiple of the ViT patch size {p}; "
                       f"resize or pad the image to a multiple of {p} pixels")
    return height // p, width // p

  def resized_pos_embed(self, gh: int, gw: int):
    """Position embeddings for a gh x gw grid: [1, 1 + gh*gw, C]."""
    g = self.cfg.pretrain_grid
    pos = self.pos_embed[...]
    grid = pos[0, 1:].reshape(g, g, -1)
    grid = resize.resize_bilinear(grid, (gh, gw), align_corners=False)
    return jnp.concatenate([pos[:, :1], grid.reshape(1, gh * gw, -1)], axis=1)

  def __call__(self, images):
    """images [B, H, W, 3] -> list of hooked block outputs, each [B, 1 + N, C].

    N = (H/p)(W/p) patch tokens after the class token, in row-major grid order.
    """
    b, h, w, _ = images.shape
    gh, gw = self.grid_size(h, w)
    x = self.patch_embed(images.astype(self.cfg.dtype)).reshape(b, gh * gw, -1)
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, x.shape[-1])).astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1) + self.resized_pos_embed(gh, gw).astype(x.dtype)
    policy = REMAT_POLICIES[self.cfg.remat]
    if policy is None and jax.default_backend() == "cpu":
      policy = jax.checkpoint_policies.everything_saveable  # see REMAT_POLICIES
    hooked = []
    for i, block in enumerate(self.blocks):
      if i > max(self.cfg.hooks):
        break
      x = block(x) if policy is None else _rematerialised(block, x, policy)
      if i in self.cfg.hooks:
        hooked.append(x)
    return hooked
