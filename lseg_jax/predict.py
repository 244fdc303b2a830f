r"""Prediction as tools/predict.py and the browser demo (tools/demo.py) share it.

  from lseg_jax import checkpoint, predict, text
  model, meta = checkpoint.load_model("runs/synthetic_tiny")
  embedder, _, _ = text.checkpoint_label_embedder(model, meta, "runs/synthetic_tiny")
  segmenter = predict.Segmenter(model, embedder, window=predict.default_window(meta))
  image = predict.load_image("scene.png").image            # uint8 [H, W, 3]
  result = segmenter(image, predict.parse_labels("red disc, green square, other"))
  result.overlay(alpha=0.5).save("scene_seg.png")          # image + ordered legend
  result.report()                                          # the JSON of the outputs

One place for each step, so that both front ends give the same pixels: images
(`load_image`, `limit_size`, `InputImage`), labels (`parse_labels`, `read_labels_file`:
empty and duplicate labels are errors, labels longer than CLIP's context warnings), the
model (`Segmenter`: single scale or the official multi-scale + flip protocol, label
embeddings cached per label set and template) and outputs (`Prediction`, `save_label_map`).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import threading
from typing import Any, BinaryIO, Sequence
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lseg_jax import inference
from lseg_jax import text
from lseg_jax import visualize

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
SINGLE_SCALE = "single-scale"
MULTI_SCALE = "multi-scale + flip"
PROTOCOLS = (SINGLE_SCALE, MULTI_SCALE)
# Fully transparent pixels carry arbitrary colours; images with alpha are
# composited over this background before the model sees them.
ALPHA_BACKGROUND = (255, 255, 255)


# --- Images ---
def load_image(source: str | os.PathLike | bytes | BinaryIO | Image.Image, *,
               name: str | None = None, max_side: int | None = None) -> "InputImage":
  """An image as both front ends segment it: uint8 [H, W, 3] RGB, turned upright as
  its EXIF orientation says, then shrunk by `limit_size(image, max_side)`. Pixel modes
  become RGB as docs/evaluation.md, "Prediction" states (`to_rgb8`).

  `source` is a path, bytes, a binary file or a PIL image; `name` names it in errors (default: the
  path). ValueError for what Pillow cannot read or more pixels than its decompression-bomb limit.
  """
  image, mode = _read(source, name)
  return InputImage(limit_size(image, max_side), mode, tuple(image.shape[:2]), max_side)


def _read(source: str | os.PathLike | bytes | BinaryIO | Image.Image,
          name: str | None) -> tuple[np.ndarray, str]:
  """(uint8 [H, W, 3] upright RGB, the file's Pillow mode, e.g. "I;16")."""
  if isinstance(source, Image.Image):
    return to_rgb8(_upright(source)), source.mode
  if name is None:
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the image"
  if isinstance(source, bytes):
    source = io.BytesIO(source)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(source) as im:
        im.load()
        return to_rgb8(_upright(im)), im.mode
  except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
    raise ValueError(f"{name} is too large to read safely: {e}") from None
  except FileNotFoundError:
    raise ValueError(f"{name} does not exist") from None
  except UnidentifiedImageError:
    raise ValueError(f"{name} is not an image file that can be read; expected PNG, JPEG, "
                     "WebP, BMP, TIFF, GIF or another format Pillow reads") from None
  except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for damaged files.
    raise ValueError(f"{name} could not be decoded as an image: {e}") from None


def describe_mode(mode: str) -> str | None:
  """What `to_rgb8` does to an image of this Pillow mode, for a user; None for RGB
  and palette images (nothing to say)."""
  if mode.startswith("I;16"):
    return "16-bit grayscale image: scaled to 8 bits (value / 257) and repeated to RGB"
  if mode in ("I", "F"):
    return (f"{'32-bit integer' if mode == 'I' else 'floating-point'} grayscale image: "
            "scaled to 8 bits by its value range and repeated to RGB")
  if mode in ("L", "1"):
    return "grayscale image: repeated to RGB"
  if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    return "image with transparency: composited over white"
  if mode == "CMYK":
    return "CMYK image: converted to RGB"
  if mode not in ("RGB", "P"):
    return f"{mode} image: converted to RGB"
  return None


def _upright(im: Image.Image) -> Image.Image:
  try:
    return ImageOps.exif_transpose(im)
  except Exception:  # pylint: disable=broad-except
    return im  # A broken EXIF block: keep the stored orientation.


def to_rgb8(im: Image.Image) -> np.ndarray:
  """A PIL image of any mode -> uint8 [H, W, 3] (docs/evaluation.md, "Prediction")."""
  mode = im.mode
  if mode == "RGB":
    return np.array(im, np.uint8)
  if mode.startswith("I;16") or mode in ("I", "F"):
    gray = _gray_to_uint8(np.asarray(im), mode)
    return np.repeat(gray[..., None], 3, axis=-1)
  has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
      mode == "P" and "transparency" in im.info)
  if has_alpha:
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
    return np.array(Image.alpha_composite(background, rgba).convert("RGB"), np.uint8)
  return np.array(im.convert("RGB"), np.uint8)


