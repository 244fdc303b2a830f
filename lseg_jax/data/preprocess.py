"""Decoding, augmentation and normalisation: TF ops on one example at a time.

The training recipe and the evaluation resize modes: docs/datasets.md, "Preprocessing".
"""
from __future__ import annotations

import io
import re

import numpy as np
import tensorflow as tf

from lseg_jax.labels import IGNORE_INDEX

EVAL_RESIZE_MODES = ("none", "long_side", "center_crop", "square")
_PIL_FILTERS = {"bilinear": 2, "bicubic": 3}  # PIL.Image.BILINEAR, .BICUBIC
# A PNG's bit depth and colour type bytes (in IHDR) sit at offsets 24 and 25; colour
# type 3 means "palette".
PNG_BIT_DEPTH_OFFSET = 24
PNG_COLOR_TYPE_OFFSET = 25


def _header(data: tf.Tensor) -> tf.Tensor:
  """The first 32 bytes of `data`, zero-padded: the PNG header fields can be read from
  files of any length (substr fails past the end)."""
  return tf.strings.join([tf.strings.substr(data, 0, 32), "\0" * 32])


def decode_image(data: tf.Tensor) -> tf.Tensor:
  """Image bytes -> uint8 [H, W, 3], the values Pillow gives (the official loaders).

  Exactly lang-seg's `Image.open(f).convert("RGB")`: JPEGs with 1 or 3 components through
  TF's libjpeg with the accurate integer DCT, 8-bit PNGs through TF's PNG decoder, the rest
  (CMYK/YCCK JPEGs, PNGs of 1, 2, 4 or 16 bits, GIF, BMP, WebP, TIFF, ...) through Pillow. Why,
  and the one departure (16-bit grey -> round(v / 257)): docs/evaluation.md, "Decoding".
  """
  is_jpeg = tf.io.is_jpeg(data)
  header = _header(data)
  is_png8 = tf.logical_and(
      tf.strings.substr(header, 0, 8) == b"\x89PNG\r\n\x1a\n",
      tf.strings.substr(header, PNG_BIT_DEPTH_OFFSET, 1) == b"\x08")
  use_tf = tf.cond(is_jpeg, lambda: tf.io.extract_jpeg_shape(data)[2] != 4, lambda: is_png8)

  def with_tf():
    return tf.cond(
        is_jpeg, lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_png(data, channels=3))

  image = tf.cond(use_tf, with_tf, lambda: with_pil(_pil_rgb, data, tf.uint8))
  image.set_shape([None, None, 3])
  return image


def with_pil(decode, data: tf.Tensor, dtype) -> tf.Tensor:
  """`decode(bytes) -> (array, error text)` (Pillow) in a `tf.numpy_function`. A failure
  comes back as its text and fails a TF assertion, so that it is a TF op error in graphs
  and eagerly alike (the bad-example guard expects those)."""
  out, error = tf.numpy_function(decode, [data], (dtype, tf.string), stateful=False)
  with tf.control_dependencies([tf.debugging.Assert(tf.equal(error, ""), [error])]):
    return tf.identity(out)


def as_bytes(value) -> bytes:
  """A tf.string scalar handed to numpy_function (bytes, or a 0-d array)."""
  return value.item() if isinstance(value, np.ndarray) else bytes(value)


def decode_png_values(data: tf.Tensor, is_16bit: tf.Tensor) -> tf.Tensor:
  """PNG bytes -> int32 [H, W, C], the stored values (decode_png(dtype=uint16) would scale
  8-bit values by 257: the caller picks by the bit depth)."""
  return tf.cond(is_16bit, lambda: tf.cast(tf.io.decode_png(data, dtype=tf.uint16), tf.int32),
                 lambda: tf.cast(tf.io.decode_png(data), tf.int32))


