"""tools/benchmark.py end to end on a tiny config, and the FLOP count against a hand count."""
import importlib.util
import json

import pytest

from lseg_jax import flops
from lseg_jax.cli import benchmark
from lseg_jax.models import lseg

HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "timm"))
TIMING_FIELDS = ("first_step_s", "step_s_median", "step_s_min", "batch_size", "images_per_s",
                 "s_per_image", "flops_per_image", "achieved_tflops", "mfu",
                 "peak_memory_bytes")


def test_forward_flops_hand_count_tiny_vit32():
  """tiny_vit32 at 64 px, 3 labels: ViT width C=32, MLP M=64, 4 blocks, patch 32, so
  N = 2x2 = 4 patches and T = 5 tokens; DPT widths (8, 16, 32, 32), F = 16, D = 16."""
  cfg = lseg.LSegConfig(backbone="tiny_vit32")
  patch_embed = 2 * 4 * (3 * 32 * 32) * 32
  block = (2 * 5 * 3 * 32 * 32  # qkv
           + 2 * 5 * 5 * 32  # q k^T
           + 2 * 5 * 5 * 32  # attention x V
           + 2 * 5 * 32 * 32  # proj
           + 2 * 5 * 2 * 32 * 64)  # fc1 + fc2
  vit_blocks = 4 * block
  readout = 4 * 2 * 4 * (2 * 32) * 32
  reassemble = (2 * 4 * 32 * (8 + 16 + 32 + 32)  # 1x1 convs on the 2x2 token grid
                + 2 * 4 * 64 * 8 * 8  # ConvTranspose 8x8 -> 16x16, 8 channels
                + 2 * 4 * 16 * 16 * 16  # ConvTranspose 4x4 -> 8x8, 16 channels
                + 2 * 4 * 4 * 32 * 32)  # ConvTranspose 2x2 -> 4x4, 32 channels
  # 3x3 convs to F=16 at 16x16, 8x8, 4x4, 2x2 (strides 4..32 of 64 px).
  layer_rn = 2 * 9 * 16 * (256 * 8 + 64 * 16 + 16 * 32 + 4 * 32)
  rcu = lambda pixels: 2 * (2 * pixels * 9 * 16 * 16)  # two 3x3 convs F -> F
  out_conv = lambda pixels: 2 * (4 * pixels) * 16 * 16  # 1x1 at twice the side
  fusion = (2 * rcu(256) + out_conv(256) + 2 * rcu(64) + out_conv(64)
            + 2 * rcu(16) + out_conv(16) + rcu(4) + out_conv(4))
  head1 = 2 * (32 * 32) * 16 * 16
  logits = 2 * (32 * 32) * 3 * 16
  expected = (patch_embed + vit_blocks + readout + reassemble + layer_rn + fusion + head1
              + logits)
  assert expected == 9_931_264
  parts = flops.forward_flops_breakdown(cfg, 64, 3)
  assert parts["vit_blocks"] == vit_blocks and parts["fusion"] == fusion
  assert flops.forward_flops(cfg, 64, 3) == expected
  assert flops.train_flops(cfg, 64, 3) == 3 * expected
  # The spatial regularisation: one 3x3 conv per label per application.
  reg = lseg.LSegConfig(backbone="tiny_vit32", arch_option=1, block_depth=2)
  assert flops.forward_flops(reg, 64, 3) == expected + 2 * (2 * 1024 * 3 * 9)
  # Readout "ignore" drops the projection.
  ignore = lseg.LSegConfig(backbone="tiny_vit32", readout="ignore")
  assert flops.forward_flops(ignore, 64, 3) == expected - readout


def test_forward_flops_vitl16_anchor():
  """ViT-L/16 at 480 px, 150 labels: about 2.4 TFLOP per training image."""
  cfg = lseg.LSegConfig(backbone="clip_vitl16_384")
  assert 2.3e12 < flops.train_flops(cfg, 480, 150) < 2.5e12
  with pytest.raises(ValueError, match="ResNet"):
    flops.forward_flops(lseg.LSegConfig(backbone="clip_resnet101"), 480, 150)


def test_peak_flops_table():
  assert benchmark.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert benchmark.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
  assert benchmark.peak_flops("TPU v5 lite", "bfloat16") == 197e12
  assert benchmark.peak_flops("TPU v5", "bfloat16") == 459e12
  assert benchmark.peak_flops("TPU v4", "float32") is None
  assert benchmark.peak_flops("cpu", "float32") is None


def test_benchmark_tool_end_to_end(tmp_path, capsys):
  out = tmp_path / "bench.json"
  argv = ["--config", "configs/synthetic_tiny.py:runlocal",
          "--config.model.backbone=tiny_vit32", "--config.data.crop_size=32",
          "--config.batch_size=2", "--config.mesh.data=2", "--steps", "2", "--task", "both",
          "--labels", "5",
          "--json", str(out)] + (["--torch"] if HAS_TORCH else [])
  assert benchmark.main(argv) == 0
  line = capsys.readouterr().out.strip().splitlines()[-1]
  result = json.loads(out.read_text())
  assert json.loads(line) == result
  for key in ("date", "backbone", "dtype", "crop_size", "labels", "task", "steps", "platform",
              "device_kind", "devices", "peak_flops_per_device", "forward_flops_per_image",
              "infer", "train"):
    assert key in result, key
  assert result["backbone"] == "tiny_vit32" and result["crop_size"] == 32
  assert result["devices"] == 2
  expected_fwd = flops.forward_flops(lseg.LSegConfig(backbone="tiny_vit32"), 32, 5)
  assert result["forward_flops_per_image"] == expected_fwd
  for task in ("infer", "train"):
    for key in TIMING_FIELDS:
      assert key in result[task], (task, key)
    assert result[task]["images_per_s"] > 0 and result[task]["batch_size"] == 2
    assert result[task]["step_s_min"] <= result[task]["step_s_median"]
  assert result["train"]["flops_per_image"] == 3 * expected_fwd
  if result["platform"] == "cpu":
    assert result["train"]["mfu"] == "n/a" and result["train"]["peak_memory_bytes"] == "n/a"
  if HAS_TORCH:
    for task in ("infer", "train"):
      for dtype in ("float32", "bfloat16"):
        fig = result["torch"][task][dtype]
        for key in TIMING_FIELDS + ("jax_speedup",):
          assert key in fig, (task, dtype, key)
        assert fig["jax_speedup"] == pytest.approx(
            result[task]["images_per_s"] / fig["images_per_s"], rel=1e-2)
