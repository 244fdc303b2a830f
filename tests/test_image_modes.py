"""Every image mode a user is likely to have, as an input image and as a label mask.

Images: the image loader of tools/predict.py and the demo (PIL,
`lseg_jax.predict.load_image`) and the training pipeline's decoder
(`preprocess.decode_example`, TensorFlow) give the RGB a viewer shows: 16-bit and 32-bit integer greys and float greys are scaled, not clipped
(prediction composites images with transparency over white). Masks: label values are
read exactly (8- and 16-bit greyscale PNG) or refused with an error naming the file.
"""
import io

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from lseg_jax import predict
from lseg_jax.data import preprocess

RAMP = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))  # [8, 64] grey levels
RGB = np.stack([RAMP, 255 - RAMP, np.full_like(RAMP, 77)], axis=-1)


def _image(mode):
  """(PIL image in `mode`, expected uint8 RGB, file format)."""
  grey = np.repeat(RAMP[..., None], 3, axis=-1)
  if mode == "1":
    bw = (RAMP >= 128).astype(np.uint8) * 255
    return Image.fromarray(bw).convert("1"), np.repeat(bw[..., None], 3, -1), "PNG"
  if mode == "L":
    return Image.fromarray(RAMP), grey, "PNG"
  if mode == "P":
    return Image.fromarray(RGB).convert("P", palette=Image.ADAPTIVE, colors=256), None, "PNG"
  if mode == "RGB":
    return Image.fromarray(RGB), RGB, "PNG"
  if mode == "RGBA":
    over_white = np.round(RGB * (200 / 255) + 255 * (55 / 255))
    return (Image.fromarray(np.concatenate([RGB, np.full_like(RAMP, 200)[..., None]], -1)),
            over_white, "PNG")
  if mode == "LA":
    over_white = np.round(grey * (9 / 255) + 255 * (246 / 255))
    return Image.fromarray(np.stack([RAMP, np.full_like(RAMP, 9)], -1), "LA"), over_white, "PNG"
  if mode == "I;16":
    return Image.fromarray(RAMP.astype(np.uint16) * 257), grey, "PNG"
  if mode == "I":
    return Image.fromarray(RAMP.astype(np.int32) * 257), grey, "TIFF"
  if mode == "F":
    return Image.fromarray(RAMP.astype(np.float32) / 255), grey, "TIFF"
  if mode == "CMYK":
    return Image.fromarray(RGB).convert("CMYK"), RGB, "TIFF"
  raise ValueError(mode)


MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I", "F", "CMYK")


@pytest.mark.parametrize("mode", MODES)
def test_predict_load_image(mode, tmp_path):
  im, expected, fmt = _image(mode)
  path = tmp_path / f"x.{fmt.lower()}"
  im.save(path, format=fmt)
  with Image.open(path) as check:
    assert check.mode == mode or (mode == "I" and check.mode.startswith("I"))
  got = predict.load_image(str(path)).image
  assert got.dtype == np.uint8 and got.shape == (8, 64, 3)
  if expected is None:  # a palette: PIL's own colours
    expected = np.asarray(im.convert("RGB"))
  np.testing.assert_allclose(got.astype(int), expected.astype(int), atol=1)


def test_predict_load_image_refuses_bad_files(tmp_path):
  (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
  with pytest.raises(ValueError, match="bad.png"):
    predict.load_image(str(tmp_path / "bad.png"))
  Image.fromarray(np.full((4, 4), np.nan, np.float32)).save(tmp_path / "nan.tif")
  with pytest.raises(ValueError, match="NaN"):
    predict.load_image(str(tmp_path / "nan.tif"))


def _png(im) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return buf.getvalue()


def _decode(image_bytes, mask_bytes):
  out = preprocess.decode_example(tf.constant(image_bytes), tf.constant(mask_bytes),
                                  tf.constant("img.png"), mask_ignore=255)
  return out["image"].numpy(), out["mask"].numpy()


GOOD_MASK = _png(Image.fromarray(np.zeros((8, 64), np.uint8)))


@pytest.mark.parametrize("mode", ("1", "L", "P", "RGB", "RGBA", "LA", "I;16"))
def test_training_image_modes(mode):
  im, expected, _ = _image(mode)
  if expected is None or mode in ("RGBA", "LA"):  # training data: the colour channels
    expected = np.asarray(im.convert("RGB"))
  image, _ = _decode(_png(im), GOOD_MASK)
  np.testing.assert_allclose(image.astype(int), expected.astype(int), atol=1)


def test_mask_values_are_read_exactly():
  values = np.array([0, 2, 4, 5, 300, 255], np.uint16)
  mask16 = np.resize(values, (8, 64)).astype(np.uint16)
  image = _png(Image.fromarray(RGB))
  _, got = _decode(image, _png(Image.fromarray(mask16)))
  expected = np.where(mask16 == 255, -1, mask16.astype(np.int32))
  np.testing.assert_array_equal(got, expected)
  mask8 = np.resize(np.array([0, 1, 7, 255], np.uint8), (8, 64))
  _, got = _decode(image, _png(Image.fromarray(mask8)))
  np.testing.assert_array_equal(got, np.where(mask8 == 255, -1, mask8.astype(np.int32)))


@pytest.mark.parametrize("mode", ("1", "P", "RGB", "RGBA", "LA", "I"))
def test_ambiguous_masks_are_refused(mode):
  labels = np.resize(np.array([0, 1, 2], np.uint8), (8, 64))
  im = {"1": lambda: Image.fromarray(labels * 255).convert("1"),
        "P": lambda: Image.fromarray(labels).convert("P"),
        "RGB": lambda: Image.fromarray(np.stack([labels] * 3, -1)),
        "RGBA": lambda: Image.fromarray(np.stack([labels] * 4, -1)),
        "LA": lambda: Image.fromarray(np.stack([labels] * 2, -1), "LA"),
        "I": lambda: Image.fromarray(labels.astype(np.int32) + 70000)}[mode]()
  data = _png(im)
  if mode == "I" and Image.open(io.BytesIO(data)).mode == "I;16":
    # PIL writes 32-bit masks as 16-bit PNGs: values are what the file holds.
    _, got = _decode(_png(Image.fromarray(RGB)), data)
    np.testing.assert_array_equal(got, np.asarray(Image.open(io.BytesIO(data))).astype(int))
    return
  with pytest.raises(tf.errors.InvalidArgumentError, match="img.png (is a palette PNG|is not "
                     "an 8- or 16-bit greyscale PNG)"):
    _decode(_png(Image.fromarray(RGB)), data)