def _pil_rgb(data) -> tuple[np.ndarray, bytes]:
  """Bytes (numpy_function's bytes or 0-d array) -> (uint8 [H, W, 3], b"") with
  Pillow, or (an empty image, the reason) when Pillow cannot decode them."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  data = as_bytes(data)
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      if im.mode.startswith("I;16"):
        grey = np.round(np.asarray(im, np.float64) / 257.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1), b""
      return np.array(im.convert("RGB"), np.uint8), b""
  except Exception as e:  # pylint: disable=broad-except
    # Pillow names the buffer by its repr ("<_io.BytesIO object at 0x...>"): not the
    # user's file, and different at every run.
    reason = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", " ".join(str(e).split()))
    return np.zeros((0, 0, 3), np.uint8), (
        f"Unknown image file format or damaged image ({len(data)} bytes; Pillow: "
        f"{reason}); expected a JPEG, PNG, GIF, BMP, WebP, TIFF or another format "
        "Pillow reads").encode()


def decode_example(image_bytes: tf.Tensor, mask_bytes: tf.Tensor, file_name: tf.Tensor, *,
                   mask_ignore: int = 255) -> dict[str, tf.Tensor]:
  """Encoded image and greyscale label PNG (pixel value = label index, `mask_ignore` ->
  -1) -> {"image": uint8 [H, W, 3], "mask": int32 [H, W], "file_name": for errors}."""
  image = decode_image(image_bytes)
  header = _header(mask_bytes)
  is_png = tf.strings.substr(header, 0, 4) == b"\x89PNG"
  color_type = tf.strings.substr(header, PNG_COLOR_TYPE_OFFSET, 1)
  tf.debugging.Assert(tf.logical_not(is_png & (color_type == b"\x03")), [tf.strings.join([
      "Mask of ", file_name, " is a palette PNG; expected a greyscale PNG whose pixel values are "
      "label indices (convert it with PIL: Image.fromarray(np.array(img)))."])])
  # Label values are read exactly: 8-bit (mode L) or 16-bit (I;16) greyscale only. TF
  # would turn colour into luma and scale 16-bit values or 1/2/4-bit ones into 0-255.
  bit_depth = tf.strings.substr(header, PNG_BIT_DEPTH_OFFSET, 1)
  is_grey = is_png & (color_type == b"\x00")
  is_16bit = bit_depth == b"\x10"
  with tf.control_dependencies([tf.debugging.Assert(
      tf.logical_and(is_grey, tf.logical_or(is_16bit, bit_depth == b"\x08")),
      [tf.strings.join([
          "Mask of ", file_name, " is not an 8- or 16-bit greyscale PNG (PIL mode L or "
          "I;16); expected one channel whose pixel values are label indices (colour, "
          "alpha, 1/2/4-bit and palette masks are refused: save np.asarray(mask) with "
          "Image.fromarray as uint8 or uint16)."])])]):
    mask = decode_png_values(mask_bytes, is_16bit)[..., 0]
  mask = tf.where(mask == mask_ignore, IGNORE_INDEX, mask)
  return {"image": image, "mask": mask, "file_name": file_name}


def normalize(image: tf.Tensor) -> tf.Tensor:
  """uint8/float [..., 3] in [0, 255] -> float32 (x / 255 - 0.5) / 0.5."""
  return tf.cast(image, tf.float32) / 127.5 - 1.0


def resize_image(image: tf.Tensor, size, offset=(0, 0), window=None, *,
                 method: str = "bicubic") -> tf.Tensor:
  """Pillow's resize of uint8 [H, W, 3] to `size` (h, w) -> float32 [wh, ww, 3] in
  [0, 255], the window (wh, ww) at `offset` (y0, x0) of the result (default: all of it).

  The project's one host-side image resize: `Image.resize` itself (in
  `tf.numpy_function`), so the values are the official loaders' exactly: "bicubic" as
  PyTorch-Encoding's transforms, "bilinear" as HSNet's (torchvision's `Resize` on a PIL
  image)."""
  if method not in _PIL_FILTERS:
    raise ValueError(f"resize method={method!r}; expected one of {sorted(_PIL_FILTERS)}.")
  window = size if window is None else window
  resample = _PIL_FILTERS[method]

  def pil_resize(x, h, w):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    return np.asarray(Image.fromarray(x).resize((int(w), int(h)), resample))

  out = tf.numpy_function(pil_resize, [tf.cast(image, tf.uint8), size[0], size[1]],
                          tf.uint8, stateful=False)
  out.set_shape([None, None, 3])
  out = out[offset[0]:offset[0] + window[0], offset[1]:offset[1] + window[1]]
  return tf.cast(out, tf.float32)


def resize_nearest(x: tf.Tensor, size, offset=(0, 0), window=None) -> tf.Tensor:
  """Nearest-neighbour resize of [H, W, ...] to `size` (h, w), any dtype.

  Picks exactly PIL's NEAREST source pixels: PIL walks the output adding the float64 step in / out
  to a start of step / 2 and truncates, so the source index is floor(cumsum) (not
  floor((o + 0.5) * in / out), which differs at exact ties). Written as a gather so labels are
  never interpolated. `offset`/`window` select a window of the output as in `resize_image`.
  """
  window = size if window is None else window

  def src(out_len, in_len, start, length):
    step = tf.cast(in_len, tf.float64) / tf.cast(out_len, tf.float64)
    steps = tf.concat([[0.5 * step], tf.fill([out_len - 1], step)], 0)
    idx = tf.cast(tf.floor(tf.cumsum(steps)), tf.int32)
    return tf.minimum(idx, in_len - 1)[start:start + length]
  shape = tf.shape(x)
  x = tf.gather(x, src(size[0], shape[0], offset[0], window[0]), axis=0)
  return tf.gather(x, src(size[1], shape[1], offset[1], window[1]), axis=1)


def _long_side_size(h, w, long_size):
  """(oh, ow) with the long side = long_size, short side rounded half up."""
  h64, w64, l64 = (tf.cast(v, tf.float64) for v in (h, w, long_size))
  oh = tf.where(h > w, l64, tf.floor(h64 * l64 / w64 + 0.5))
  ow = tf.where(h > w, tf.floor(w64 * l64 / h64 + 0.5), l64)
  return tf.cast(oh, tf.int32), tf.cast(ow, tf.int32)


def train_augment(image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor, *, crop_size: int = 480,
                  base_size: int = 520, scale_range=(0.5, 2.0), flip: bool = True):
  """The official training augmentation (docs/datasets.md) of image uint8 [H, W, 3] and
  mask int32 [H, W] with this example's stateless seed int64 [2] -> normalised image
  float32 [crop_size, crop_size, 3], mask int32 [crop_size, crop_size]."""
  flip_seed, scale_seed, y_seed, x_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  if flip:
    do_flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    image = tf.cond(do_flip, lambda: image[:, ::-1], lambda: image)
    mask = tf.cond(do_flip, lambda: mask[:, ::-1], lambda: mask)
  lo, hi = int(base_size * scale_range[0]), int(base_size * scale_range[1])
  long_size = tf.random.stateless_uniform([], scale_seed, lo, hi + 1, dtype=tf.int32)
  shape = tf.shape(mask)
  oh, ow = _long_side_size(shape[0], shape[1], long_size)
  # Crop offsets in the resized image padded up to crop_size; the crop window's
  # part inside the resized image is cut out and padded.
  y0 = tf.random.stateless_uniform(
      [], y_seed, 0, tf.maximum(oh, crop_size) - crop_size + 1, tf.int32)
  x0 = tf.random.stateless_uniform(
      [], x_seed, 0, tf.maximum(ow, crop_size) - crop_size + 1, tf.int32)
  wh, ww = tf.minimum(crop_size, oh - y0), tf.minimum(crop_size, ow - x0)
  image = resize_image(image, (oh, ow), (y0, x0), (wh, ww))
  mask = resize_nearest(mask, (oh, ow), (y0, x0), (wh, ww))
  # Both are [wh, ww]: padded bottom/right to the crop, image with 0, mask with ignore.
  pad = [[0, crop_size - wh], [0, crop_size - ww]]
  image = tf.pad(image, pad + [[0, 0]])
  mask = tf.pad(mask, pad, constant_values=IGNORE_INDEX)
  image = tf.ensure_shape(normalize(image), [crop_size, crop_size, 3])
  mask = tf.ensure_shape(mask, [crop_size, crop_size])
  return image, mask


def _square(image, mask, size):
  """HSNet's eval resize: image [size, size] PIL-bilinear, mask torch-nearest."""
  shape = tf.shape(mask)
  h, w = shape[0], shape[1]
  image = resize_image(image, (size, size), method="bilinear")

  def src(in_len):
    step = tf.cast(in_len, tf.float32) / float(size)
    idx = tf.cast(tf.floor(tf.range(size, dtype=tf.float32) * step), tf.int32)
    return tf.minimum(idx, in_len - 1)
  mask = tf.gather(tf.gather(mask, src(h), axis=0), src(w), axis=1)
  return (tf.ensure_shape(normalize(image), [size, size, 3]), tf.ensure_shape(mask, [size, size]))


