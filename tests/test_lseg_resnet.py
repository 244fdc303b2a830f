"""LSeg with a ResNet image encoder: lang-seg's zero-shot `LSegRNNetZS` (`clip_resnet101`).

* Whole-model parity with our PyTorch `LSegTorch` (the `LSegRNNetZS` key layout) on
  random weights: logits within a relative error (max|a - b| / max|b|) of 1e-5, tiny
  here and in test_lseg_parity.py (`common.TINY` includes `tiny_resnet`), full size
  below (slow).
* The PyTorch model's keys and shapes are the official ones, checked against a list
  written here from lang-seg's construction code (`lseg_net_zs.py`: `LSegRN`;
  `lseg_blocks_zs.py`: `_make_encoder`, `_make_scratch`, `FeatureFusionBlock_custom`
  with BatchNorm; `lseg_vit_zs.py`: `_make_pretrained_clip_rn101` = CLIP ViT-B/32 +
  torchvision `resnet101` through `_make_resnet_backbone`).
* Sizes, ImageNet re-normalisation, bf16, sharding, episodes' label pairs.
"""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax import optim, sharding
from lseg_jax.convert import langseg, mapping
from lseg_jax.models import lseg

import test_convert_common as common
from test_lseg_parity import check_parity
from test_torch_lseg import (official_batch_norm, official_clip_text_layout,
                             official_scratch_layout)

torch = common.torch
torch_lseg = common.torch_lseg
TEXT_VOCAB = 64


# ---------------------------------------------------------------------------
# Parity with the PyTorch model.
# ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("arch_option,block_depth", [(0, 0), (1, 2)])
def test_full_resnet101_lseg_matches_torch(arch_option, block_depth):
  check_parity("clip_resnet101", arch_option, block_depth, 128, 160)


def test_tiny_resnet_lseg_matches_torch_at_another_size():
  check_parity("tiny_resnet", 0, 0, 96, 32, seed=4)


def test_backbone_sees_imagenet_normalised_images():
  """The PyTorch ResNet backbone's stage outputs are torchvision's on ImageNet-normalised
  pixels, as lang-seg feeds them (`FSSDataset.initialize(imagenet_norm=True)`)."""
  tmodel = common.make_torch_lseg("tiny_resnet")
  pixels = np.random.default_rng(0).uniform(0, 1, (1, 3, 64, 64)).astype(np.float32)
  mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
  std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
  with torch.no_grad():
    ours = tmodel.pretrained(torch.from_numpy((pixels - 0.5) / 0.5))
    p = tmodel.pretrained
    x = torch.from_numpy((pixels - mean) / std)
    theirs = [p.layer1(x)]
    for layer in (p.layer2, p.layer3, p.layer4):
      theirs.append(layer(theirs[-1]))
  for a, b in zip(ours, theirs):
    assert common.rel_error(a.numpy(), b.numpy()) < 1e-5


# ---------------------------------------------------------------------------
# The official key layout.
# ---------------------------------------------------------------------------
def official_lsegrnnetzs_layout():
  """{key: shape} of lang-seg's `LSegRNNetZS(backbone="clip_resnet101", features=256)`
  minus CLIP's image side (`clip_pretrained.visual.*`, `clip_pretrained.logit_scale`)."""
  # clip_pretrained: `clip.load("ViT-B/32")`; its text tower (width 512, 12 layers).
  layout = official_clip_text_layout(512, 512, 12)
  # pretrained: `_make_resnet_backbone(models.resnet101())`: layer1 = Sequential(conv1,
  # bn1, relu, maxpool, layer1); layer2..4; torchvision's Bottleneck (expansion 4,
  # conv1 1x1, conv2 3x3, conv3 1x1, no biases; downsample = 1x1 conv + BN on the
  # first block of each stage).
  layout["pretrained.layer1.0.weight"] = (64, 3, 7, 7)
  official_batch_norm(layout, "pretrained.layer1.1", 64)
  cin = 64
  for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 23, 3)), 1):
    name = "pretrained.layer1.4" if stage == 1 else f"pretrained.layer{stage}"
    for i in range(blocks):
      p = f"{name}.{i}."
      layout[p + "conv1.weight"] = (planes, cin, 1, 1)
      layout[p + "conv2.weight"] = (planes, planes, 3, 3)
      layout[p + "conv3.weight"] = (4 * planes, planes, 1, 1)
      for j, c in ((1, planes), (2, planes), (3, 4 * planes)):
        official_batch_norm(layout, f"{p}bn{j}", c)
      if i == 0:
        layout[p + "downsample.0.weight"] = (4 * planes, cin, 1, 1)
        official_batch_norm(layout, p + "downsample.1", 4 * planes)
      cin = 4 * planes
  # scratch: `_make_scratch([256, 512, 1024, 2048], 256)`, four fusion blocks with
  # BatchNorm (`LSegRNNetZS` sets use_bn=True), `head1` to CLIP's 512.
  layout.update(official_scratch_layout((256, 512, 1024, 2048), 512))
  return layout