def _gray_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
  """A single-channel 16-bit, 32-bit or float image -> uint8 [H, W]."""
  x = values.astype(np.float64)
  if not np.isfinite(x).all():
    raise ValueError(f"the {mode} image holds NaN/Inf values; expected finite grey levels")
  if mode.startswith("I;16"):
    scaled = x / 257.0
  else:
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if mode == "F" and lo >= 0 and hi <= 1:
      scaled = x * 255.0
    elif lo >= 0 and hi <= 255:
      scaled = x
    elif lo >= 0 and hi <= 65535:
      scaled = x / 257.0
    else:
      scaled = (x - lo) * (255.0 / (hi - lo))
  return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def limit_size(image: np.ndarray, max_side: int | None) -> np.ndarray:
  """image uint8 [H, W, 3] shrunk (aspect kept, Lanczos) so that its long side is
  at most `max_side`; returned unchanged when it already fits or max_side is None."""
  h, w = image.shape[:2]
  if max_side is None or max(h, w) <= max_side:
    return image
  if max_side < 1:
    raise ValueError(f"max_side={max_side}; expected >= 1")
  scale = max_side / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


@dataclasses.dataclass
class InputImage:
  """An image ready to segment (uint8 [H, W, 3]), with the file's Pillow mode, its
  (height, width) before `limit_size` and the limit it was shrunk to (or None)."""
  image: np.ndarray
  mode: str
  original_size: tuple[int, int]
  max_side: int | None = None

  @property
  def conversion(self) -> str | None:
    """How the file's pixels became 8-bit RGB (`describe_mode`), if worth saying."""
    return describe_mode(self.mode)

  @property
  def warnings(self) -> list[str]:
    (h0, w0), (h, w) = self.original_size, self.image.shape[:2]
    if (h0, w0) == (h, w):
      return []
    return [f"the image is {w0}x{h0} pixels; it was shrunk to {w}x{h} (--max-side "
            f"{self.max_side}) and the outputs have that size"]

  def report_fields(self) -> dict[str, Any]:
    """The keys it adds to `Prediction.report`."""
    out: dict[str, Any] = {}
    if self.warnings:  # shrunk by limit_size
      out["original_size"] = list(self.original_size)
    if self.conversion:
      out["input_conversion"] = self.conversion
    return out


def list_images(folder: str) -> list[str]:
  """Sorted paths of the image files (`IMAGE_EXTENSIONS`) in a folder."""
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if f.lower().endswith(IMAGE_EXTENSIONS))


# --- Label sets ---
def parse_labels(spec: str) -> list[str]:
  r"""'dog, grass ,other' -> ['dog', 'grass', 'other']; "\," is a comma inside a label
  and no other backslash is allowed. ValueError for no labels, an empty label, a lone
  backslash, or two labels equal after CLIP's text cleaning ("Dog", "dog")."""
  if not spec or not spec.strip():
    raise ValueError("no labels given; expected label names separated by commas, "
                     'e.g. "dog, grass, other"')
  labels, current, i = [], [], 0
  while i < len(spec):
    char = spec[i]
    if char == "\\":
      if spec[i + 1:i + 2] != ",":
        rest = spec[i:].split(",", 1)[0]
        raise ValueError(
            # Quoted as typed: repr would double the backslash the message is about.
            f'label "{("".join(current) + rest).strip()}" in "{spec}" has a backslash '
            "not followed by a comma; expected \\, for a comma inside a label and no "
            "other backslash (use --labels-file for names with backslashes)")
      current.append(",")
      i += 2
      continue
    if char == ",":
      labels.append("".join(current))
      current = []
    else:
      current.append(char)
    i += 1
  labels.append("".join(current))
  labels = [s.strip() for s in labels]
  for i, label in enumerate(labels):
    if not label:
      raise ValueError(f"empty label at position {i + 1} in {spec!r}; expected non-empty "
                       "names separated by commas")
  return check_labels(labels, where=repr(spec))


