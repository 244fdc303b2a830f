"""`attention`: the padded-and-masked paths (cuDNN's, the TPU kernel's) equal plain attention;
"auto" per target platform."""
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


@pytest.mark.parametrize("n", [37, 129])
def test_tpu_flash_attention_equals_xla_attention(n):
  """The Pallas TPU kernel (run by Pallas' TPU interpreter on this CPU) with the tokens
  padded to 128 and the padding in a segment of its own: values and gradients equal
  XLA's attention (float32, relative error < 1e-5 per tensor; measured ~2e-7)."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  q, k, v = _qkv(2, n, 2, 64, seed=n)
  cot = jax.random.normal(jax.random.key(9), q.shape)
  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")

  def value_and_grads(fn):
    loss = lambda *a: jnp.sum(fn(*a) * cot)
    return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  with pltpu.force_tpu_interpret_mode():
    out, grads = value_and_grads(jax.jit(attention.tpu_flash_attention))
  ref, ref_grads = value_and_grads(plain)
  for a, b in zip((out, *grads), (ref, *ref_grads)):
    assert a.shape == b.shape
    assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) < 1e-5


def test_auto_follows_the_target_platform():
  with attention.compiling_for("tpu"):
    assert attention.resolve("auto", jnp.bfloat16, 64) == "tpu_flash"
  with attention.compiling_for("cpu"):
    assert attention.resolve("auto", jnp.bfloat16, 64) == "xla"
  assert attention.resolve("tpu_flash", jnp.float32, 64) == "tpu_flash"


def test_auto_is_xla_off_nvidia_gpus_and_tpus():
  if jax.default_backend() in ("gpu", "tpu"):
    pytest.skip("checks the choice on CPUs")
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
