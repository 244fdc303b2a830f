"""HSNet's "square" eval resize against PIL (image) and torch's legacy nearest (mask)."""
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from lseg_jax.data import preprocess


@pytest.mark.parametrize("h,w", [(37, 53), (375, 500), (500, 333), (480, 480)])
def test_square_resize_matches_hsnet(h, w):
  torch = pytest.importorskip("torch")
  rng = np.random.RandomState(h)
  image = rng.randint(0, 256, (h, w, 3), np.uint8)
  mask = rng.randint(-1, 5, (h, w)).astype(np.int32)
  out_image, out_mask = preprocess.eval_preprocess(
      tf.constant(image), tf.constant(mask), mode="square", crop_size=64)
  ref_image = np.asarray(Image.fromarray(image).resize((64, 64), Image.BILINEAR), np.float32)
  ours = (out_image.numpy() + 1) * 127.5
  assert np.abs(ours - ref_image).max() <= 1.0 + 1e-3  # PIL rounds in fixed point
  assert np.mean(np.abs(ours - ref_image) > 0.5) < 0.01
  ref_mask = torch.nn.functional.interpolate(
      torch.from_numpy(mask)[None, None].float(), (64, 64), mode="nearest")[0, 0].long().numpy()
  np.testing.assert_array_equal(out_mask.numpy(), ref_mask)
