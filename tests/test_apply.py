"""The one model-apply path: `apply.forward` is built once per graph and mesh, equals the
model's own call, and its flip variant is f(x) + flip(f(flip(x)))."""
from flax import nnx
import jax
import numpy as np
import pytest

from lseg_jax import apply
from lseg_jax import sharding
from lseg_jax import text
from lseg_jax.models import lseg


@pytest.fixture(scope="module")
def model():
  cfg = lseg.LSegConfig(backbone="tiny_vit32", arch_option=1, block_depth=1,
                        text_vocab_size=text.BYTE_LEVEL_VOCAB_SIZE)
  model = lseg.LSeg(cfg, rngs=nnx.Rngs(0))
  model.eval()
  return model


def test_forward_is_cached_and_equals_the_model(model):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, jax.local_devices()[:2])
  fn, state = apply.model_apply(model)
  assert apply.forward(fn, mesh) is apply.forward(apply.model_apply(model)[0], mesh)
  assert apply.forward(fn, mesh) is not apply.forward(fn, mesh, flip=True)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 32, 64, 3)).astype(np.float32)
  text_emb = rng.normal(size=(3, model.text_dim)).astype(np.float32)
  mask = np.array([[True, False, True], [True, True, True]])
  logits = apply.forward(fn, mesh)(state, images, text_emb, mask)
  assert logits.sharding.spec == sharding.batch_sharding(mesh).spec
  direct = jax.jit(lambda x: model(x, text_emb, mask))
  np.testing.assert_allclose(logits, direct(images), rtol=1e-6, atol=1e-5)
  assert np.all(np.isneginf(np.asarray(logits)[0, ..., 1]))
  flipped = apply.forward(fn, mesh, flip=True)(state, images, text_emb, mask)
  expected = direct(images) + direct(images[:, :, ::-1])[:, :, ::-1]
  np.testing.assert_allclose(flipped, expected, rtol=1e-6, atol=1e-5)


def test_forward_with_embeddings(model):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.local_devices()[:1])
  fn, state = apply.model_apply(model)
  images = np.random.default_rng(1).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
  text_emb = np.random.default_rng(2).normal(size=(2, model.text_dim)).astype(np.float32)
  logits, emb = apply.forward(fn, mesh, with_embeddings=True)(state, images, text_emb, None)
  direct = jax.jit(lambda x: (model(x, text_emb), model.embed_pixels(x)))
  want_logits, want_emb = direct(images)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(emb, want_emb, rtol=1e-6, atol=1e-6)
