r"""Floating-point operations of an LSeg forward pass, for MFU figures.

Counts 2 FLOPs per multiply-add of every matrix product and convolution; norms,
activations, softmax, biases, residual adds and the bilinear resizes (position
embeddings, fusion x2, logits x2) are left out (well under 1% for the real models).

For a square crop of side S, a ViT with patch p, width C, MLP width M, depth d (the
blocks up to the last DPT hook: 12 of ViT-B/32, 24 of ViT-L/16), N = (S/p)^2 patch
tokens and T = N + 1 tokens; DPT level widths w_1..w_4, decoder width F, text width D
and L labels, the per-image forward count is the sum of:

  patch embed        2 N (3 p^2) C
  per ViT block      2 T (3C^2)   qkv
                     2 T^2 C      q k^T (all heads together)
                     2 T^2 C      attention x V
                     2 T C^2      output projection
                     2 T (2 C M)  MLP (fc1, fc2)
  readout "project"  4 x 2 N (2C) C     (the other readouts: 0)
  reassemble i       2 N C w_i          1x1 conv on the token grid
                     2 N k^2 w_i^2      ConvTranspose k x k, stride k (k = 8, 4, 2)
                     2 (N/4) 9 w_i^2    3x3 conv, stride 2 (patch 16, level 4)
  layer_i_rn         2 R_i 9 w_i F      3x3 conv at level i's R_i = (S / 2^(i+1))^2
                                        pixels (strides 4, 8, 16, 32)
  fusion block i     2 x 2 R_i 9 F^2    a residual unit: two 3x3 convs (two units,
                                        except the coarsest block without a skip)
                     2 (4 R_i) F^2      1x1 out_conv after the x2 upsampling
  head1              2 (S/2)^2 F D
  logits             2 (S/2)^2 L D      pixel . label embeddings
  spatial reg.       2 (S/2)^2 L 9      per application (max(block_depth, 1) of them,
                                        only with arch_option 1 or 2)

A training step is counted as 3 forward passes (forward, and a backward pass of twice
its cost), the usual convention; it slightly overcounts LSeg, whose frozen text tower is
not run at all (label embeddings are computed once) and whose first layer needs no
input gradient.

For ViT-L/16 at 480 px with 150 labels this gives 0.81 TFLOP per image forward, 2.43
TFLOP per training image (ViT 0.63 of the 0.81; the DPT decoder, mostly its finest
fusion block at 120x120, most of the rest).

ResNet backbones (`clip_resnet101`) are not counted (`forward_flops` raises
ValueError).
"""
from __future__ import annotations

from lseg_jax.models import dpt, lseg, vit

TRAIN_FORWARD_MULTIPLE = 3


def _vit_flops(v: vit.ViTConfig, size: int) -> dict[str, float]:
  n = (size // v.patch) ** 2
  t = n + 1
  c, m = v.width, v.mlp_dim
  depth = max(v.hooks) + 1
  block = 2 * t * 3 * c * c + 4 * t * t * c + 2 * t * c * c + 4 * t * c * m
  return {"patch_embed": 2 * n * 3 * v.patch ** 2 * c, "vit_blocks": depth * block}


def _dpt_flops(cfg: lseg.LSegConfig, v: vit.ViTConfig, size: int, text_dim: int
               ) -> dict[str, float]:
  n = (size // v.patch) ** 2
  c, f = v.width, cfg.num_features
  widths = lseg.DPT_WIDTHS[cfg.vit_variant]
  readout = 4 * 2 * n * 2 * c * c if cfg.readout == "project" else 0
  reassemble = 0
  for w, style in zip(widths, dpt.REASSEMBLE[v.patch]):
    reassemble += 2 * n * c * w
    if style[0] == "deconv":
      reassemble += 2 * n * style[1] ** 2 * w * w
    elif style[0] == "conv_s2":
      reassemble += 2 * (n // 4) * 9 * w * w
  pixels = [(size // 2 ** (i + 2)) ** 2 for i in range(4)]  # strides 4, 8, 16, 32
  layer_rn = sum(2 * r * 9 * w * f for r, w in zip(pixels, widths))
  rcu = lambda r: 2 * 2 * r * 9 * f * f
  fusion = sum((1 if i == 3 else 2) * rcu(r) + 2 * 4 * r * f * f
               for i, r in enumerate(pixels))
  head1 = 2 * (size // 2) ** 2 * f * text_dim
  return {"readout": readout, "reassemble": reassemble, "layer_rn": layer_rn,
          "fusion": fusion, "head1": head1}


def forward_flops_breakdown(cfg: lseg.LSegConfig, crop_size: int, num_labels: int
                            ) -> dict[str, float]:
  """Forward FLOPs per image by part (see the module docstring).

  Args:
    cfg: the model.
    crop_size: side S of the square input (a multiple of the model's size multiple).
    num_labels: labels L scored per pixel.

  Returns:
    {part: FLOPs}: patch_embed, vit_blocks, readout, reassemble, layer_rn, fusion,
    head1, logits, spatial_reg.

  Raises:
    ValueError: for a ResNet backbone.
  """
  if cfg.image_encoder != "vit":
    raise ValueError(f"no FLOP count for the ResNet backbone {cfg.backbone!r}")
  v = vit.decode_variant(cfg.vit_variant)
  text_dim = _text_dim(cfg)
  out = {**_vit_flops(v, crop_size), **_dpt_flops(cfg, v, crop_size, text_dim)}
  half = (crop_size // 2) ** 2
  out["logits"] = 2 * half * num_labels * text_dim
  reps = max(cfg.block_depth, 1) if cfg.arch_option else 0
  out["spatial_reg"] = reps * 2 * half * num_labels * 9
  return {k: float(x) for k, x in out.items()}


def _text_dim(cfg: lseg.LSegConfig) -> int:
  from lseg_jax.models import clip_text  # pylint: disable=g-import-not-at-top
  return clip_text.decode_variant(cfg.text_variant).embed_dim


def forward_flops(cfg: lseg.LSegConfig, crop_size: int, num_labels: int) -> float:
  """Forward FLOPs per image of `crop_size` x `crop_size` with `num_labels` labels."""
  return sum(forward_flops_breakdown(cfg, crop_size, num_labels).values())


def train_flops(cfg: lseg.LSegConfig, crop_size: int, num_labels: int) -> float:
  """Training FLOPs per image: `TRAIN_FORWARD_MULTIPLE` (3) forward passes."""
  return TRAIN_FORWARD_MULTIPLE * forward_flops(cfg, crop_size, num_labels)
