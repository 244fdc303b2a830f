"""Building blocks vs their PyTorch originals: resize, ConvTranspose, BatchNorm, regularisation.

Tolerance: float32 relative error max|a - b| / max|b| < 1e-5.
"""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from lseg_jax.models import attention, dpt, resize, spatial_reg  # noqa: E402

RTOL = 1e-5
# Upsamplings are stencils on CPUs and GPUs, products with the interpolation matrix in
# programs compiled for TPUs: both are checked here, on the CPU.
TARGETS = pytest.mark.parametrize("target", ["cpu", "tpu"])


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("src,dst", [((24, 24), (30, 40)), ((12, 12), (12, 16)),
                                     ((7, 9), (14, 18)), ((24, 24), (5, 7)), ((1, 3), (4, 6))])
def test_resize_bilinear_matches_torch(src, dst, align_corners):
  x = np.random.RandomState(0).randn(2, *src, 5).astype(np.float32)
  ours = resize.resize_bilinear(jnp.asarray(x), dst, align_corners=align_corners)
  ref = F.interpolate(nchw(x), size=dst, mode="bilinear", align_corners=align_corners)
  assert ours.shape == (2, *dst, 5)
  assert rel_err(ours, nhwc(ref)) < RTOL


@TARGETS
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("src,dst", [((12, 12), (24, 24)), ((7, 9), (14, 18)), ((3, 5), (12, 20)),
                                     ((1, 3), (4, 6)), ((24, 24), (30, 30)), ((24, 24), (5, 7)),
                                     ((4, 4), (12, 12))])
def test_resize_bilinear_value_and_gradient_match_torch_to_1e6(src, dst, align_corners, target):
  """Both code paths (integer-factor stencil, interpolation matrix) and both corner
  conventions, forward and backward, against torch autograd."""
  rng = np.random.RandomState(0)
  x = rng.randn(2, *src, 3).astype(np.float32)
  g = rng.randn(2, *dst, 3).astype(np.float32)
  with attention.compiling_for(target):
    ours, vjp = jax.vjp(lambda v: resize.resize_bilinear(v, dst, align_corners), jnp.asarray(x))
    (grad,) = vjp(jnp.asarray(g))
  xt = nchw(x).requires_grad_()
  ref = F.interpolate(xt, size=dst, mode="bilinear", align_corners=align_corners)
  ref.backward(nchw(g))
  assert rel_err(ours, nhwc(ref)) < 1e-6
  assert rel_err(grad, nhwc(xt.grad)) < 1e-6


@TARGETS
@pytest.mark.parametrize("src", [(12, 12), (7, 9), (1, 3), (2, 2)])
def test_upsample2x_phases_and_squared_norms_match_torch(src, target):
  """The x2 upsampling's phases are the interleaved result's pixels, bit for bit; the
  squared norms of the upsampled array, made from inner products of the input's
  neighbours, equal torch's to 1e-6 relative, values and gradients."""
  rng = np.random.RandomState(0)
  x = rng.randn(2, *src, 16).astype(np.float32)
  g = rng.randn(2, 2 * src[0], 2 * src[1]).astype(np.float32)
  with attention.compiling_for(target):
    up = resize.upsample2x_align_corners(jnp.asarray(x))
    for (p, q), phase in resize.upsample2x_phases(jnp.asarray(x)).items():
      np.testing.assert_array_equal(phase, up[:, p::2, q::2])
    ours, vjp = jax.vjp(resize.upsampled_squared_norms, jnp.asarray(x))
    (grad,) = vjp(jnp.asarray(g))
  xt = nchw(x).requires_grad_()
  ref = F.interpolate(xt, scale_factor=2, mode="bilinear", align_corners=True).square().sum(1)
  ref.backward(torch.from_numpy(g))
  assert rel_err(ours, ref.detach().numpy()) < 1e-6
  assert rel_err(grad, nhwc(xt.grad)) < 1e-6


@pytest.mark.parametrize("align_corners", [False, True])
def test_axis_taps_are_torch_weights(align_corners):
  """The float32 taps equal PyTorch's interpolation weights bit for bit."""
  for n_in, n_out in [(24, 30), (12, 40), (7, 14), (30, 24), (5, 1), (1, 5)]:
    eye = torch.eye(n_in).reshape(n_in, 1, n_in, 1)
    weights = F.interpolate(eye, size=(n_out, 1), mode="bilinear",
                            align_corners=align_corners)[:, 0, :, 0].numpy().T
    np.testing.assert_array_equal(
        resize.interpolation_matrix(n_in, n_out, align_corners), weights)


