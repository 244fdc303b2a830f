"""Minimal PyTorch CLIP text tower with OpenAI CLIP's text state-dict keys.

The parity reference for `lseg_jax.models.clip_text`, and the text tower of the
self-contained PyTorch LSeg. Keys: `token_embedding.weight`, `positional_embedding`,
`transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc,
mlp.c_proj}.*`, `ln_final.*`, `text_projection`.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class QuickGELU(nn.Module):

  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
  """LayerNorm computed in float32 (CLIP checkpoints may hold half weights)."""

  def forward(self, x):
    y = nn.functional.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                                 self.bias.float(), self.eps)
    return y.to(x.dtype)


class ResidualAttentionBlock(nn.Module):

  def __init__(self, width: int, heads: int):
    super().__init__()
    self.ln_1 = LayerNorm(width)
    self.attn = nn.MultiheadAttention(width, heads)
    self.ln_2 = LayerNorm(width)
    self.mlp = nn.Sequential(OrderedDict([
        ("c_fc", nn.Linear(width, 4 * width)),
        ("gelu", QuickGELU()),
        ("c_proj", nn.Linear(4 * width, width)),
    ]))

  def forward(self, x, mask):
    """x [T, N, W] (sequence first, as nn.MultiheadAttention expects)."""
    h = self.ln_1(x)
    x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
    return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):

  def __init__(self, width: int, layers: int, heads: int):
    super().__init__()
    self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

  def forward(self, x, mask):
    for block in self.resblocks:
      x = block(x, mask)
    return x


class CLIPTextTorch(nn.Module):
  """CLIP text encoder: tokens [N, T] int64 -> [N, embed_dim] (not normalised)."""

  def __init__(self, width: int, layers: int, heads: int, embed_dim: int,
               vocab_size: int = 49408, context_length: int = 77):
    super().__init__()
    self.context_length = context_length
    self.token_embedding = nn.Embedding(vocab_size, width)
    self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
    self.transformer = Transformer(width, layers, heads)
    self.ln_final = LayerNorm(width)
    self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
    # Additive causal mask; not persistent, so the state dict keeps OpenAI's keys.
    mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
    self.register_buffer("attn_mask", mask, persistent=False)
    self.initialize_parameters(width, layers)

  def initialize_parameters(self, width: int, layers: int):
    """OpenAI CLIP's initialisation of the text tower."""
    proj_std = width**-0.5 * (2 * layers)**-0.5
    nn.init.normal_(self.token_embedding.weight, std=0.02)
    nn.init.normal_(self.positional_embedding, std=0.01)
    for block in self.transformer.resblocks:
      nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
      nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
      nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width)**-0.5)
      nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    nn.init.normal_(self.text_projection, std=width**-0.5)

  @property
  def dtype(self):
    return self.token_embedding.weight.dtype

  def encode_text(self, tokens):
    t = tokens.shape[1]
    x = self.token_embedding(tokens).type(self.dtype)
    x = x + self.positional_embedding[:t].type(self.dtype)
    mask = self.attn_mask[:t, :t].to(self.dtype)
    x = self.transformer(x.permute(1, 0, 2), mask).permute(1, 0, 2)
    x = self.ln_final(x).type(self.dtype)
    # Pool at the end-of-text token, the largest id in each sequence.
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    return x @ self.text_projection

  def forward(self, tokens):
    return self.encode_text(tokens)
