"""FLOPs of LSeg per image, from the model config, the crop size and the label count.

What is counted: every matrix product and convolution, at 2 FLOPs per
multiply-accumulate, as this implementation computes them:

  ViT (the blocks up to the last hook; T = N + 1 tokens of width C, N patches of
  p x p pixels, MLP width M):
    patch embedding        2 N (3 p^2) C
    per block: qkv 6 T C^2, scores QK^T 2 T^2 C, weights x V 2 T^2 C,
               projection 2 T C^2, MLP 4 T C M
  DPT decoder (per hook i, width w_i, resampled to P_i pixels; F features):
    readout "project"      2 N (2C) C
    1x1 conv               2 N C w_i
    resample               ConvTranspose k x k, stride k: 2 N k^2 w_i^2;
                           3x3 stride-2 conv: 2 (P_i) 9 w_i^2
    layerN_rn (3x3)        2 P_i 9 w_i F
    fusion block i         2 (or 4 with the skip unit) 3x3 convs: 2 P_i 9 F^2 each;
                           out_conv (1x1) 2 P_i F^2
  head: head1 (1x1 to the text width D) 2 P_1 F D; spatial regularisation (arch_option
    1 or 2): max(block_depth, 1) single-channel 3x3 convs per label on the H/2 x W/2
    map, 2 (H/2)(W/2) 9 L each.
  logits: 2 P_1 D L (the scores are taken before the last x2 upsampling).

Not counted: normalisations, activations, softmax, resizes, the L2 norms, the loss
(elementwise work, a few percent at most), and the CLIP text tower: label embeddings
are computed once per label set, not per image.

lang-seg applies out_conv after each fusion block's x2 upsampling and head1 and the
logits at H/2 x W/2, 4x the pixels; `reference_order=True` counts them there, for
comparisons with the official model (it computes the same function).

Training: backward = 2 x forward, so a training step costs 3 x forward per image.
Example: ViT-L/16 at 480 x 480 with 150 labels, 0.78 TFLOP forward, 2.35 TFLOP per
training image (2.43 in lang-seg's order).
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

  See the module docstring for what is counted. `height` and `width` must be valid
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


__all__ = ["Flops", "count", "vit_flops"]
