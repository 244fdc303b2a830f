"""`attention`: the padded-and-masked path equals plain attention; "auto" on this backend."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax.models import attention


def _qkv(b, n, heads, head_dim, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, (b, n, heads, head_dim), jnp.float32) for k in keys]


@pytest.mark.parametrize("n,multiple", [(5, 64), (145, 64), (64, 64), (37, 8)])
def test_padded_and_masked_attention_equals_unpadded(n, multiple):
  """The cuDNN path's padding to a multiple of 64 with sequence-length masks, run
  with XLA: values and gradients equal unpadded attention."""
  q, k, v = _qkv(2, n, 3, 16)
  cot = jax.random.normal(jax.random.key(9), q.shape)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * cot)
  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  padded = lambda q, k, v: attention.padded_attention(q, k, v, multiple, "xla")
  out, ref = padded(q, k, v), plain(q, k, v)
  assert out.shape == ref.shape
  assert float(jnp.max(jnp.abs(out - ref))) < 1e-5
  grads = jax.grad(lambda *a: loss(padded, *a), argnums=(0, 1, 2))(q, k, v)
  ref_grads = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(grads, ref_grads):
    assert bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.max(jnp.abs(g - r))) < 1e-5


def test_auto_is_xla_off_nvidia_gpus():
  if jax.default_backend() == "gpu":
    pytest.skip("checks the choice on CPU and TPU")
  for dtype in (jnp.float32, jnp.bfloat16):
    assert attention.resolve("auto", dtype, 64) == "xla"
  q, k, v = _qkv(2, 7, 2, 8)
  np.testing.assert_array_equal(
      attention.dot_product_attention(q, k, v, "auto"),
      jax.nn.dot_product_attention(q, k, v, implementation="xla"))


def test_explicit_implementations_are_kept_and_unknown_rejected():
  assert attention.resolve("xla", jnp.bfloat16, 64) == "xla"
  assert attention.resolve("cudnn", jnp.float32, 64) == "cudnn"
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    attention.resolve("flash", jnp.float32, 64)