def eval_preprocess(image: tf.Tensor, mask: tf.Tensor, *, mode: str = "none",
                    crop_size: int = 480, base_size: int = 520):
  """Evaluation preprocessing `mode` (docs/datasets.md) of image uint8 [H, W, 3] and
  mask int32 [H, W] -> normalised image float32 [h, w, 3], mask int32 [h, w]."""
  if mode not in EVAL_RESIZE_MODES:
    raise ValueError(f"eval_resize={mode!r}; expected one of {EVAL_RESIZE_MODES}.")
  if mode == "none":
    return normalize(image), mask
  shape = tf.shape(mask)
  h, w = shape[0], shape[1]
  if mode == "long_side":
    size = _long_side_size(h, w, base_size)
    return normalize(resize_image(image, size)), resize_nearest(mask, size)
  if mode == "square":
    return _square(image, mask, crop_size)
  # center_crop: the short side becomes crop_size, the other is truncated.
  h64, w64, c64 = (tf.cast(v, tf.float64) for v in (h, w, crop_size))
  oh = tf.cast(tf.where(w > h, c64, tf.floor(h64 * c64 / w64)), tf.int32)
  ow = tf.cast(tf.where(w > h, tf.floor(w64 * c64 / h64), c64), tf.int32)
  image = resize_image(image, (oh, ow))
  mask = resize_nearest(mask, (oh, ow))
  # Python's round() (half to even), as the reference; tf.round does the same.
  y0 = tf.cast(tf.round(tf.cast(oh - crop_size, tf.float64) / 2), tf.int32)
  x0 = tf.cast(tf.round(tf.cast(ow - crop_size, tf.float64) / 2), tf.int32)
  image = image[y0:y0 + crop_size, x0:x0 + crop_size]
  mask = mask[y0:y0 + crop_size, x0:x0 + crop_size]
  return (tf.ensure_shape(normalize(image), [crop_size, crop_size, 3]),
          tf.ensure_shape(mask, [crop_size, crop_size]))
