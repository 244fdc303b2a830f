"""Whole-model parity: our LSeg vs the PyTorch LSeg (`LSegTorch`) on random weights.

Every parameter and BatchNorm statistic is random; the weights go through the
lang-seg table (`convert.langseg`). Logits must agree to a relative error
(max|a - b| / max|b|) below 1e-5, with shared label embeddings [L, D] and with
per-example embeddings [B, L, D] plus a label mask. Run with `-s` to see the errors.
"""
from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax.convert import langseg

import test_convert_common as common

torch = common.torch
TOL = 1e-5
# Head-block activations of the depth-2 heads (depth 1 applies none). Not tanh: it
# squashes the ~+-14 logits to +-1 but passes their float32 rounding error unchanged
# near 0, so the relative error measure rises to ~1e-5 with no bug behind it; tanh is
# checked on the head alone (test_ops_parity.py).
ACTIVATION = {(1, 2): "relu", (2, 2): "lrelu"}


def check_parity(backbone, arch_option, block_depth, height, width, seed=0):
  activation = ACTIVATION.get((arch_option, block_depth), "lrelu")
  tmodel = common.make_torch_lseg(backbone, arch_option, block_depth, activation, seed)
  cfg = common.jax_config(backbone, arch_option, block_depth, activation)
  jmodel = langseg.load_langseg(tmodel.state_dict(), cfg)
  batch = common.inputs(jmodel.text_dim, height=height, width=width, seed=seed)
  ref = common.torch_logits(tmodel, *batch)
  out = common.jax_logits(jmodel, *map(jnp.asarray, batch))
  errors = [common.rel_error(o, r) for o, r in zip(out, ref)]
  print(f"\n{backbone} arch_option={arch_option} block_depth={block_depth} {activation} "
        f"{height}x{width}: rel err shared labels {errors[0]:.2e}, "
        f"per-example + mask {errors[1]:.2e}")
  assert max(errors) < TOL, errors


@pytest.mark.parametrize("arch_option,block_depth", common.HEADS)
@pytest.mark.parametrize("backbone", common.TINY)
def test_tiny_lseg_matches_torch(backbone, arch_option, block_depth):
  check_parity(backbone, arch_option, block_depth, 64, 96)


@pytest.mark.slow
@pytest.mark.parametrize("backbone,arch_option,block_depth,height,width", [
    ("clip_vitl16_384", 0, 0, 128, 160),
    ("clip_vitb32_384", 1, 2, 192, 256),
    ("clipRN50x16_vitl16_384", 2, 2, 160, 128),
])
def test_full_lseg_matches_torch(backbone, arch_option, block_depth, height, width):
  check_parity(backbone, arch_option, block_depth, height, width)


@nnx.jit
def _forward(model, images, text):
  return model(images, text)


@pytest.mark.parametrize("backbone", common.TINY)
def test_batchnorm_train_mode_matches_torch(backbone):
  """Training mode: batch statistics in the forward pass, and the same running
  statistics (torch's momentum and unbiased variance) afterwards."""
  tmodel = common.make_torch_lseg(backbone, 1, 2, "lrelu", seed=1)
  jmodel = langseg.load_langseg(tmodel.state_dict(),
                                common.jax_config(backbone, 1, 2, "lrelu"))
  images, text, _, _ = common.inputs(jmodel.text_dim, seed=1)
  tmodel.train()
  jmodel.train()
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(text))
  out = _forward(jmodel, jnp.asarray(images), jnp.asarray(text))
  err = common.rel_error(out, ref.permute(0, 2, 3, 1).numpy())
  print(f"\n{backbone} train mode: rel err logits {err:.2e}")
  assert err < TOL

  ours = langseg.export_langseg(jmodel)
  theirs = {k: v.numpy() for k, v in tmodel.state_dict().items() if ".bn" in k}
  assert theirs
  stat_errors = {}
  for key, value in theirs.items():
    if key.endswith("num_batches_tracked"):
      assert ours[key] == value, key
    elif key.endswith(("running_mean", "running_var")):
      stat_errors[key] = common.rel_error(ours[key], value)
  print(f"{backbone} train mode: max rel err running stats {max(stat_errors.values()):.2e}")
  assert max(stat_errors.values()) < TOL, stat_errors
  # Unused fusion unit (refinenet4 has no skip input) keeps its statistics.
  key = "scratch.refinenet4.resConfUnit1.bn1.running_mean"
  np.testing.assert_array_equal(ours[key], theirs[key])
