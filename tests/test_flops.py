"""`flops.count` against FLOPs counted by hand (2 per multiply-accumulate) for tiny models."""
import pytest

from lseg_jax import flops
from lseg_jax.models import lseg


def _tiny_vit32_64x96():
  """tiny/32 (C=32, 4 blocks, MLP 64) on 64x96: 2x3 = 6 patches, T = 7 tokens;
  DPT widths (8, 16, 32, 32), F = 16 features, text width D = 16, L = 5 labels."""
  n, t, c = 6, 7, 32
  patch = 2 * n * (3 * 32 * 32) * c
  block = (2 * t * c * 3 * c  # qkv
           + 2 * t * t * c  # scores, all heads
           + 2 * t * t * c  # weights x values
           + 2 * t * c * c  # projection
           + 2 * t * c * 64 + 2 * t * 64 * c)  # fc1, fc2
  vit = patch + 4 * block
  readout = 2 * n * (2 * c) * c
  # Levels: ConvTranspose x8 -> 16x24 = 384 px, x4 -> 8x12 = 96, x2 -> 4x6 = 24, none -> 6.
  level1 = readout + 2 * n * c * 8 + 2 * n * 64 * 8 * 8 + 2 * 384 * 9 * 8 * 16
  level2 = readout + 2 * n * c * 16 + 2 * n * 16 * 16 * 16 + 2 * 96 * 9 * 16 * 16
  level3 = readout + 2 * n * c * 32 + 2 * n * 4 * 32 * 32 + 2 * 24 * 9 * 32 * 16
  level4 = readout + 2 * n * c * 32 + 2 * 6 * 9 * 32 * 16
  conv3 = lambda px: 2 * px * 9 * 16 * 16
  out_conv = lambda px: 2 * px * 16 * 16
  fusion = (2 * conv3(6) + out_conv(6) + 4 * conv3(24) + out_conv(24)
            + 4 * conv3(96) + out_conv(96) + 4 * conv3(384) + out_conv(384))
  head1 = 2 * 384 * 16 * 16
  spatial_reg = 2 * (2 * 32 * 48 * 9 * 5)  # block_depth 2, on the 32x48 map, per label
  logits = 2 * 384 * 16 * 5
  return vit, level1 + level2 + level3 + level4 + fusion, head1 + spatial_reg, logits


def test_tiny_vit32_matches_hand_count():
  cfg = lseg.LSegConfig(backbone="tiny_vit32", arch_option=1, block_depth=2)
  got = flops.count(cfg, 64, 96, num_labels=5)
  vit, decoder, head, logits = _tiny_vit32_64x96()
  assert (got.vit, got.decoder, got.head, got.logits) == (vit, decoder, head, logits)
  assert got.forward == vit + decoder + head + logits
  assert got.backward == 2 * got.forward and got.train == 3 * got.forward


def test_tiny_vit16_strided_level_matches_hand_count():
  """tiny/16 on 64x64: 4x4 = 16 patches, T = 17; levels ConvTranspose x4 -> 16x16,
  x2 -> 8x8, none -> 4x4, 3x3 stride-2 conv -> 2x2; no spatial regularisation, L = 3."""
  n, t, c = 16, 17, 32
  block = 2 * t * c * 3 * c + 4 * t * t * c + 2 * t * c * c + 4 * t * c * 64
  vit = 2 * n * (3 * 16 * 16) * c + 4 * block
  readout = 2 * n * (2 * c) * c
  decoder = (readout + 2 * n * c * 8 + 2 * n * 16 * 8 * 8 + 2 * 256 * 9 * 8 * 16
             + readout + 2 * n * c * 16 + 2 * n * 4 * 16 * 16 + 2 * 64 * 9 * 16 * 16
             + readout + 2 * n * c * 32 + 2 * 16 * 9 * 32 * 16
             + readout + 2 * n * c * 32 + 2 * 4 * 9 * 32 * 32 + 2 * 4 * 9 * 32 * 16)
  for px, convs in ((4, 2), (16, 4), (64, 4), (256, 4)):
    decoder += convs * 2 * px * 9 * 16 * 16 + 2 * px * 16 * 16
  got = flops.count(lseg.LSegConfig(backbone="tiny_vit16"), 64, num_labels=3)
  assert got.vit == vit
  assert got.decoder == decoder
  assert got.head == 2 * 256 * 16 * 16
  assert got.logits == 2 * 256 * 16 * 3


def test_reference_order_counts_out_conv_head_and_logits_at_4x_pixels():
  cfg = lseg.LSegConfig(backbone="tiny_vit32")
  ours = flops.count(cfg, 64, 96, num_labels=5)
  ref = flops.count(cfg, 64, 96, num_labels=5, reference_order=True)
  out_convs = 2 * (6 + 24 + 96 + 384) * 16 * 16
  assert ref.decoder - ours.decoder == 3 * out_convs
  assert ref.head == 4 * ours.head and ref.logits == 4 * ours.logits
  assert ref.vit == ours.vit


def test_vitl16_480_anchor():
  """About 2.3 TFLOP per training image for ViT-L/16 at 480 with 150 labels."""
  got = flops.count(lseg.LSegConfig(backbone="clip_vitl16_384"), 480, num_labels=150)
  print(f"ViT-L/16 480 px, 150 labels: forward {got.forward / 1e12:.3f} TFLOP, "
        f"train {got.train / 1e12:.3f} TFLOP per image")
  assert got.train == pytest.approx(2.35e12, rel=0.01)
  assert got.vit / got.forward == pytest.approx(0.8, abs=0.01)


def test_bad_size():
  with pytest.raises(ValueError, match="not a multiple of the patch size 32"):
    flops.count(lseg.LSegConfig(backbone="tiny_vit32"), 70)
