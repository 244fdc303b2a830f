"""The host-side resizes against Pillow (the official loaders' library) and the masks'
nearest resizes against their references: HSNet's "square" eval resize (image: Pillow
bilinear, mask: torch's legacy nearest), and Pillow's bicubic (PyTorch-Encoding's
training and validation transforms), equal value for value over a sweep of sizes."""
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from lseg_jax.data import preprocess


@pytest.mark.parametrize("h,w", [(37, 53), (375, 500), (500, 333), (480, 480),
                                 (600, 800), (1, 1), (1500, 2000)])
def test_square_resize_matches_hsnet(h, w):
  torch = pytest.importorskip("torch")
  rng = np.random.RandomState(h)
  image = rng.randint(0, 256, (h, w, 3), np.uint8)
  mask = rng.randint(-1, 5, (h, w)).astype(np.int32)
  for size in (64, 480):
    out_image, out_mask = preprocess.eval_preprocess(
        tf.constant(image), tf.constant(mask), mode="square", crop_size=size)
    ref_image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    ours = np.round((out_image.numpy() + 1) * 127.5)
    np.testing.assert_array_equal(ours, ref_image)
    ref_mask = torch.nn.functional.interpolate(
        torch.from_numpy(mask)[None, None].float(), (size, size),
        mode="nearest")[0, 0].long().numpy()
    np.testing.assert_array_equal(out_mask.numpy(), ref_mask)


SWEEP = [(100, 100), (375, 500), (333, 500), (600, 800), (768, 1024), (1500, 2000),
         (101, 67), (480, 640)]


@pytest.mark.parametrize("method,resample", [("bilinear", Image.BILINEAR),
                                             ("bicubic", Image.BICUBIC)])
def test_resize_sweep_equals_pil(method, resample):
  rng = np.random.default_rng(0)
  for h, w in SWEEP:
    image = rng.integers(0, 256, (h, w, 3), np.uint8)
    for size in [(480, 480), (520, 693), (h * 2 + 1, w // 2 + 1), (7, 9)]:
      ref = np.asarray(Image.fromarray(image).resize(size[::-1], resample))
      out = preprocess.resize_image(tf.constant(image), size, method=method).numpy()
      assert out.dtype == np.float32
      np.testing.assert_array_equal(out, ref, err_msg=f"{method} {h}x{w} -> {size}")


def test_resize_method_is_checked():
  with pytest.raises(ValueError, match="method='lanczos'; expected one of"):
    preprocess.resize_image(tf.zeros([4, 4, 3], tf.uint8), (2, 2), method="lanczos")