def test_full_size_key_layout_is_official():
  with torch.device("meta"):
    model = torch_lseg.LSegTorch(backbone="clip_resnet101")
  ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  expected = official_lsegrnnetzs_layout()
  assert sorted(set(ours) ^ set(expected)) == []
  assert {k: s for k, s in ours.items() if expected[k] != s} == {}
  # The image encoder is torchvision's resnet101 (minus `fc`), regrouped.
  tv_resnet = pytest.importorskip("torchvision.models.resnet")
  with torch.device("meta"):
    tv = tv_resnet.resnet101()
  renamed = {}
  for k, v in tv.state_dict().items():
    if k.startswith("fc."):
      continue
    k = (k.replace("conv1.", "layer1.0.", 1) if k.startswith("conv1.")
         else k.replace("bn1.", "layer1.1.", 1) if k.startswith("bn1.")
         else k.replace("layer1.", "layer1.4.", 1))
    renamed["pretrained." + k] = tuple(v.shape)
  assert renamed == {k: s for k, s in ours.items() if k.startswith("pretrained.")}
  # The JAX model maps onto exactly these keys.
  cfg = lseg.LSegConfig(backbone="clip_resnet101")
  abstract = nnx.eval_shape(lambda: lseg.LSeg(cfg, rngs=nnx.Rngs(0)))
  sd = common.meta_state_dict(model)
  assert langseg.infer_config(sd) == cfg
  params = mapping.torch_to_nnx(sd, langseg.table_for(cfg), abstract)
  assert set(mapping.flatten_params(params)) == set(mapping.flatten_params(abstract))


def test_from_checkpoint_infers_the_resnet(tmp_path):
  model = common.make_torch_lseg("tiny_resnet", seed=2)
  torch.save({"state_dict": {"net." + k: v for k, v in model.state_dict().items()},
              "epoch": 3}, tmp_path / "m.ckpt")
  loaded = torch_lseg.LSegTorch.from_checkpoint(tmp_path / "m.ckpt")
  assert loaded.config == model.config
  x = torch.randn(1, 3, 64, 64)
  text = torch.randn(2, 16)
  with torch.no_grad():
    torch.testing.assert_close(loaded(x, text), model(x, text), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# The JAX model: sizes, bf16, sharding, episodes.
# ---------------------------------------------------------------------------
def make_model(dtype="float32", seed=0, **kw):
  cfg = lseg.LSegConfig(backbone="tiny_resnet", dtype=dtype, text_vocab_size=TEXT_VOCAB, **kw)
  model = lseg.LSeg(cfg, rngs=nnx.Rngs(seed))
  model.eval()
  return model


@nnx.jit
def _forward(model, images, text):
  return model(images, text)


def test_any_multiple_of_32_works_other_sizes_are_refused():
  model = make_model()
  assert model.size_multiple == 32 and model.patch_size is None
  text = jnp.ones((3, model.text_dim))
  for h, w in ((32, 96), (160, 64)):
    assert _forward(model, jnp.zeros((1, h, w, 3)), text).shape == (1, h, w, 3)
  for h, w in ((48, 64), (64, 100)):
    with pytest.raises(ValueError, match=rf"image size {h}x{w} is not a multiple of 32 "
                                         r"\(backbone tiny_resnet\)"):
      model(jnp.zeros((1, h, w, 3)), text)


def test_bfloat16_compute_float32_params_and_logits():
  m32, m16 = make_model("float32"), make_model("bfloat16")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m16, nnx.Param)))
  assert all(x.dtype in (jnp.float32, jnp.int32)
             for x in jax.tree.leaves(nnx.state(m16, nnx.BatchStat)))
  images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3), minval=-1, maxval=1)
  text = jax.random.normal(jax.random.key(1), (4, m32.text_dim))
  out32, out16 = _forward(m32, images, text), _forward(m16, images, text)
  assert out16.dtype == jnp.float32
  rel = float(jnp.max(jnp.abs(out16 - out32)) / jnp.max(jnp.abs(out32)))
  assert rel < 0.1, rel