@TARGETS
def test_resize_has_no_gather_or_scatter(target):
  """Gradients of gathers are scatter-adds, slow on every backend: none in either path."""
  x = jnp.ones((2, 12, 12, 4))
  for size in [(24, 24), (30, 30)]:
    for align_corners in (False, True):
      f = lambda v: jnp.sum(resize.resize_bilinear(v, size, align_corners) ** 2)
      with attention.compiling_for(target):
        text = str(jax.make_jaxpr(jax.grad(f))(x))
      assert "gather" not in text and "scatter" not in text, text
      assert ("dot_general" in text) == (target == "tpu" or size == (30, 30)), text


def test_upsample2x_matches_torch_scale_factor():
  x = np.random.RandomState(1).randn(1, 15, 20, 4).astype(np.float32)
  ref = F.interpolate(nchw(x), scale_factor=2, mode="bilinear", align_corners=True)
  assert rel_err(resize.upsample2x_align_corners(jnp.asarray(x)), nhwc(ref)) < RTOL


@pytest.mark.parametrize("k", [2, 4, 8])
def test_conv_transpose_matches_torch(k):
  torch.manual_seed(0)
  ref = torch.nn.ConvTranspose2d(6, 5, kernel_size=k, stride=k)
  ours = dpt.ConvTransposeKxK(6, 5, k, dtype=jnp.float32, rngs=nnx.Rngs(0))
  ours.kernel[...] = jnp.asarray(ref.weight.detach().numpy().transpose(2, 3, 0, 1))
  ours.bias[...] = jnp.asarray(ref.bias.detach().numpy())
  x = np.random.RandomState(0).randn(2, 3, 4, 6).astype(np.float32)
  assert rel_err(ours(jnp.asarray(x)), nhwc(ref(nchw(x)))) < RTOL


def test_batchnorm_matches_torch_train_and_eval():
  torch.manual_seed(0)
  ref = torch.nn.BatchNorm2d(4)
  ours = dpt.BatchNorm(4)
  x = np.random.RandomState(0).randn(3, 5, 6, 4).astype(np.float32) * 3 + 1
  for _ in range(2):  # two training steps: running stats (unbiased var) follow torch
    out_ref = ref.train()(nchw(x))
    ours.use_running_average = False
    out = ours(jnp.asarray(x))
    assert rel_err(out, nhwc(out_ref)) < RTOL
  np.testing.assert_allclose(ours.mean[...], ref.running_mean.numpy(), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(ours.var[...], ref.running_var.numpy(), rtol=1e-6)
  assert int(ours.num_batches_tracked[...]) == int(ref.num_batches_tracked)
  ours.use_running_average = True
  assert rel_err(ours(jnp.asarray(x)), nhwc(ref.eval()(nchw(x)))) < RTOL


def _torch_reg(x, weight, bias, arch_option, depth, activation):
  """lang-seg's head_block loop on [B, L, H, W]: one shared 1->1 3x3 conv per label."""
  act = {"relu": F.relu, "lrelu": F.leaky_relu, "tanh": torch.tanh}[activation]

  def block(x, use_act):
    b, c, h, w = x.shape
    y = F.conv2d(x.reshape(-1, 1, h, w), weight, bias, padding=1).view(b, c, h, w)
    if arch_option == 1:
      y = y + x.max(dim=1, keepdim=True)[0]
    return act(y) if use_act else y

  for _ in range(depth - 1):
    x = block(x, True)
  return block(x, False)


@pytest.mark.parametrize("activation", ["relu", "lrelu", "tanh"])
@pytest.mark.parametrize("depth", [0, 1, 2, 4])
@pytest.mark.parametrize("arch_option", [1, 2])
def test_spatial_regularization_matches_torch(arch_option, depth, activation):
  reg = spatial_reg.SpatialRegularization(arch_option, depth, activation, rngs=nnx.Rngs(depth))
  x = np.random.RandomState(0).randn(2, 6, 7, 5).astype(np.float32)
  weight = torch.from_numpy(np.array(reg.kernel[...]))[None, None]
  bias = torch.from_numpy(np.array(reg.bias[...]))[None]
  ref = _torch_reg(nchw(x), weight, bias, arch_option, depth, activation)
  assert rel_err(reg(jnp.asarray(x)), nhwc(ref)) < RTOL
