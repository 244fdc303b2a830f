"""The pipeline's image decoder equals Pillow's `Image.open(f).convert("RGB")`, the
decoding of lang-seg's official loaders, value for value, on generated files of every
kind: baseline and progressive JPEGs with 4:2:0 / 4:2:2 / 4:4:4 subsampling, greyscale
and CMYK (Adobe) JPEGs, qualities 5-100, odd sizes, EXIF orientations (not applied);
PNGs of 1, 8 and 16 bits, palette (with transparency), grey, grey + alpha, RGB, RGBA;
GIF, BMP, WebP, TIFF. The prediction tool's loader (PIL) gives the same values where its
documented rules coincide (no alpha, no EXIF rotation).
"""
import io
import struct
import zlib

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from lseg_jax import predict
from lseg_jax.data import preprocess

SIZES = [(1, 1), (17, 23), (101, 67), (375, 500)]


def _photo(h, w, seed=0):
  """Smooth gradients plus noise: exercises the DCT and the chroma upsampling."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                   (x + y) * 7 % 256], -1).astype(np.float64)
  return np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def _save(im, fmt, **kwargs) -> bytes:
  buf = io.BytesIO()
  im.save(buf, fmt, **kwargs)
  return buf.getvalue()


JPEG_KINDS = {
    "baseline_420": ("RGB", {"subsampling": 2}),
    "baseline_422": ("RGB", {"subsampling": 1}),
    "baseline_444": ("RGB", {"subsampling": 0}),
    "progressive_420": ("RGB", {"subsampling": 2, "progressive": True}),
    "progressive_444": ("RGB", {"subsampling": 0, "progressive": True}),
    "optimized_q95": ("RGB", {"quality": 95, "optimize": True}),
    "quality_5": ("RGB", {"quality": 5}),
    "quality_100": ("RGB", {"quality": 100}),
    "rgb_colorspace": ("RGB", {"keep_rgb": True}),
    "grey": ("L", {}),
    "grey_progressive": ("L", {"progressive": True}),
    "cmyk_adobe": ("CMYK", {}),
}


def _jpeg(kind, h, w):
  mode, kwargs = JPEG_KINDS[kind]
  return _save(Image.fromarray(_photo(h, w)).convert(mode), "JPEG", **kwargs)


def _exif_jpeg(orientation):
  exif = Image.Exif()
  exif[0x0112] = orientation
  return _save(Image.fromarray(_photo(30, 50)), "JPEG", exif=exif.tobytes())


def _pngs():
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
  alpha = rng.integers(0, 256, (37, 53), dtype=np.uint8)
  palette = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=77)
  small_palette = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)
  return {
      "rgb": _save(Image.fromarray(rgb), "PNG"),
      "rgba": _save(Image.fromarray(np.dstack([rgb, alpha])), "PNG"),
      "grey": _save(Image.fromarray(rgb[..., 0]), "PNG"),
      "grey_alpha": _save(Image.fromarray(rgb).convert("LA"), "PNG"),
      "palette_8bit": _save(palette, "PNG"),
      "palette_4bit_transparency": _save(small_palette, "PNG", bits=4, transparency=3),
      "bilevel_1bit": _save(Image.fromarray(rgb[..., 0]).convert("1"), "PNG"),
      "interlaced": _save(Image.fromarray(rgb), "PNG", optimize=True),
  }


OTHER_FORMATS = ("GIF", "BMP", "WEBP", "TIFF")


def _pil(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"))


def _decode_all(blobs):
  """Decodes through a tf.data map (graph mode, as the pipelines run it)."""
  ds = tf.data.Dataset.from_tensor_slices(list(blobs)).map(preprocess.decode_image)
  return [x.numpy() for x in ds]


def _check_equal(blobs, names):
  compared = 0
  for name, data, got in zip(names, blobs, _decode_all(blobs)):
    ref = _pil(data)
    assert got.shape == ref.shape, name
    assert got.dtype == np.uint8
    differing = int((got != ref).sum())
    assert differing == 0, f"{name}: {differing} of {ref.size} values differ from PIL"
    compared += ref.size
  return compared


def test_jpegs_decode_as_pil():
  names, blobs = [], []
  for kind in JPEG_KINDS:
    for h, w in SIZES:
      names.append(f"{kind} {h}x{w}")
      blobs.append(_jpeg(kind, h, w))
  assert _check_equal(blobs, names) > 12 * 3 * (375 * 500)


def test_exif_orientation_is_not_applied():
  """The official loaders do not turn images upright; neither does the pipeline."""
  blobs = [_exif_jpeg(o) for o in (1, 3, 6, 8)]
  _check_equal(blobs, [f"orientation {o}" for o in (1, 3, 6, 8)])
  for got in _decode_all(blobs):
    assert got.shape == (30, 50, 3)


def test_pngs_and_other_formats_decode_as_pil():
  pngs = _pngs()
  rgb = _photo(29, 31, seed=2)
  others = {fmt: _save(Image.fromarray(rgb), fmt) for fmt in OTHER_FORMATS}
  others["GIF_animated"] = _save(Image.fromarray(rgb), "GIF", save_all=True,
                                 append_images=[Image.fromarray(255 - rgb)])
  blobs = {**{"PNG " + k: v for k, v in pngs.items()}, **others}
  _check_equal(list(blobs.values()), list(blobs))


def _png16(array) -> bytes:
  """A 16-bit PNG (colour type 0 grey or 2 RGB), written by hand: Pillow writes
  16-bit grey only."""
  h, w = array.shape[:2]
  colour = 2 if array.ndim == 3 else 0
  rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)

  def chunk(kind, body):
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body)))
  return (b"\x89PNG\r\n\x1a\n"
          + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16bit_pngs():
  """16-bit RGB: Pillow's 8-bit values (the high byte), exactly. 16-bit grey:
  round(v / 257), the prediction tool's rule (Pillow's convert("RGB") clips at 255)."""
  rng = np.random.default_rng(3)
  rgb16 = rng.integers(0, 65536, (13, 17, 3)).astype(np.uint16)
  _check_equal([_png16(rgb16)], ["16-bit RGB"])
  grey = np.array([[0, 128, 129, 256, 32767, 65535, 25700, 25828]], np.uint16)
  for data in (_save(Image.fromarray(grey), "PNG"), _png16(grey)):
    got = _decode_all([data])[0]
    np.testing.assert_array_equal(got, np.repeat(
        np.round(grey / 257).astype(np.uint8)[..., None], 3, axis=-1))


def test_undecodable_bytes_raise():
  with pytest.raises(tf.errors.OpError, match="Unknown image file format or damaged image"):
    _decode_all([b"GIF89a not really an image"])


def test_prediction_loader_agrees_with_the_pipeline(tmp_path):
  """`tools/predict.py` reads with Pillow; on files without alpha or EXIF rotation
  its images equal the pipeline's."""
  pngs = _pngs()
  blobs = {f"{kind}.jpg": _jpeg(kind, 101, 67) for kind in JPEG_KINDS}
  blobs.update({f"{k}.png": pngs[k] for k in ("rgb", "grey", "palette_8bit",
                                               "bilevel_1bit")})
  blobs["grey16.png"] = _save(Image.fromarray(
      np.arange(0, 65536, 97, dtype=np.uint16)[:672].reshape(24, 28)), "PNG")
  blobs["orientation_1.jpg"] = _exif_jpeg(1)
  decoded = _decode_all(list(blobs.values()))
  for (name, data), ours in zip(blobs.items(), decoded):
    (tmp_path / name).write_bytes(data)
    theirs = predict.load_image(str(tmp_path / name)).image
    assert int((theirs != ours).sum()) == 0, name
