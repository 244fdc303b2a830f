"""FLOPs of LSeg per image, from the model config, the crop size and the label count.

What is counted and how: docs/evaluation.md, "FLOP count".
"""
from __future__ import annotations

import dataclasses

from lseg_jax.models import clip_text, dpt, lseg, vit


@dataclasses.dataclass(frozen=True)
class Flops:
  """Forward FLOPs of one image by part; `forward`, `backward`, `train` in total."""
  vit: float
  decoder: float  # readout, reassemble, layerN_rn, fusion blocks
  head: float  # head1 and the spatial regularisation
  logits: float

  @property
  def forward(self) -> float:
    return self.vit + self.decoder + self.head + self.logits

  @property
  def backward(self) -> float:
    return 2 * self.forward

  @property
  def train(self) -> float:
    return self.forward + self.backward


def vit_flops(cfg: vit.ViTConfig, height: int, width: int) -> float:
  """Forward FLOPs of the ViT blocks LSeg runs (up to the last hook) on one image."""
  n = (height // cfg.patch) * (width // cfg.patch)
  t, c, m = n + 1, cfg.width, cfg.mlp_dim
  per_block = 6 * t * c * c + 2 * t * t * c + 2 * t * t * c + 2 * t * c * c + 4 * t * c * m
  return 2 * n * 3 * cfg.patch ** 2 * c + (max(cfg.hooks) + 1) * per_block


def count(cfg: lseg.LSegConfig, height: int, width: int | None = None,
          num_labels: int = 150, *, reference_order: bool = False) -> Flops:
  """FLOPs of one image of `height` x `width` (default square) with `num_labels` labels.

  What is counted: docs/evaluation.md, "FLOP count". `height` and `width` must be valid
  input sizes for the model (multiples of its `size_multiple`).
  """
  width = height if width is None else width
  vcfg = vit.decode_variant(cfg.vit_variant)
  p, c = vcfg.patch, vcfg.width
  if height % p or width % p:
    raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
  gh, gw = height // p, width // p
  n = gh * gw
  f = cfg.num_features
  d = clip_text.decode_variant(cfg.text_variant).embed_dim
  widths = lseg.DPT_WIDTHS[cfg.vit_variant]

  decoder = 0.0
  pixels = []  # P_i: pixels of reassembled level i
  for w, style in zip(widths, dpt.REASSEMBLE[p]):
    if cfg.readout == "project":
      decoder += 2 * n * 2 * c * c
    decoder += 2 * n * c * w
    if style[0] == "deconv":
      k = style[1]
      decoder += 2 * n * k * k * w * w
      level = n * k * k
    elif style[0] == "conv_s2":
      level = ((gh + 1) // 2) * ((gw + 1) // 2)
      decoder += 2 * level * 9 * w * w
    else:
      level = n
    decoder += 2 * level * 9 * w * f  # layerN_rn
    pixels.append(level)
  out_scale = 4 if reference_order else 1  # out_conv after (lang-seg) or before the x2
  for i, level in enumerate(pixels):
    convs = 2 if i == 3 else 4  # refinenet4 has no skip input
    decoder += convs * 2 * level * 9 * f * f + out_scale * 2 * level * f * f

  half = (height // 2) * (width // 2)  # = 4 P_1
  head_pixels = half if reference_order else pixels[0]
  head = 2 * head_pixels * f * d
  if cfg.arch_option:
    head += max(cfg.block_depth, 1) * 2 * half * 9 * num_labels
  logits = 2 * head_pixels * d * num_labels
  return Flops(vit=float(vit_flops(vcfg, height, width)), decoder=float(decoder),
               head=float(head), logits=float(logits))