def read_labels_file(path: str) -> list[str]:
  """A text file with one label per line (blank lines skipped) -> label list."""
  with open(path, encoding="utf-8") as f:
    labels = [line.strip() for line in f]
  labels = [s for s in labels if s]
  if not labels:
    raise ValueError(f"no labels in {path!r}; expected one label name per line")
  return check_labels(labels, where=repr(path))


def check_labels(labels: Sequence[str], where: str = "the label set") -> list[str]:
  """`text.validate_labels` with the source named in its message."""
  try:
    return text.validate_labels(labels)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def long_label_warnings(prompts: Sequence[str], tokenizer, context_length: int) -> list[str]:
  """A warning per prompt that CLIP's context cannot hold (it is truncated)."""
  counts = text.token_counts(prompts, tokenizer)
  return [f"label text {p!r} is {n} tokens long; CLIP reads {context_length}, so it was "
          f"cut to its first {context_length - 2} tokens"
          for p, n in zip(prompts, counts) if n > context_length]


# --- The model ---
def default_window(meta: dict[str, Any] | None = None) -> inference.SlidingWindow:
  """The multi-scale + flip protocol with the official scales, at the base and
  crop sizes of the checkpoint's training data when its meta records them (as
  tools/eval.py does), else the official 520 / 480."""
  data = ((meta or {}).get("config") or {}).get("data") or {}
  kwargs = {k: int(data[k]) for k in ("base_size", "crop_size") if data.get(k)}
  return inference.SlidingWindow(scales=inference.OFFICIAL_SCALES, flip=True, **kwargs)


