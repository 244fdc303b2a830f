"""`conv.Conv`: nnx.Conv with 1x1 kernels as matrix products and, on the CPU, stride-1
kernel gradients as a matrix product; values and gradients equal lax's."""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax.models import conv


def _value_and_grads(layer, x):
  y = layer(x)
  cotangent = jnp.asarray(np.random.RandomState(1).randn(*y.shape), jnp.float32)
  grads = jax.grad(lambda layer, x: jnp.sum(layer(x) * cotangent), argnums=(0, 1))(layer, x)
  return y, grads


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("kernel_size,kwargs", [
    ((1, 1), {}), ((1, 1), {"use_bias": False}), ((1, 1), {"padding": "VALID"}),
    ((3, 3), {"padding": ((1, 1), (1, 1)), "use_bias": False}), ((3, 3), {"padding": "SAME"}),
    ((2, 3), {"padding": ((0, 2), (1, 0))}), ((3, 3), {"padding": "VALID"}),
    ((3, 3), {"strides": 2, "padding": ((1, 1), (1, 1))}), ((1, 1), {"strides": 2}),
    ((2, 2), {"strides": 2, "padding": "VALID"})])
def test_conv_equals_nnx_conv_with_gradients(kernel_size, kwargs):
  ref = nnx.Conv(6, 5, kernel_size, rngs=nnx.Rngs(0), **kwargs)
  ours = conv.Conv(6, 5, kernel_size, rngs=nnx.Rngs(0), **kwargs)
  x = jnp.asarray(np.random.RandomState(0).randn(2, 8, 7, 6), jnp.float32)
  (v_ref, (gl_ref, gx_ref)), (v, (gl, gx)) = _value_and_grads(ref, x), _value_and_grads(ours, x)
  assert _rel_err(v, v_ref) < 1e-6
  assert _rel_err(gx, gx_ref) < 1e-6
  leaves, ref_leaves = jax.tree.leaves(nnx.state(gl)), jax.tree.leaves(nnx.state(gl_ref))
  assert len(leaves) == len(ref_leaves)
  for a, b in zip(leaves, ref_leaves):
    assert _rel_err(a, b) < 1e-6


def test_conv_keeps_nnx_parameters_and_lowers_1x1_to_a_dot():
  layer = conv.Conv(6, 5, (1, 1), rngs=nnx.Rngs(0))
  ref = nnx.Conv(6, 5, (1, 1), rngs=nnx.Rngs(0))
  assert layer.kernel.shape == (1, 1, 6, 5) and layer.bias.shape == (5,)
  np.testing.assert_array_equal(layer.kernel[...], ref.kernel[...])  # same seeds, same init
  text = str(jax.make_jaxpr(lambda x: layer(x))(jnp.ones((2, 4, 4, 6))))
  assert "dot_general" in text and "conv_general_dilated" not in text


def test_3x3_kernel_gradient_is_a_matrix_product_on_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("the matrix-product kernel gradient is the CPU path")
  layer = conv.Conv(6, 5, (3, 3), padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0))
  grad = jax.grad(lambda k, x: jnp.sum(conv.conv_general_dilated(
      x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))))
  text = str(jax.make_jaxpr(grad)(layer.kernel[...], jnp.ones((2, 4, 4, 6))))
  # One matrix product for the kernel gradient; the two convolutions are the forward
  # pass and the input gradient.
  assert text.count("dot_general") == 1, text
  assert text.count("conv_general_dilated") == 2, text
