"""tools/benchmark.py end to end on a tiny config, and the FLOP count against a hand count."""
import importlib.util
import json

import pytest

from lseg_jax import errors
from lseg_jax import flops
from lseg_jax.cli import benchmark
from lseg_jax.models import lseg

HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "timm"))
TIMING_FIELDS = ("first_step_s", "step_s_median", "step_s_min", "batch_size", "images_per_s",
                 "s_per_image", "flops_per_image", "achieved_tflops", "mfu",
                 "peak_memory_bytes")


def test_resnet_backbones_have_no_flop_formula():
  """MFU is "n/a" for them (the formula of `lseg_jax.flops` covers ViT backbones;
  its hand counts are in tests/test_flops.py)."""
  with pytest.raises(ValueError):
    flops.count(lseg.LSegConfig(backbone="clip_resnet101"), 480, 480, 150)


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
          "--labels", "5", "--data",
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
  expected_fwd = flops.count(lseg.LSegConfig(backbone="tiny_vit32"), 32, 32, 5).forward
  assert result["forward_flops_per_image"] == expected_fwd
  for task in ("infer", "train"):
    for key in TIMING_FIELDS:
      assert key in result[task], (task, key)
    assert result[task]["images_per_s"] > 0 and result[task]["batch_size"] == 2
    assert result[task]["step_s_min"] <= result[task]["step_s_median"]
  assert result["train"]["flops_per_image"] == 3 * expected_fwd
  # --data: the input pipeline at the config's crop, this process's share of the batch.
  assert result["data"]["crop_size"] == 32 and result["data"]["batch_size"] == 2
  assert result["data"]["images_per_s"] > 0
  assert result["bound"] == ("input pipeline" if result["data"]["images_per_s"]
                             < result["train"]["images_per_s"] else "train step")
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


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch and timm")
@pytest.mark.parametrize("text_tower", ["frozen", "trained"])
def test_torch_text_tower_trained_runs_and_updates_it_every_step(monkeypatch, text_tower):
  import torch  # pylint: disable=g-import-not-at-top
  from lseg_jax.convert import langseg  # pylint: disable=g-import-not-at-top
  from lseg_jax.torch_lseg import LSegTorch, TorchLSegConfig  # pylint: disable=g-import-not-at-top
  from lseg_jax.torch_lseg import benchmark as torch_benchmark  # pylint: disable=g-import-not-at-top
  encoded, stepped = [], []
  encode = LSegTorch.encode_text
  step = torch.optim.SGD.step

  def spy_encode(self, tokens):
    out = encode(self, tokens)
    encoded.append(out.requires_grad)
    return out

  def spy_step(self, *args, **kwargs):
    stepped.append(sum(p.numel() for group in self.param_groups for p in group["params"]))
    return step(self, *args, **kwargs)

  monkeypatch.setattr(LSegTorch, "encode_text", spy_encode)
  monkeypatch.setattr(torch.optim.SGD, "step", spy_step)
  cfg = TorchLSegConfig(**langseg.torch_config(lseg.LSegConfig(backbone="tiny_vit32")))
  fig = torch_benchmark.bench_torch(cfg, "train", "float32", torch.device("cpu"), batch_size=2,
                              crop=32, labels=3, steps=2, text_tower=text_tower)
  assert fig["step_s_median"] > 0
  text_params = sum(p.numel() for p in LSegTorch(cfg)
                    .clip_pretrained.parameters())
  if text_tower == "trained":  # warm-up + 2 timed steps, each through the text tower
    assert encoded == [True] * 3
    assert len(set(stepped)) == 1 and stepped[0] > text_params
  else:
    assert encoded == [] and len(stepped) == 3


def test_aot_fit_without_a_topology_is_a_user_error():
  with pytest.raises(errors.UserError, match="needs --aot TOPOLOGY"):
    benchmark.main(["--config", "configs/synthetic_tiny.py", "--aot-fit", "4"])