@dataclasses.dataclass
class Prediction:
  """One image's segmentation."""
  image: np.ndarray  # uint8 [H, W, 3], as segmented
  labels: list[str]  # L names
  prompts: list[str]  # the L texts the text tower read
  template: str | None  # None: bare names
  protocol: str  # SINGLE_SCALE or MULTI_SCALE
  logits: np.ndarray  # float32 [H, W, L]; MULTI_SCALE: the summed window logits
  label_map: np.ndarray  # int32 [H, W], argmax of logits
  input_size: tuple[int, int] | None = None  # (H', W') the model saw (single scale)
  window: inference.SlidingWindow | None = None  # MULTI_SCALE's parameters
  embeddings: np.ndarray | None = None  # float32 [H'/2, W'/2, D] when asked for
  warnings: list[str] = dataclasses.field(default_factory=list)  # for the user

  @property
  def areas(self) -> np.ndarray:
    """float64 [L]: fraction of the pixels given to each label."""
    return visualize.area_fractions(self.label_map, len(self.labels))

  def overlay(self, alpha: float = 0.5) -> Image.Image:
    """The image with label colours blended over it (opacity alpha) and, to its
    right, the legend in label order with each label's area."""
    return visualize.overlay_with_legend(self.image, self.label_map, self.labels, alpha=alpha)

  def colour_map(self) -> np.ndarray:
    """uint8 [H, W, 3]: the label map in the legend's colours."""
    return visualize.colorize(self.label_map, len(self.labels))

  def area_rows(self) -> list[list[Any]]:
    """[index, label, colour "#rrggbb", area %, pixels] per label, in label order."""
    counts = np.bincount(self.label_map.reshape(-1), minlength=len(self.labels))
    colours = visualize.palette(len(self.labels))
    return [[i, name, "#%02x%02x%02x" % tuple(int(c) for c in colours[i]),
             round(100.0 * float(a), 2), int(counts[i])]
            for i, (name, a) in enumerate(zip(self.labels, self.areas))]

  def summary(self) -> str:
    """'dog 41.2%, grass 55.0%, other 3.8%'."""
    return ", ".join(f"{n} {100 * a:.1f}%" for n, a in zip(self.labels, self.areas))

  def report(self, **extra: Any) -> dict[str, Any]:
    """The JSON written next to the images; `extra` keys are added (image name,
    checkpoint, output file names, ...)."""
    protocol: dict[str, Any] = {"name": self.protocol}
    if self.window is not None:
      protocol.update(self.window.to_dict())
    out = {
        "size": list(self.image.shape[:2]),
        "model_input_size": None if self.input_size is None else list(self.input_size),
        "labels": list(self.labels), "prompt": self.template, "protocol": protocol,
        "area_fraction": {name: float(a) for name, a in zip(self.labels, self.areas)},
        "warnings": list(self.warnings),
    }
    out.update(extra)
    return out

  def save(self, base: str, *, alpha: float, **fields: Any) -> dict[str, str]:
    """Writes the files tools/predict.py and the demo write, BASE.png (the overlay),
    BASE_labels.png (the label map) and BASE.json (`report(**fields)` naming the label
    map); returns their paths {"overlay", "labels", "json"}."""
    paths = {"overlay": base + ".png", "labels": base + "_labels.png", "json": base + ".json"}
    self.overlay(alpha=alpha).save(paths["overlay"])
    save_label_map(paths["labels"], self.label_map, len(self.labels))
    report = self.report(label_map=os.path.basename(paths["labels"]), **fields)
    with open(paths["json"], "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
    return paths


class NonFiniteLogitsError(ValueError):
  """The model produced NaN/Inf logits: a prediction that cannot be right."""


class Segmenter:
  """An LSeg model in eval mode with its `text.LabelEmbedder` (whose template is the
  default prompt): image + label names -> `Prediction`. Calls are serialised by a lock,
  so one Segmenter may serve several threads."""

  def __init__(self, model, embedder: text.LabelEmbedder, *,
               window: inference.SlidingWindow | None = None):
    self.model = model
    self.embedder = embedder
    self.window = window or default_window()
    self._single = inference.ImagePredictor(model)
    self._multi: inference.SlidingWindowInference | None = None
    self._lock = threading.Lock()

  def __call__(self, image: np.ndarray, labels: Sequence[str], *,
               template: str | None = None, protocol: str = SINGLE_SCALE,
               embeddings: bool = False) -> Prediction:
    """Segments image uint8 [H, W, 3] into `labels` (template: one "{}"; None: the
    embedder's default; "": bare names), single scale (`inference.ImagePredictor`) or
    MULTI_SCALE (`self.window`); `embeddings`: also the pixel embeddings (single scale).
    ValueError for bad labels, template, protocol or image shape."""
    if protocol not in PROTOCOLS:
      raise ValueError(f"protocol {protocol!r}; expected one of {list(PROTOCOLS)}")
    if embeddings and protocol != SINGLE_SCALE:
      raise ValueError("pixel embeddings come from the single-scale protocol only")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"expected an RGB image uint8 [H, W, 3], got {image.dtype} "
                       f"{list(image.shape)}")
    labels = check_labels(labels)
    prompts = self.embedder.prompts(labels, template)
    notes = long_label_warnings(prompts, self.embedder.tokenizer, self.embedder.context_length)
    with self._lock:
      with warnings.catch_warnings():  # `notes` say it once, in the user's terms.
        warnings.filterwarnings("ignore", message=".*truncated to the context length")
        text_emb = self.embedder(labels, template)
      if protocol == SINGLE_SCALE:
        out = self._single(image, text_emb, embeddings=embeddings)
        logits, input_size, emb = out["logits"], tuple(out["input_size"]), out["embeddings"]
      else:
        if self._multi is None:
          self._multi = inference.SlidingWindowInference.for_model(self.model, self.window)
        logits = self._multi(inference.normalize_image(image), text_emb)
        input_size, emb = None, None
    if not np.isfinite(logits).all():
      raise NonFiniteLogitsError("the model's logits are not finite (NaN/Inf): the checkpoint "
                                 "holds non-finite weights or is damaged; no prediction made")
    return Prediction(
        image=image, labels=labels, prompts=prompts,
        template=self.embedder.template_for(template), protocol=protocol, logits=logits,
        label_map=logits.argmax(-1).astype(np.int32), input_size=input_size,
        window=self.window if protocol == MULTI_SCALE else None, embeddings=emb,
        warnings=notes)


# --- Output files ---
def save_label_map(path: str | BinaryIO, label_map: np.ndarray, num_labels: int) -> None:
  """label_map int [H, W] as a PNG whose pixel values are label indices (8-bit
  for up to 256 labels, 16-bit above)."""
  dtype = np.uint8 if num_labels <= 256 else np.uint16
  Image.fromarray(np.asarray(label_map).astype(dtype)).save(path, format="PNG")
