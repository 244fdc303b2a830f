"""Model behaviour that needs no PyTorch: label equivariance, masking, bad input, bf16.

Parity against PyTorch references lives in test_resize_parity.py, test_vit_parity.py
and test_lseg_parity.py.
"""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax.models import lseg, spatial_reg

TEXT_VOCAB = 64


def make_model(backbone="tiny_vit32", arch_option=1, block_depth=2, dtype="float32", seed=0,
               **config):
  cfg = lseg.LSegConfig(backbone=backbone, arch_option=arch_option, block_depth=block_depth,
                        activation="lrelu", dtype=dtype, text_vocab_size=TEXT_VOCAB, **config)
  model = lseg.LSeg(cfg, rngs=nnx.Rngs(seed))
  model.eval()
  return model


def inputs(model, batch=2, h=64, w=96, labels=5, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  images = jax.random.uniform(k1, (batch, h, w, 3), minval=-1, maxval=1)
  text = jax.random.normal(k2, (labels, model.text_dim))
  return images, text


@pytest.mark.parametrize("arch_option", [0, 1, 2])
@pytest.mark.parametrize("backbone", ["tiny_vit16", "tiny_vit32"])
def test_permuting_labels_permutes_logits(backbone, arch_option):
  model = make_model(backbone, arch_option)
  images, text = inputs(model)
  perm = np.array([3, 0, 4, 1, 2])
  out = model(images, text)
  out_perm = model(images, text[perm])
  assert out.shape == (2, 64, 96, 5) and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out_perm), np.asarray(out)[..., perm])


@pytest.mark.parametrize("arch_option", [0, 1, 2])
def test_masked_label_changes_nothing(arch_option):
  model = make_model("tiny_vit32", arch_option)
  images, text = inputs(model, labels=4)
  extra = jax.random.normal(jax.random.key(7), (1, model.text_dim)) * 100
  base = model(images, text)
  mask = jnp.array([[True] * 4 + [False]] * 2)
  with_extra = model(images, jnp.concatenate([text, extra]), mask)
  np.testing.assert_array_equal(np.asarray(with_extra[..., :4]), np.asarray(base))
  assert np.all(np.isneginf(np.asarray(with_extra[..., 4])))


def test_per_example_label_sets_equal_separate_calls():
  model = make_model("tiny_vit32", 1)
  images, text = inputs(model, labels=3)
  text_b = jnp.stack([text, text[::-1]])
  out = model(images, text_b)
  np.testing.assert_allclose(out[0], model(images[:1], text)[0], rtol=0, atol=1e-5)
  np.testing.assert_allclose(out[1], model(images[1:], text[::-1])[0], rtol=0, atol=1e-5)


