"""CLIP text tower (OpenAI layout) as a Flax NNX module.

Attribute names mirror OpenAI CLIP's state dict (`token_embedding`, `positional_embedding`,
`transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`, `text_projection`),
so the conversion table (`lseg_jax.convert.clip_openai`) is the identity up to Linear transposes.
The attention keeps q, k and v in one fused `in_proj`, as `nn.MultiheadAttention` stores them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

TEXT_VARIANTS = {
    # The text towers of OpenAI CLIP checkpoints used by LSeg (B/16 and L/14 for reuse).
    "B/32": dict(width=512, layers=12, heads=8, embed_dim=512),
    "B/16": dict(width=512, layers=12, heads=8, embed_dim=512),
    "L/14": dict(width=768, layers=12, heads=12, embed_dim=768),
    "RN50x16": dict(width=768, layers=12, heads=12, embed_dim=768),
    # Same structure, tiny dimensions: for tests.
    "tiny": dict(width=32, layers=2, heads=2, embed_dim=16),
}


@dataclasses.dataclass(frozen=True)
class TextConfig:
  width: int
  layers: int
  heads: int
  embed_dim: int  # output width, after `text_projection`
  vocab_size: int = 49408
  context_length: int = 77
  # Compute dtype; parameters are float32 and the output is float32 either way.
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.width % self.heads:
      raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


def decode_variant(variant: str, **overrides) -> TextConfig:
  """"B/32" | "B/16" | "L/14" | "RN50x16" | "tiny" -> TextConfig."""
  if variant not in TEXT_VARIANTS:
    raise ValueError(
        f"unknown CLIP text variant {variant!r}; expected one of {sorted(TEXT_VARIANTS)}")
  return TextConfig(**{**TEXT_VARIANTS[variant], **overrides})


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def _precision(cfg: TextConfig):
  # The frozen tower runs once per label set, so full float32 matmuls cost nothing
  # and keep accelerators (TF32 by default) in parity with PyTorch.
  return jax.lax.Precision.HIGHEST if jnp.dtype(cfg.dtype) == jnp.float32 else None


def _normal(std):
  return nnx.initializers.normal(stddev=std)


def _layer_norm(cfg: TextConfig, rngs: nnx.Rngs):
  # use_fast_variance=False: E[(x-mean)^2] like torch, not E[x^2]-mean^2.
  return nnx.LayerNorm(cfg.width, epsilon=1e-5, use_fast_variance=False, dtype=cfg.dtype, rngs=rngs)


def _linear(din, dout, std, cfg: TextConfig, rngs: nnx.Rngs):
  return nnx.Linear(din, dout, kernel_init=_normal(std), dtype=cfg.dtype,
                    precision=_precision(cfg), rngs=rngs)


class MultiheadAttention(nnx.Module):
  """Causal self-attention with a fused q,k,v projection (`nn.MultiheadAttention`)."""

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
    w = cfg.width
    proj_std = w**-0.5 * (2 * cfg.layers)**-0.5
    self.heads = cfg.heads
    self.precision = _precision(cfg)
    self.in_proj = _linear(w, 3 * w, w**-0.5, cfg, rngs)
    self.out_proj = _linear(w, w, proj_std, cfg, rngs)

  def __call__(self, x):
    """[N, T, W] -> [N, T, W]; token t attends to tokens <= t."""
    n, t, w = x.shape
    q, k, v = jnp.split(self.in_proj(x), 3, axis=-1)
    q, k, v = (a.reshape(n, t, self.heads, w // self.heads) for a in (q, k, v))
    q = q * (w // self.heads)**-0.5
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, precision=self.precision)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    logits = jnp.where(causal, logits.astype(jnp.float32), -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", probs, v, precision=self.precision)
    return self.out_proj(out.reshape(n, t, w))


class MLP(nnx.Module):

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
    w = cfg.width
    self.c_fc = _linear(w, 4 * w, (2 * w)**-0.5, cfg, rngs)
    self.c_proj = _linear(4 * w, w, w**-0.5 * (2 * cfg.layers)**-0.5, cfg, rngs)

  def __call__(self, x):
    return self.c_proj(quick_gelu(self.c_fc(x)))


class ResidualAttentionBlock(nnx.Module):

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
    self.ln_1 = _layer_norm(cfg, rngs)
    self.attn = MultiheadAttention(cfg, rngs=rngs)
    self.ln_2 = _layer_norm(cfg, rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class Transformer(nnx.Module):

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
    self.resblocks = nnx.List([ResidualAttentionBlock(cfg, rngs=rngs) for _ in range(cfg.layers)])

  def __call__(self, x):
    for block in self.resblocks:
      x = block(x)
    return x


class CLIPTextTransformer(nnx.Module):
  """CLIP's text encoder: tokens [N, T] -> text embeddings [N, embed_dim].

  Initialised as OpenAI CLIP initialises its text tower; normally loaded from a
  checkpoint (`lseg_jax.convert.clip_openai` / `clip_hf`).
  """

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.width, dtype=cfg.dtype,
                                     embedding_init=_normal(0.02), rngs=rngs)
    self.positional_embedding = nnx.Param(
        _normal(0.01)(rngs.params(), (cfg.context_length, cfg.width), jnp.float32))
    self.transformer = Transformer(cfg, rngs=rngs)
    self.ln_final = _layer_norm(cfg, rngs)
    self.text_projection = nnx.Param(
        _normal(cfg.width**-0.5)(rngs.params(), (cfg.width, cfg.embed_dim), jnp.float32))

  def __call__(self, tokens):
    """tokens [N, T] int (T <= context_length; T = 77 from `lseg_jax.text.tokenize`)
    -> [N, embed_dim] float32, NOT normalised.

    Each sequence is pooled at its end-of-text token, found as the largest token id
    (EOT = 49407 is the largest id of the CLIP vocabulary), as OpenAI CLIP does.
    """
    cfg = self.cfg
    if tokens.ndim != 2 or tokens.shape[1] > cfg.context_length:
      raise ValueError(f"expected tokens [N, T] with T <= {cfg.context_length}, "
                       f"got shape {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"expected integer token ids, got dtype {tokens.dtype}")
    t = tokens.shape[1]
    x = self.token_embedding(tokens)
    x = x + self.positional_embedding[...][:t].astype(x.dtype)
    x = self.transformer(x)
    x = self.ln_final(x)
    eot = jnp.argmax(tokens, axis=-1)
    x = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    proj = self.text_projection[...].astype(x.dtype)
    return jnp.matmul(x, proj, precision=_precision(cfg)).astype(jnp.float32)
