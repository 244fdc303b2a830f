"""Sliding-window multi-scale inference: geometry, identities and parity with the reference.

The PyTorch reference below re-states the semantics of PyTorch-Encoding's
`MultiEvalModule.forward` (as lang-seg's `test_lseg.py` uses it) for a toy
convolutional "model", so the comparison checks the protocol, not a network.
"""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax import inference
from lseg_jax.models import lseg

TEXT_VOCAB = 64


@pytest.fixture(scope="module")
def model():
  # One model for the module: building one costs dozens of small compilations.
  cfg = lseg.LSegConfig(backbone="tiny_vit32", arch_option=1, block_depth=1,
                        text_vocab_size=TEXT_VOCAB)
  model = lseg.LSeg(cfg, rngs=nnx.Rngs(0))
  model.eval()
  return model


def random_inputs(model, h, w, labels=4, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  image = np.asarray(jax.random.uniform(k1, (h, w, 3), minval=-1, maxval=1))
  text = jax.random.normal(k2, (labels, model.text_dim))
  return image, text


# --------------------------------------------------------------------------
# Geometry.
# --------------------------------------------------------------------------
def test_scaled_size_matches_the_official_rounding():
  assert inference.scaled_size(512, 683, 1.0, 520) == (390, 520)
  assert inference.scaled_size(683, 512, 1.75, 520) == (910, 682)
  assert inference.scaled_size(300, 300, 0.75, 520) == (390, 390)
  assert inference.scaled_size(10, 20, 0.5, 520) == (130, 260)


@pytest.mark.parametrize("crop,stride_rate", [(480, 2 / 3), (64, 2 / 3), (32, 0.5), (48, 1.0)])
def test_windows_cover_every_pixel_of_the_canvas(crop, stride_rate):
  window = inference.SlidingWindow(crop_size=crop, stride_rate=stride_rate)
  for height in [1, crop - 1, crop, crop + 1, 2 * crop - 7, 3 * crop + 5]:
    for width in [crop // 2, crop, crop + window.stride, 2 * crop + 1]:
      (ph, pw), origins = inference.window_origins(height, width, crop, window.stride)
      assert ph >= max(height, crop) and pw >= max(width, crop)
      count = np.zeros((ph, pw), int)
      for y0, x0 in origins:
        assert y0 < ph and x0 < pw
        count[y0:y0 + crop, x0:x0 + crop] += 1
      assert count.min() >= 1, (height, width)


def test_official_stride_is_320_for_crop_480():
  window = inference.SlidingWindow()
  assert window.stride == 320
  (ph, pw), origins = inference.window_origins(682, 910, 480, 320)
  assert (ph, pw) == (682, 910)
  assert origins == [(0, 0), (0, 320), (0, 640), (320, 0), (320, 320), (320, 640)]


def test_bad_window_parameters_raise(model):
  with pytest.raises(ValueError, match="stride_rate"):
    inference.SlidingWindow(stride_rate=0)
  with pytest.raises(ValueError, match="scales"):
    inference.SlidingWindow(scales=())
  with pytest.raises(ValueError, match="multiple of 32"):
    inference.SlidingWindowInference.for_model(model, inference.SlidingWindow(crop_size=50))


# --------------------------------------------------------------------------
# Identities on the real (tiny) model.
# --------------------------------------------------------------------------
def test_single_scale_equal_to_crop_is_plain_inference(model):
  image, text = random_inputs(model, 64, 64)
  window = inference.SlidingWindow(scales=(1.0,), base_size=64, crop_size=64, flip=False)
  infer = inference.SlidingWindowInference.for_model(model, window)
  scores = infer(image, text)
  # Exactly the runner's output on the whole image: the geometry adds nothing.
  direct = infer.runner(image[None], text, np.ones((1, 4), bool))[0]
  np.testing.assert_array_equal(scores, direct)
  # And a plain model call, up to XLA fusing the two programs differently.
  plain = np.asarray(jax.jit(model)(jnp.asarray(image)[None], text)[0])
  assert np.abs(scores - plain).max() / np.abs(plain).max() < 1e-6


def test_flip_is_exactly_symmetric(model):
  image, text = random_inputs(model, 64, 64, seed=1)
  window = inference.SlidingWindow(scales=(1.0,), base_size=64, crop_size=64, flip=True)
  infer = inference.SlidingWindowInference.for_model(model, window)
  scores = infer(image, text)
  mirrored = infer(image[:, ::-1].copy(), text)
  np.testing.assert_array_equal(mirrored, scores[:, ::-1])


def test_label_mask_gives_minus_inf_and_keeps_the_rest(model):
  image, text = random_inputs(model, 40, 50, labels=3)
  window = inference.SlidingWindow(scales=(0.75, 1.0), base_size=64, crop_size=32)
  infer = inference.SlidingWindowInference.for_model(model, window)
  full = infer(image, text)
  masked = infer(image, text, np.array([True, False, True]))
  assert np.all(np.isneginf(masked[..., 1]))
  np.testing.assert_allclose(masked[..., [0, 2]], full[..., [0, 2]], rtol=1e-6, atol=1e-5)


def test_stream_batches_across_images_like_one_by_one(model):
  _, text = random_inputs(model, 8, 8)
  rng = np.random.default_rng(0)
  images = [rng.uniform(-1, 1, size=s).astype(np.float32)
            for s in [(40, 70, 3), (33, 33, 3), (90, 20, 3)]]
  window = inference.SlidingWindow(scales=(0.5, 1.0, 1.5), base_size=64, crop_size=32)
  infer = inference.SlidingWindowInference.for_model(model, window)
  streamed = list(infer.stream([(im, None, i) for i, im in enumerate(images)], text))
  assert [p for _, p in streamed] == [0, 1, 2]
  for (scores, i) in streamed:
    one = infer(images[i], text)
    assert scores.shape == images[i].shape[:2] + (4,)
    np.testing.assert_allclose(scores, one, rtol=1e-6, atol=1e-5)


def test_stream_scores_images_over_their_own_label_rows(model):
  # Each image scored over its own two rows of a 6-label table: the same scores as
  # the whole table under the matching mask (arch_option 1: the Bottleneck max sees
  # the same two labels), up to float32 rounding of the matmul.
  _, text = random_inputs(model, 8, 8, labels=6)
  rng = np.random.default_rng(1)
  images = [rng.uniform(-1, 1, size=s).astype(np.float32) for s in [(40, 70, 3), (33, 33, 3)]]
  rows = [np.array([0, 3]), np.array([0, 5])]
  window = inference.SlidingWindow(scales=(0.5, 1.0), base_size=64, crop_size=32)
  infer = inference.SlidingWindowInference.for_model(model, window)
  streamed = list(infer.stream([(im, r, i) for i, (im, r) in enumerate(zip(images, rows))],
                               text))
  for scores, i in streamed:
    assert scores.shape == images[i].shape[:2] + (2,)
    mask = np.zeros(6, bool)
    mask[rows[i]] = True
    np.testing.assert_allclose(scores, infer(images[i], text, mask)[..., rows[i]],
                               rtol=1e-6, atol=1e-5)
  with pytest.raises(ValueError, match="same number"):
    list(infer.stream([(images[0], rows[0], 0), (images[1], np.array([0, 1, 2]), 1)], text))
  with pytest.raises(ValueError, match="one kind"):
    list(infer.stream([(images[0], rows[0], 0), (images[1], None, 1)], text))
  with pytest.raises(ValueError, match=r"rows in \[0, 6\)"):
    list(infer.stream([(images[0], np.array([0, 6]), 0)], text))


# --------------------------------------------------------------------------
# Parity with the PyTorch reference semantics on a toy conv "model".
# --------------------------------------------------------------------------
def _toy_apply(state, images, text_emb, label_mask):
  del text_emb, label_mask
  out = jax.lax.conv_general_dilated(
      images, state["kernel"], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
  return out + state["bias"]


def _torch_reference(image, kernel, bias, window):
  """MultiEvalModule semantics, batch 1, NCHW torch tensors."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  import math  # pylint: disable=g-import-not-at-top

  w = torch.from_numpy(np.transpose(kernel, (3, 2, 0, 1)).copy())
  b = torch.from_numpy(bias)

  def net(x):
    return F.conv2d(x, w, b, padding=1)

  def infer(x):
    out = net(x)
    if window.flip:
      out = out + torch.flip(net(torch.flip(x, [3])), [3])
    return out

  def pad(x, size):
    ph, pw = max(size - x.shape[2], 0), max(size - x.shape[3], 0)
    return F.pad(x, (0, pw, 0, ph), value=window.pad_value)

  up = dict(mode="bilinear", align_corners=True)
  x = torch.from_numpy(np.transpose(image, (2, 0, 1))[None].copy())
  _, _, h, wd = x.shape
  crop, stride = window.crop_size, int(window.crop_size * window.stride_rate)
  scores = torch.zeros(1, kernel.shape[-1], h, wd)
  for scale in window.scales:
    long = int(math.ceil(window.base_size * scale))
    if h > wd:
      height, width, short = long, int(1.0 * wd * long / h + 0.5), None
      short = width
    else:
      width, height = long, int(1.0 * h * long / wd + 0.5)
      short = height
    cur = F.interpolate(x, (height, width), **up)
    if long <= crop:
      out = infer(pad(cur, crop))[:, :, :height, :width]
    else:
      padded = pad(cur, crop) if short < crop else cur
      ph, pw = padded.shape[2:]
      hg = int(math.ceil(1.0 * (ph - crop) / stride)) + 1
      wg = int(math.ceil(1.0 * (pw - crop) / stride)) + 1
      out = torch.zeros(1, kernel.shape[-1], ph, pw)
      cnt = torch.zeros(1, 1, ph, pw)
      for i in range(hg):
        for j in range(wg):
          h0, w0 = i * stride, j * stride
          h1, w1 = min(h0 + crop, ph), min(w0 + crop, pw)
          o = infer(pad(padded[:, :, h0:h1, w0:w1], crop))
          out[:, :, h0:h1, w0:w1] += o[:, :, :h1 - h0, :w1 - w0]
          cnt[:, :, h0:h1, w0:w1] += 1
      out = (out / cnt)[:, :, :height, :width]
    scores += F.interpolate(out, (h, wd), **up)
  return np.transpose(scores[0].numpy(), (1, 2, 0))


@pytest.mark.parametrize("shape", [(30, 45), (52, 20), (36, 36)])
@pytest.mark.parametrize("flip", [False, True])
def test_matches_reference_protocol(shape, flip):
  pytest.importorskip("torch")
  rng = np.random.default_rng(3)
  state = {"kernel": rng.normal(size=(3, 3, 3, 5)).astype(np.float32),
           "bias": rng.normal(size=(5,)).astype(np.float32)}
  image = rng.uniform(-1, 1, size=shape + (3,)).astype(np.float32)
  # base 40, crop 32: scales 0.5/0.75 fit one window, the others slide.
  window = inference.SlidingWindow(base_size=40, crop_size=32, flip=flip)
  runner = inference.CropRunner(_toy_apply, state, flip=flip, batch_size=8)
  ours = inference.SlidingWindowInference(runner, window)(image, jnp.zeros((5, 1)))
  ref = _torch_reference(image, state["kernel"], state["bias"], window)
  rel = np.abs(ours - ref).max() / np.abs(ref).max()
  assert rel < 1e-5, rel


def test_numpy_resize_matches_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(4)
  x = rng.normal(size=(13, 21, 3)).astype(np.float32)
  for size in [(7, 9), (26, 40), (13, 50)]:
    for ac in (True, False):
      ours = inference.resize_image(x, size, align_corners=ac)
      ref = torch.nn.functional.interpolate(
          torch.from_numpy(np.transpose(x, (2, 0, 1))[None].copy()), size, mode="bilinear",
          align_corners=ac)[0].numpy().transpose(1, 2, 0)
      assert np.abs(ours - ref).max() / np.abs(ref).max() < 2e-6, (size, ac)
