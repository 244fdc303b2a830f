"""Our ResNet vs torchvision's `ResNet` (Bottleneck) on random weights.

The weights go through `convert.torchvision_resnet`; every parameter and BatchNorm
statistic is random. Each stage output (layer1..layer4) must agree to a relative
error (max|a - b| / max|b|) below 1e-5, in eval mode (running statistics) and in
train mode (batch statistics), and the running statistics torch updates in train mode
must come out the same. Run with `-s` to see the errors.
"""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax import init
from lseg_jax.convert import mapping, torchvision_resnet
from lseg_jax.models import attention, lseg, resnet

import test_convert_common as common

torch = common.torch
tv_resnet = pytest.importorskip("torchvision.models.resnet")
TOL = 1e-5


def make_torchvision_resnet(variant: str, seed: int = 0):
  model = tv_resnet.ResNet(tv_resnet.Bottleneck, list(resnet.RESNET_VARIANTS[variant]))
  return common.randomize_torch_(model, seed).eval()


def torchvision_stages(model, images_nhwc):
  """The four stage outputs of a torchvision ResNet, NHWC numpy."""
  x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
  x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
  outputs = []
  for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
    x = stage(x)
    outputs.append(x.permute(0, 2, 3, 1).numpy())
  return outputs


@nnx.jit
def _stages(model, images):
  return model(images)


def load_random(variant, seed):
  tmodel = make_torchvision_resnet(variant, seed)
  cfg = resnet.decode_variant(variant)
  # Random values first, so that a parameter the loader missed shows up.
  jmodel = common.build_random(lambda: resnet.ResNet(cfg, rngs=nnx.Rngs(0)), seed + 1)
  torchvision_resnet.load_torchvision_resnet(tmodel.state_dict(), jmodel)
  return tmodel, jmodel


def check_stages(variant, height, width, train, seed=0):
  tmodel, jmodel = load_random(variant, seed)
  if train:
    tmodel.train()
    jmodel.train()
  else:
    jmodel.eval()
  images = np.random.default_rng(seed).uniform(-2, 2, (2, height, width, 3)).astype(np.float32)
  with torch.no_grad():
    ref = torchvision_stages(tmodel, images)
  out = _stages(jmodel, jnp.asarray(images))
  assert [o.shape for o in out] == [r.shape for r in ref]
  errors = [common.rel_error(o, r) for o, r in zip(out, ref)]
  mode = "train" if train else "eval"
  print(f"\nResNet {variant} {height}x{width} {mode} mode: rel err per stage "
        + ", ".join(f"{e:.2e}" for e in errors))
  assert max(errors) < TOL, errors
  if train:
    # Running statistics after one step: torch's momentum and unbiased variance.
    ours = torchvision_resnet.export_torchvision_resnet(jmodel)
    theirs = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    stat_errors = {k: common.rel_error(ours[k], v) for k, v in theirs.items()
                   if k.endswith(("running_mean", "running_var"))}
    assert len(stat_errors) == 2 * len([k for k in ours if k.endswith("running_var")])
    for k, v in theirs.items():
      if k.endswith("num_batches_tracked"):
        assert ours[k] == v, k
    print(f"ResNet {variant} train mode: max rel err running stats "
          f"{max(stat_errors.values()):.2e}")
    assert max(stat_errors.values()) < TOL, stat_errors


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("height,width", [(64, 96), (50, 70)])
def test_tiny_resnet_matches_torchvision(height, width, train):
  check_stages("resnet_tiny", height, width, train)


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True])
def test_resnet101_matches_torchvision(train):
  check_stages("resnet101", 128, 160, train)


# ---------------------------------------------------------------------------
# The table on shapes (meta device, abstract models): every variant, both layouts.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(resnet.RESNET_VARIANTS))
def test_table_covers_torchvision(variant):
  with torch.device("meta"):
    tmodel = tv_resnet.ResNet(tv_resnet.Bottleneck, list(resnet.RESNET_VARIANTS[variant]))
  sd = common.meta_state_dict(tmodel)
  assert torchvision_resnet.find_prefix(sd) == ""
  assert torchvision_resnet.infer_variant(sd) == variant
  abstract = nnx.eval_shape(
      lambda: resnet.ResNet(resnet.decode_variant(variant), rngs=nnx.Rngs(0)))
  params = mapping.torch_to_nnx(sd, torchvision_resnet.table(), abstract)
  assert set(mapping.flatten_params(params)) == set(mapping.flatten_params(abstract))
  # Export gives torchvision's keys back, without the classifier.
  exported = mapping.nnx_to_torch(params, torchvision_resnet.table())
  assert set(exported) == {k for k in sd if not k.startswith("fc.")}


