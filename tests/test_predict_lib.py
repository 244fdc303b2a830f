"""lseg_jax.predict's image reading and label parsing (shared by tools/predict.py and
the demo)."""
import io

import numpy as np
from PIL import Image
import pytest

from lseg_jax import predict


def _png(im: Image.Image) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return buf.getvalue()


def test_rgb_and_formats_round_trip(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(tmp_path / "x.png")
  np.testing.assert_array_equal(predict.load_image(tmp_path / "x.png").image, rgb)
  np.testing.assert_array_equal(predict.load_image(_png(Image.fromarray(rgb))).image, rgb)
  np.testing.assert_array_equal(predict.load_image(Image.fromarray(rgb)).image, rgb)
  loaded = predict.load_image(io.BytesIO(_png(Image.fromarray(rgb))))
  out, mode = loaded.image, loaded.mode
  assert mode == "RGB" and out.dtype == np.uint8 and out.shape == (5, 7, 3)


def test_16_bit_grayscale_is_scaled_not_clipped():
  values = np.array([[0, 257, 32896, 65535]], np.uint16)
  loaded = predict.load_image(_png(Image.fromarray(values)))
  image, mode = loaded.image, loaded.mode
  assert mode.startswith("I;16")
  np.testing.assert_array_equal(image[..., 0], [[0, 1, 128, 255]])
  np.testing.assert_array_equal(image[..., 0], image[..., 2])


@pytest.mark.parametrize("values,mode,want", [
    (np.array([[0.0, 0.5, 1.0]], np.float32), "F", [0, 128, 255]),         # [0, 1] x 255
    (np.array([[0.0, 100.0, 255.0]], np.float32), "F", [0, 100, 255]),     # [0, 255] as is
    (np.array([[0, 100, 200]], np.int32), "I", [0, 100, 200]),
    (np.array([[0, 257, 65535]], np.int32), "I", [0, 1, 255]),             # 16-bit range
    (np.array([[-10, 0, 10]], np.int32), "I", [0, 128, 255]),              # min-max
])
def test_integer_and_float_images_by_value_range(values, mode, want):
  im = Image.fromarray(values, mode=mode) if mode == "F" else Image.fromarray(values)
  assert im.mode == mode
  np.testing.assert_array_equal(predict.load_image(im).image[..., 1], [want])


def test_grayscale_palette_cmyk_and_bilevel():
  gray = np.array([[0, 90, 255]], np.uint8)
  np.testing.assert_array_equal(predict.load_image(Image.fromarray(gray)).image,
                                np.repeat(gray[..., None], 3, -1))
  rgb = np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8)
  pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE)
  np.testing.assert_array_equal(predict.load_image(_png(pal)).image, rgb)
  cmyk = Image.fromarray(rgb).convert("CMYK")
  np.testing.assert_array_equal(predict.load_image(cmyk).image, rgb)
  bilevel = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
  np.testing.assert_array_equal(predict.load_image(bilevel).image[0, :, 0], [0, 255])


def test_alpha_is_composited_over_white():
  rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 255, 128]]], np.uint8)
  loaded = predict.load_image(_png(Image.fromarray(rgba)))
  image, mode = loaded.image, loaded.mode
  assert mode == "RGBA"
  np.testing.assert_array_equal(image[0, 0], [255, 0, 0])
  np.testing.assert_array_equal(image[0, 1], [255, 255, 255])
  np.testing.assert_allclose(image[0, 2], [127, 127, 255], atol=1)
  la = Image.fromarray(np.array([[[10, 0], [10, 255]]], np.uint8), mode="LA")
  np.testing.assert_array_equal(predict.load_image(la).image[0, :, 0], [255, 10])
  pal = Image.new("P", (2, 1))
  pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
  pal.putpixel((1, 0), 1)
  pal.info["transparency"] = 0
  np.testing.assert_array_equal(predict.load_image(_png(pal)).image[0],
                                [[255, 255, 255], [0, 255, 0]])


def test_exif_orientation_is_applied():
  im = Image.fromarray(np.zeros((2, 4, 3), np.uint8))
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to display
  buf = io.BytesIO()
  im.save(buf, format="JPEG", exif=exif)
  assert predict.load_image(buf.getvalue()).image.shape == (4, 2, 3)


def test_unreadable_images_name_the_file(tmp_path, monkeypatch):
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(ValueError, match=r"notes.txt is not an image file"):
    predict.load_image(tmp_path / "notes.txt")
  with pytest.raises(ValueError, match="missing.png does not exist"):
    predict.load_image(tmp_path / "missing.png")
  (tmp_path / "cut.png").write_bytes(_png(Image.new("RGB", (64, 64)))[:60])
  with pytest.raises(ValueError, match="cut.png"):
    predict.load_image(tmp_path / "cut.png")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
  with pytest.raises(ValueError, match="too large"):
    predict.load_image(_png(Image.new("RGB", (20, 20))), name="big.png")


def test_limit_size():
  image = np.zeros((300, 1000, 3), np.uint8)
  assert predict.limit_size(image, 500).shape == (150, 500, 3)
  assert predict.limit_size(image, 1000) is image
  assert predict.limit_size(image, None) is image


@pytest.mark.parametrize("spec,match", [
    ("", "no labels given"), ("  ", "no labels given"), ("dog,,cat", "empty label at position 2"),
    ("dog, cat,", "empty label at position 3"), ("dog, Dog", "duplicate labels"),
    ("red disc\\ large, cat", 'label "red disc\\\\ large" in .* backslash not followed by '
     "a comma"),
    ("cat, dog\\", 'label "dog\\\\" in .* backslash not followed by a comma'),
    ("cat\\,,, dog", "empty label at position 2"),
])
def test_parse_labels_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    predict.parse_labels(spec)


def test_parse_labels_and_file(tmp_path):
  assert predict.parse_labels(" dog, grass ,other") == ["dog", "grass", "other"]
  assert predict.parse_labels("background,red disc\\, large,other") == [
      "background", "red disc, large", "other"]
  assert predict.parse_labels("\\,a\\,\\,b ,c") == [",a,,b", "c"]
  assert predict.parse_labels("cat\\,, dog") == ["cat,", "dog"]
  (tmp_path / "l.txt").write_text("dog\n\n grass \n")
  assert predict.read_labels_file(str(tmp_path / "l.txt")) == ["dog", "grass"]
  (tmp_path / "e.txt").write_text("\n")
  with pytest.raises(ValueError, match="no labels in"):
    predict.read_labels_file(str(tmp_path / "e.txt"))
