"""`conv.pointwise_conv`: 1x1 convolutions as matrix products, everything else unchanged."""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax.models import conv


def _pair(kernel_size, **kwargs):
  ref = nnx.Conv(6, 5, kernel_size, rngs=nnx.Rngs(0), **kwargs)
  ours = nnx.Conv(6, 5, kernel_size, conv_general_dilated=conv.pointwise_conv,
                  rngs=nnx.Rngs(0), **kwargs)
  return ref, ours


def _value_and_grads(model, x):
  def loss(model, x):
    return jnp.sum(jnp.sin(model(x)))
  return jax.value_and_grad(loss, argnums=(0, 1))(model, x)


@pytest.mark.parametrize("kernel_size,kwargs", [
    ((1, 1), {}), ((1, 1), {"use_bias": False}), ((1, 1), {"padding": "VALID"}),
    ((3, 3), {"padding": ((1, 1), (1, 1))}), ((1, 1), {"strides": 2}),
    ((2, 2), {"strides": 2, "padding": "VALID"})])
def test_pointwise_conv_equals_lax_conv_with_gradients(kernel_size, kwargs):
  ref, ours = _pair(kernel_size, **kwargs)
  x = jnp.asarray(np.random.RandomState(0).randn(2, 8, 6, 6), jnp.float32)
  (v_ref, (gm_ref, gx_ref)), (v, (gm, gx)) = _value_and_grads(ref, x), _value_and_grads(ours, x)
  np.testing.assert_allclose(v, v_ref, rtol=1e-6)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(nnx.state(gm)), jax.tree.leaves(nnx.state(gm_ref))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_pointwise_conv_is_a_dot_and_keeps_conv_parameters():
  layer = conv.Conv1x1(6, 5, rngs=nnx.Rngs(0))
  assert layer.kernel.shape == (1, 1, 6, 5) and layer.bias.shape == (5,)
  text = str(jax.make_jaxpr(lambda x: layer(x))(jnp.ones((2, 4, 4, 6))))
  assert "dot_general" in text and "conv_general_dilated" not in text
  # Same initialisation as nnx.Conv: checkpoints and seeds are unaffected.
  ref = nnx.Conv(6, 5, (1, 1), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(layer.kernel[...], ref.kernel[...])