def test_sharded_forward_and_parameters():
  """Parameters split by the default rules over an 8-device (data 2, fsdp 4) mesh; a
  batch sharded over both axes gives the single-device logits, in train mode too
  (BatchNorm statistics over the global batch)."""
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  model = make_model(arch_option=1, block_depth=2)
  _, params, _, rest = optim.partition(model, ("clip_pretrained/.*",))
  shardings = sharding.tree_shardings(params, mesh, sharding.DEFAULT_RULES, min_size=2 ** 14)
  specs = dict(zip(sharding.names(params), (s.spec for s in jax.tree.leaves(shardings))))
  assert specs["pretrained/model/layer4/0/conv2/kernel"] != sharding.P()  # [3, 3, 512, 512]
  assert specs["pretrained/model/bn1/scale"] == sharding.P()  # 64 elements: replicated
  sharding.tree_shardings(rest, mesh, sharding.DEFAULT_RULES, min_size=2 ** 14)

  images = jax.random.uniform(jax.random.key(0), (8, 64, 64, 3), minval=-1, maxval=1)
  text = jax.random.normal(jax.random.key(1), (3, model.text_dim))
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, images, text):
    m = nnx.merge(graphdef, state)
    return m(images, text), nnx.state(m)

  expected, _ = forward(state, images, text)
  place = lambda state: jax.device_put(state, sharding.tree_shardings(
      state, mesh, sharding.DEFAULT_RULES, min_size=2 ** 14))
  sharded_state = place(state)
  out, _ = forward(sharded_state, jax.device_put(images, sharding.batch_sharding(mesh)), text)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=0, atol=1e-4)

  model.train()
  graphdef, state = nnx.split(model)
  expected, stats = forward(state, images, text)
  out, sharded_stats = forward(place(state), jax.device_put(
      images, sharding.batch_sharding(mesh)), text)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=0, atol=1e-4)
  key = "pretrained/model/layer4/0/bn3/mean"
  np.testing.assert_allclose(np.asarray(mapping.flatten_params(sharded_stats)[key]),
                             np.asarray(mapping.flatten_params(stats)[key]),
                             rtol=1e-5, atol=1e-6)


def test_episode_label_pairs():
  """Zero-shot episodes: a table ["other", classes...], each example keeps "other" and
  its class (lang-seg's ['others', class] per example)."""
  model = make_model()
  images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3), minval=-1, maxval=1)
  table = jax.random.normal(jax.random.key(1), (5, model.text_dim))
  mask = jnp.array([[True, False, True, False, False], [True, False, False, False, True]])
  out = model(images, table, mask)
  assert out.shape == (2, 64, 64, 5)
  for i, cls in enumerate((2, 4)):
    pair = model(images[i:i + 1], table[jnp.array([0, cls])])[0]
    np.testing.assert_allclose(np.asarray(out[i][..., jnp.array([0, cls])]),
                               np.asarray(pair), rtol=0, atol=1e-5)
    assert np.isneginf(np.asarray(out[i][..., ~mask[i]])).all()


@pytest.mark.slow
def test_training_steps_on_a_sharded_mesh(tmp_path):
  """The training loop with the ResNet backbone: (data 2, fsdp 4) mesh, BatchNorm in
  training mode (the ResNet's running statistics move), finite losses, a checkpoint
  that loads back as the same model."""
  from lseg_jax import checkpoint, train  # pylint: disable=g-import-not-at-top
  import test_train  # pylint: disable=g-import-not-at-top
  config = test_train.make_config(tmp_path / "tfds", **{
      "model.backbone": "tiny_resnet", "total_steps": 3, "checkpoint_every_steps": 3})
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  losses = test_train.losses(str(tmp_path / "run"))
  assert sorted(losses) == [1, 2, 3] and np.isfinite(list(losses.values())).all()
  rest = mapping.flatten_params(jax.device_get(summary["state"]["rest"]))
  stats = rest["pretrained/model/layer2/0/bn2/mean"]
  assert np.abs(np.asarray(stats)).max() > 0  # initialised at 0, updated by 3 steps
  assert int(rest["pretrained/model/bn1/num_batches_tracked"]) == 3
  model, _ = checkpoint.load_model(str(tmp_path / "run" / "checkpoints"))
  assert model.cfg.backbone == "tiny_resnet"
  np.testing.assert_array_equal(
      np.asarray(mapping.flatten_params(model)["pretrained/model/layer2/0/bn2/mean"]),
      np.asarray(stats))