def test_mask_per_example_matches_smaller_label_set():
  model = make_model("tiny_vit32", 1)
  images, text = inputs(model, labels=4)
  mask = jnp.array([[True, False, True, True], [True, True, False, False]])
  out = model(images, text, mask)
  ref0 = model(images[:1], text[jnp.array([0, 2, 3])])
  ref1 = model(images[1:], text[:2])
  np.testing.assert_allclose(out[0][..., jnp.array([0, 2, 3])], ref0[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[1][..., :2], ref1[0], atol=1e-5, rtol=0)


def test_pixel_embeddings_unit_norm():
  model = make_model()
  images, _ = inputs(model)
  emb = model.embed_pixels(images)
  assert emb.shape == (2, 32, 48, model.text_dim)
  np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("shape,match", [
    ((2, 64, 64), r"expected images \[B, H, W, 3\]"),
    ((2, 64, 64, 4), r"expected images \[B, H, W, 3\]"),
    ((2, 3, 64, 64), r"expected images \[B, H, W, 3\]"),
    ((1, 80, 64, 3), r"image size 80x64 is not a multiple of 32"),
])
def test_bad_images(shape, match):
  model = make_model()
  _, text = inputs(model)
  with pytest.raises(ValueError, match=match):
    model(jnp.zeros(shape), text)


def test_patch16_decoder_needs_multiple_of_32():
  model = make_model("tiny_vit16")
  _, text = inputs(model)
  with pytest.raises(ValueError, match=r"48x64 is not a multiple of 32"):
    model(jnp.zeros((1, 48, 64, 3)), text)


def test_bad_label_inputs():
  model = make_model()
  images, text = inputs(model)
  with pytest.raises(ValueError, match="empty label set"):
    model(images, text[:0])
  with pytest.raises(ValueError, match=r"expected text_emb \[L, 16\]"):
    model(images, jnp.zeros((3, 7)))
  with pytest.raises(ValueError, match=r"text_emb has batch 3"):
    model(images, jnp.zeros((3, 5, 16)))
  with pytest.raises(ValueError, match=r"expected label_mask \[2, 5\]"):
    model(images, text, jnp.ones((2, 4), bool))


def test_bad_config_values():
  with pytest.raises(ValueError, match="unknown backbone 'vit_huge'"):
    lseg.LSegConfig(backbone="vit_huge")
  with pytest.raises(ValueError, match="unknown arch_option 3; expected one of 0, 1, 2"):
    lseg.LSegConfig(arch_option=3)
  with pytest.raises(ValueError, match="unknown activation 'gelu'"):
    spatial_reg.SpatialRegularization(1, 2, "gelu", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"unknown LSegConfig fields \['colour'\]"):
    lseg.LSegConfig.from_dict({"colour": 1})
  with pytest.raises(ValueError, match="unknown attention 'flash'; expected one of 'auto'"):
    lseg.LSegConfig(attention="flash")
  with pytest.raises(ValueError, match="unknown remat 'some'; expected one of 'none'"):
    lseg.LSegConfig(remat="some")
  with pytest.raises(ValueError, match="unknown readout 'concat'"):
    lseg.LSegConfig(readout="concat")
  with pytest.raises(ValueError, match="unknown activation 'gelu'"):
    lseg.LSegConfig(activation="gelu")


def test_bfloat16_compute_float32_params_and_logits():
  m32 = make_model(dtype="float32")
  m16 = make_model(dtype="bfloat16")
  params = nnx.state(m16, nnx.Param)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  images, text = inputs(m32)
  out32, out16 = m32(images, text), m16(images, text)
  assert out16.dtype == jnp.float32
  rel = float(jnp.max(jnp.abs(out16 - out32)) / jnp.max(jnp.abs(out32)))
  assert rel < 0.1, rel


def test_batchnorm_train_mode_updates_running_stats():
  model = make_model()
  images, text = inputs(model)
  bn = model.scratch.refinenet1.resConfUnit2.bn1
  before = np.asarray(bn.mean[...]).copy()
  model.train()
  model(images, text)
  assert int(bn.num_batches_tracked[...]) == 1
  assert not np.allclose(np.asarray(bn.mean[...]), before)
  model.eval()
  after = np.asarray(bn.mean[...]).copy()
  model(images, text)
  np.testing.assert_array_equal(np.asarray(bn.mean[...]), after)


def _train_loss_and_grads(model, images, text, labels):
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.pure(params), nnx.pure(rest)

  def loss_fn(params):
    m = nnx.merge(graphdef, params, rest)
    logp = jax.nn.log_softmax(m(images, text), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))
  return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.parametrize("backbone", ["tiny_vit16", "tiny_vit32"])
def test_remat_keeps_loss_and_gradients(backbone):
  """Rematerialising the ViT blocks changes what is stored, not what is computed."""
  images, text = inputs(make_model(backbone))
  labels = jax.random.randint(jax.random.key(1), images.shape[:3], 0, text.shape[0])
  ref_loss, ref_grads = _train_loss_and_grads(make_model(backbone, remat="none"), images, text,
                                              labels)
  for remat in ("dots", "full"):
    model = make_model(backbone, remat=remat)
    jaxpr = str(jax.make_jaxpr(lambda x: model(x, text))(images))
    assert "checkpoint" in jaxpr or "remat" in jaxpr, remat
    loss, grads = _train_loss_and_grads(model, images, text, labels)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for (path, g), ref in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(ref_grads)):
      scale = float(jnp.max(jnp.abs(ref))) or 1.0
      assert float(jnp.max(jnp.abs(g - ref))) <= 1e-5 * scale, (remat, jax.tree_util.keystr(path))