def test_load_builds_the_variant_and_round_trips(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  tmodel = make_torchvision_resnet("resnet_tiny", seed=2)
  sd = {"module." + k: v.numpy() for k, v in tmodel.state_dict().items()}
  safetensors_numpy.save_file(sd, str(tmp_path / "r.safetensors"))
  jmodel = torchvision_resnet.load_torchvision_resnet(tmp_path / "r.safetensors")
  assert jmodel.cfg == resnet.decode_variant("resnet_tiny")
  back = torchvision_resnet.export_torchvision_resnet(jmodel, "module.")
  assert set(back) == {k for k in sd if not k.startswith("module.fc.")}
  for k, v in back.items():
    assert v.dtype == sd[k].dtype and np.array_equal(v, sd[k]), k
  assert all(v.dtype == np.int64 for k, v in back.items() if k.endswith("tracked"))


def test_load_errors_list_the_bad_keys():
  tmodel = make_torchvision_resnet("resnet_tiny")
  sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  del sd["layer3.0.downsample.1.running_var"]
  sd["layer2.0.conv2.weight"] = np.zeros((128, 128, 1, 1), np.float32)
  with pytest.raises(mapping.MappingError) as e:
    torchvision_resnet.load_torchvision_resnet(sd, "resnet_tiny")
  assert "layer3.0.downsample.1.running_var" in str(e.value)
  assert "layer2.0.conv2.weight" in str(e.value)
  two_blocks = {**sd, **{"layer1.1." + k[len("layer1.0."):]: v for k, v in sd.items()
                         if k.startswith("layer1.0.")}}
  with pytest.raises(ValueError, match=r"\(2, 1, 1, 1\) Bottleneck blocks.*resnet101"):
    torchvision_resnet.load_torchvision_resnet(two_blocks)
  with pytest.raises(ValueError, match="unknown ResNet variant 'resnet18'"):
    resnet.decode_variant("resnet18")


def test_training_init_from_torchvision_weights(tmp_path):
  """`config.init.torchvision_resnet`: an ImageNet state dict as torchvision saves it
  (with `fc`) fills `pretrained/model/*` of a ResNet LSeg, and only that."""
  tmodel = make_torchvision_resnet("resnet_tiny", seed=3)
  torch.save(tmodel.state_dict(), tmp_path / "resnet.pth")
  cfg = lseg.LSegConfig(backbone="tiny_resnet", text_vocab_size=64)
  abstract = nnx.eval_shape(lambda: lseg.LSeg(cfg, rngs=nnx.Rngs(0)))
  got = init.pretrained_weights({"torchvision_resnet": str(tmp_path / "resnet.pth")}, abstract)
  want = torchvision_resnet.load_torchvision_resnet(tmodel.state_dict())
  want = {"pretrained/model/" + k: v for k, v in mapping.flatten_params(want).items()}
  assert set(got) == set(want) == {k for k in mapping.flatten_params(abstract)
                                   if k.startswith("pretrained/model/")}
  for k, v in got.items():
    np.testing.assert_array_equal(v, np.asarray(want[k]), err_msg=k)

  vit = nnx.eval_shape(lambda: lseg.LSeg(
      lseg.LSegConfig(backbone="tiny_vit32", text_vocab_size=64), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="backbone 'tiny_vit32' has a vit image encoder; use "
                                       "config.init.timm_vit"):
    init.pretrained_weights({"torchvision_resnet": str(tmp_path / "resnet.pth")}, vit)
  with pytest.raises(ValueError, match="config.init.torchvision_resnet"):
    init.pretrained_weights({"timm_vit": str(tmp_path / "resnet.pth")}, abstract)


def test_gradients_reach_every_parameter():
  """Training differentiates through the stem's max pool and every block (train mode)."""
  model = resnet.ResNet(resnet.decode_variant("resnet_tiny"), rngs=nnx.Rngs(0))
  model.train()
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  loss = lambda m: sum(jnp.mean(o ** 2) for o in m(images))
  grads = nnx.jit(nnx.grad(loss))(model)
  flat = mapping.flatten_params(grads)
  assert flat and all(np.isfinite(np.asarray(g)).all() for g in flat.values())
  assert np.abs(np.asarray(flat["conv1/kernel"])).max() > 0


def test_tpu_programs_hold_the_strided_conv_apart_from_batchnorm():
  """Traced for a TPU, a stride-2 block puts an optimization barrier before its 3x3 conv
  (libtpu crashes compiling the gradient for v6e without it: tests/test_aot.py); traced
  for this CPU it does not. The values and gradients are bit-identical either way."""
  block = resnet.Bottleneck(8, 4, 2, dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(block, nnx.Param, ...)
  params, rest = nnx.pure(params), nnx.pure(rest)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 8)), jnp.float32)

  def loss(params, x):
    model = nnx.merge(graphdef, params, rest)
    return jnp.sum(model(x) ** 2), nnx.pure(nnx.state(model, nnx.BatchStat))

  step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  # Fresh lambdas: JAX caches a trace per function, whatever the platform setting.
  here = jax.jit(lambda p, x: step(p, x))(params, x)
  assert "optimization_barrier" not in str(jax.make_jaxpr(lambda p, x: step(p, x))(params, x))
  with attention.compiling_for("tpu"):
    assert "optimization_barrier" in str(jax.make_jaxpr(lambda p, x: step(p, x))(params, x))
    tpu = jax.jit(lambda p, x: step(p, x))(params, x)
  leaves = jax.tree.leaves(here)
  assert len(leaves) == len(jax.tree.leaves(tpu)) > 10
  for a, b in zip(leaves, jax.tree.leaves(tpu)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
