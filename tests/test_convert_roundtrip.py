"""JAX -> PyTorch -> JAX round trips through the lang-seg layout.

Export must give a file that `LSegTorch.from_checkpoint` loads (strictly) and that
computes our logits; importing it back must reproduce every parameter and BatchNorm
statistic bit for bit, and the config.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax.convert import langseg, mapping

import test_convert_common as common

torch = common.torch
torch_lseg = common.torch_lseg


def export_to_file(model, path):
  langseg.write_torch_checkpoint(path, langseg.export_langseg(model),
                                 lseg_config=langseg.torch_config(model.cfg))


def check_round_trip(backbone, arch_option, block_depth, tmp_path, height, width):
  jmodel = common.make_jax_lseg(backbone, arch_option, block_depth, "relu", seed=3)
  path = tmp_path / "exported.pt"
  export_to_file(jmodel, path)

  # The file: Lightning's wrapper layout, torch's dtypes and shapes.
  obj = torch.load(path, map_location="cpu", weights_only=True)
  assert set(obj) == {"state_dict", "lseg_config"}
  with torch.device("meta"):
    reference = torch_lseg.LSegTorch(torch_lseg.TorchLSegConfig(**obj["lseg_config"]))
  expected = reference.state_dict()
  assert set(obj["state_dict"]) == set(expected)
  for key, value in obj["state_dict"].items():
    assert value.shape == expected[key].shape and value.dtype == expected[key].dtype, key

  # Back to JAX: bit-identical, same config.
  back = langseg.load_langseg(path)
  assert back.cfg == jmodel.cfg
  ours, theirs = mapping.flatten_params(jmodel), mapping.flatten_params(back)
  assert set(ours) == set(theirs)
  for key in ours:
    a, b = np.asarray(ours[key]), np.asarray(theirs[key])
    assert a.dtype == b.dtype and np.array_equal(a, b), key

  # The exported model computes our logits.
  tmodel = torch_lseg.LSegTorch.from_checkpoint(path)
  batch = common.inputs(jmodel.text_dim, height=height, width=width, seed=3)
  ref = common.torch_logits(tmodel, *batch)
  out = common.jax_logits(jmodel, *map(jnp.asarray, batch))
  errors = [common.rel_error(o, r) for o, r in zip(out, ref)]
  print(f"\n{backbone} arch_option={arch_option} block_depth={block_depth}: exported "
        f"LSegTorch vs JAX rel err {errors[0]:.2e} / {errors[1]:.2e} (per-example + mask)")
  assert max(errors) < 1e-5, errors


@pytest.mark.parametrize("arch_option,block_depth", [(0, 0), (1, 2), (2, 2)])
@pytest.mark.parametrize("backbone", common.TINY)
def test_tiny_round_trip(backbone, arch_option, block_depth, tmp_path):
  check_round_trip(backbone, arch_option, block_depth, tmp_path, 64, 96)


@pytest.mark.slow
@pytest.mark.parametrize("backbone,arch_option,block_depth", [
    ("clip_vitl16_384", 2, 2), ("clip_vitb32_384", 0, 0), ("clipRN50x16_vitl16_384", 1, 2)])
def test_full_round_trip(backbone, arch_option, block_depth, tmp_path):
  check_round_trip(backbone, arch_option, block_depth, tmp_path, 128, 128)


def test_export_without_config_needs_the_head_settings(tmp_path):
  """A bare state dict carries no config: a head block then needs the settings."""
  jmodel = common.make_jax_lseg("tiny_vit32", 2, 2, "relu")
  state_dict = langseg.export_langseg(jmodel)
  with pytest.raises(ValueError, match="arch_option=1 .*or 2"):
    langseg.load_langseg(state_dict)
  with pytest.raises(ValueError, match="activation"):
    langseg.load_langseg(state_dict, arch_option=2, block_depth=2)
  back = langseg.load_langseg(state_dict, arch_option=2, block_depth=2, activation="relu")
  assert back.cfg == jmodel.cfg
