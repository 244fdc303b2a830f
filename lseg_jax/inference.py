"""Sliding-window, multi-scale inference: the official LSeg test protocol.

PyTorch-Encoding's `MultiEvalModule`, as lang-seg's `test_lseg.py` runs it; its five steps
(docs/evaluation.md, "Inference modes") give every model call a crop x crop input, so one
jitted function serves the whole protocol. Here the geometry and the accumulation run on
the host in float32 numpy, the resizes on the device with the reference's taps and order
(`resize_blocks`: the scores at the image's size by blocks of rows), while batches of
crops, gathered across images, run on the devices with the batch axis sharded over a
`data` mesh axis. With a single scale whose long side is the crop size, no flip and an
image of crop x crop, the result is exactly one plain model call.

Labels masked out (label_mask False) get -inf scores, as the model gives. An image may
instead name the rows of the label table it is scored over (a zero-shot episode: "other"
and its class): only those labels are computed, each crop with its own label embeddings,
and its scores have one channel per named row.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from lseg_jax import apply as apply_lib
from lseg_jax import sharding
from lseg_jax.models import resize

OFFICIAL_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@dataclasses.dataclass(frozen=True)
class SlidingWindow:
  """Parameters of the multi-scale sliding-window protocol (module docstring)."""
  scales: tuple[float, ...] = OFFICIAL_SCALES  # relative to base_size (long side)
  base_size: int = 520  # long side at scale 1.0
  crop_size: int = 480  # window side; a multiple of the model's `size_multiple`
  stride_rate: float = 2.0 / 3.0  # window stride as a fraction of crop_size
  flip: bool = True  # also run each window mirrored and add the mirrored-back logits
  pad_value: float = -1.0  # padded pixels of the normalised image (black for mean, std 0.5)

  def __post_init__(self):
    if not self.scales or any(not s > 0 for s in self.scales):
      raise ValueError(f"scales={self.scales}; expected a non-empty list of positive floats")
    if self.base_size < 1 or self.crop_size < 1:
      raise ValueError(f"base_size={self.base_size} and crop_size={self.crop_size} must be >= 1")
    if not 0 < self.stride_rate <= 1:
      raise ValueError(f"stride_rate={self.stride_rate}; expected in (0, 1]")

  @property
  def stride(self) -> int:
    return max(1, int(self.crop_size * self.stride_rate))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ViewProtocol:
  """The open-vocabulary papers' test protocols: one resize, then one view of the whole
  image (SAN) or windows plus a global view (CAT-Seg); scored at the original size.

  Attributes:
    resize: "short_side": the short side to `size`, the long side then at most
      `max_size` (detectron2's ResizeShortestEdge sizes); "square": size x size.
    size, max_size: see resize.
    crop_size: None: one view, the resized image padded at the bottom/right with `pad_value` to the
      model's size multiple (detectron2's ImageList padding), scores cut back to the resized size.
      Else the window side: windows every int(crop_size * (1 - overlap)) pixels, laid out as torch's
      Unfold (they must cover the resized image), their scores averaged where they overlap.
    overlap: see crop_size.
    global_view: with windows, also the image resized to crop_size x crop_size; its scores, resized
      to the resized image's size, are averaged with the windows' (CAT-Seg: (windows + global) / 2).
    activation: "none" or "sigmoid" (CAT-Seg), applied to each view's logits before they are merged.
  All resizes are bilinear with align_corners=False, the scores' last one to the
  original size (detectron2's sem_seg_postprocess).
  """
  resize: str = "short_side"
  size: int = 640
  max_size: int = 2560
  crop_size: int | None = None
  overlap: float = 0.0
  global_view: bool = False
  activation: str = "none"
  pad_value: float = 0.0
  size_multiple: int = 32
  flip: bool = False

  def __post_init__(self):
    if (self.resize not in ("short_side", "square") or self.activation not in ("none", "sigmoid")
        or self.size < 1 or (self.crop_size or 1) < 1 or not 0 <= self.overlap < 1):
      raise ValueError(f"{self}: expected resize short_side|square, activation none|sigmoid, "
                       "size and crop_size >= 1, overlap in [0, 1)")

  @property
  def stride(self) -> int:
    return max(1, int(self.crop_size * (1 - self.overlap)))

  def resized(self, h: int, w: int) -> tuple[int, int]:
    """The (height, width) an [h, w] image is resized to."""
    if self.resize == "square":
      return self.size, self.size
    scale = self.size / min(h, w)
    nh, nw = h * scale, w * scale
    if max(nh, nw) > self.max_size:
      scale = self.max_size / max(nh, nw)
      nh, nw = nh * scale, nw * scale
    return int(nh + 0.5), int(nw + 0.5)

  def to_dict(self) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(self).items() if k != "size_multiple"}


# --- Geometry (pure Python / numpy) ---
def scaled_size(h: int, w: int, scale: float, base_size: int) -> tuple[int, int]:
  """(height, width) of an [h, w] image at `scale`: long side ceil(base * scale)."""
  long_size = int(math.ceil(base_size * scale))
  if h > w:
    return long_size, int(1.0 * w * long_size / h + 0.5)
  return int(1.0 * h * long_size / w + 0.5), long_size


def window_origins(height: int, width: int, crop: int, stride: int
                   ) -> tuple[tuple[int, int], list[tuple[int, int]]]:
  """The padded canvas (ph, pw) of a [height, width] image and its windows' (y0, x0).

  Window (y0, x0) covers rows [y0, min(y0 + crop, ph)) and likewise columns.
  """
  ph, pw = max(height, crop), max(width, crop)
  rows = int(math.ceil((ph - crop) / stride)) + 1
  cols = int(math.ceil((pw - crop) / stride)) + 1
  return (ph, pw), [(i * stride, j * stride) for i in range(rows) for j in range(cols)]


# Rows of logits resized at once: a block of [rows, W, L] float32 stays near this size.
BLOCK_BYTES = 64 << 20


@functools.lru_cache(maxsize=256)
def _taps(in_size: int, out_size: int, align_corners: bool):
  return resize.axis_taps(in_size, out_size, align_corners)


@jax.jit
def _resize_rows(src, hi0, hi1, hw0, hw1, wi0, wi1, ww0, ww1):
  """Rows of a bilinear resize on the device: src [h, w, C] -> [R, W, C] for the R
  output rows whose height taps are given, with the width taps of all W columns.

  The taps and order of `lseg_jax.models.resize` and PyTorch (`resize.axis_taps`):
  width first, then height, each output x[i0] * w0 + x[i1] * w1. Gathers, not the
  interpolation matrices of `resize.resize_bilinear`: an [H, W, L] resize costs
  O(H W L), and a block of rows never needs the whole output.
  """
  def width(rows):
    return rows[:, wi0] * ww0[None, :, None] + rows[:, wi1] * ww1[None, :, None]
  return width(src[hi0]) * hw0[:, None, None] + width(src[hi1]) * hw1[:, None, None]


def resize_blocks(sources, size: tuple[int, int], align_corners: bool, *,
                  reduce: Callable | None = None, label_mask: np.ndarray | None = None,
                  block_bytes: int = BLOCK_BYTES) -> np.ndarray:
  """The sum of bilinear resizes of `sources` to `size`, one block of rows at a time.

  sources: arrays [h_i, w_i, C] (numpy or device), each resized to `size` = (H, W)
    (`_resize_rows`) and summed in order. Labels False in `label_mask` [C] get -inf.
  reduce: None returns the sum, float32 numpy [H, W, C]; else a function of a device
    block [R, W, C] -> [R, W] (an argmax), and the result is its numpy [H, W]. Only [R, W, C] floats
    exist at a time, R chosen so that a block is about `block_bytes`: scoring at full resolution
    never materialises [H, W, C] (847 labels on a 2048 x 1536 image would take 10.7 GB).
  """
  out_h, out_w = size
  sources = [jnp.asarray(s, jnp.float32) for s in sources]
  channels = sources[0].shape[-1]
  rows = out_h if reduce is None else int(np.clip(block_bytes // (4 * out_w * channels), 1, out_h))
  width_taps = [[jnp.asarray(t) for t in _taps(s.shape[1], out_w, align_corners)] for s in sources]
  height_taps = [_taps(s.shape[0], out_h, align_corners) for s in sources]
  mask = None if label_mask is None else jnp.asarray(label_mask, bool)
  blocks = []
  for r0 in range(0, out_h, rows):
    r1 = min(r0 + rows, out_h)
    # The last block repeats its last row: one compiled shape per image.
    index = np.minimum(np.arange(r0, r0 + rows), out_h - 1)
    acc = None
    for src, ht, wt in zip(sources, height_taps, width_taps):
      y = _resize_rows(src, *(t[index] for t in ht), *wt)
      acc = y if acc is None else acc + y
    if mask is not None:
      acc = jnp.where(mask, acc, -jnp.inf)
    blocks.append(np.asarray(acc if reduce is None else reduce(acc))[:r1 - r0])
  return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def resize_image(x, size: tuple[int, int], align_corners: bool) -> np.ndarray:
  """Bilinear resize of float32 [H, W, C] to `size` on the device (`_resize_rows`)."""
  if tuple(size) == tuple(np.shape(x)[:2]):
    return np.asarray(x, np.float32)
  return resize_blocks([x], size, align_corners)


def _pad_to(x: np.ndarray, h: int, w: int, value: float) -> np.ndarray:
  """Pads [H, W, C] at the bottom/right to [>= h, >= w, C] with `value`."""
  ph, pw = max(h - x.shape[0], 0), max(w - x.shape[1], 0)
  if not ph and not pw:
    return x
  return np.pad(x, ((0, ph), (0, pw), (0, 0)), constant_values=value)


# --- Device side: batches of crops through a jitted, sharded function ---
class CropRunner:
  """Runs `apply` on fixed-size batches of crops, split over every device of `mesh`
  (default: this process's devices).

  `apply(state, crops, text_emb, label_mask) -> logits` must be hashable: it
  runs through the cached `apply.forward` (see `apply.LSegApply`).

  `runner(crops [n, c, c, 3], text_emb [L, D] or per crop [n, L, D], label_mask
  [n, L] or None) -> float32 numpy [n, c, c, L]` for any n: crops are cut into
  batches of `batch_size` (the last one padded), so one compiled function serves
  every call. With `flip`, each crop's logits are f(x) + flip(f(flip(x))). Masked
  labels come back as 0 (finite, so that resizing and summing stay finite).
  """

  def __init__(self, apply: Callable, state: Any, *, flip: bool = False,
               mesh: jax.sharding.Mesh | None = None, batch_size: int | None = None):
    self.mesh = mesh if mesh is not None else sharding.make_mesh(
        {"data": -1, "fsdp": 1}, jax.local_devices())
    num = self.mesh.size
    self.batch_size = num if batch_size is None else batch_size
    if self.batch_size < 1 or self.batch_size % num:
      raise ValueError(f"crop batch_size={self.batch_size} must be a positive multiple of the "
                       f"{num} devices of the mesh")
    self.flip = flip
    self._data = sharding.batch_sharding(self.mesh)
    self._replicated = sharding.replicated(self.mesh)
    self.state = jax.device_put(state, self._replicated)
    self._forward = apply_lib.forward(apply, self.mesh, flip=flip)

  def __call__(self, crops: np.ndarray, text_emb, label_mask: np.ndarray | None) -> np.ndarray:
    n = crops.shape[0]
    per_crop = np.ndim(text_emb) == 3
    if per_crop:
      text_emb = np.asarray(text_emb, np.float32)
      if text_emb.shape[0] != n:
        raise ValueError(f"per-crop text_emb has {text_emb.shape[0]} rows for {n} crops")
    else:
      text_emb = jax.device_put(text_emb, self._replicated)
    outs = []
    for start in range(0, n, self.batch_size):
      chunk = crops[start:start + self.batch_size]
      mask = None if label_mask is None else label_mask[start:start + self.batch_size]
      text = text_emb[start:start + self.batch_size] if per_crop else text_emb
      k = chunk.shape[0]
      if k < self.batch_size:
        pad = self.batch_size - k
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        if mask is not None:
          mask = np.concatenate([mask, np.ones((pad, mask.shape[1]), bool)])
        if per_crop:
          # Copies of a real row: a zero embedding would be normalised to NaN.
          text = np.concatenate([text, np.repeat(text[-1:], pad, axis=0)])
      if per_crop:
        text = jax.device_put(text, self._data)
      logits = np.asarray(self._forward(
          self.state, jax.device_put(chunk, self._data), text,
          None if mask is None else jax.device_put(mask, self._data)))
      if mask is not None:
        logits = np.where(mask[:, None, None, :], logits, np.float32(0.0))
      outs.append(logits[:k])
    return np.concatenate(outs) if len(outs) > 1 else outs[0]


# --- Host side: windows in, per-image scores out ---
class _ImageJob:
  """One image's per-scale canvases while its windows are in flight."""

  def __init__(self, image, label_mask, rows, payload, window: SlidingWindow):
    h, w = self.size = image.shape[:2]
    self.label_mask, self.rows, self.payload = label_mask, rows, payload
    self.scales = []   # (height, width, canvas or None, count or None)
    self.crops = []    # (scale index, y0, x0, crop [c, c, 3])
    c = window.crop_size
    for s in window.scales:
      height, width = scaled_size(h, w, s, window.base_size)
      img = resize_image(image, (height, width), align_corners=True)
      (ph, pw), origins = window_origins(height, width, c, window.stride)
      # Padding past the canvas with the same value makes every window a
      # plain slice, identical to "cut at the canvas, then pad to crop".
      img = _pad_to(img, max(o[0] for o in origins) + c, max(o[1] for o in origins) + c,
                    window.pad_value)
      si = len(self.scales)
      self.scales.append([height, width, (ph, pw), None, None])
      for y0, x0 in origins:
        self.crops.append((si, y0, x0, img[y0:y0 + c, x0:x0 + c]))
    self.remaining = len(self.crops)

  def add(self, si, y0, x0, logits):
    entry = self.scales[si]
    ph, pw = entry[2]
    if entry[3] is None:
      entry[3] = np.zeros((ph, pw, logits.shape[-1]), np.float32)
      entry[4] = np.zeros((ph, pw, 1), np.float32)
    y1, x1 = min(y0 + logits.shape[0], ph), min(x0 + logits.shape[1], pw)
    entry[3][y0:y1, x0:x1] += logits[:y1 - y0, :x1 - x0]
    entry[4][y0:y1, x0:x1] += 1
    self.remaining -= 1

  def finish(self, reduce: Callable | None = None) -> np.ndarray:
    """The scores [H, W, L] summed over scales, or reduce(scores) [H, W] by row blocks
    (`resize_blocks`)."""
    assert self.remaining == 0
    outs = []
    for i, (height, width, _, canvas, count) in enumerate(self.scales):
      assert np.all(count > 0), "sliding windows left a pixel uncovered"
      canvas /= count
      outs.append(jnp.asarray(canvas[:height, :width]))  # the host copy goes now
      self.scales[i] = canvas = None
    self.scales = None
    return resize_blocks(outs, self.size, True, reduce=reduce, label_mask=self.label_mask)


class _ViewJob:
  """One image's views (`ViewProtocol`) while they are in flight."""

  def __init__(self, image, label_mask, rows, payload, p: ViewProtocol):
    self.size = image.shape[:2]
    self.label_mask, self.rows, self.payload, self.p = label_mask, rows, payload, p
    self.work = p.resized(*self.size)
    x = resize_image(image, self.work, align_corners=False)
    height, width = self.work
    self.canvas = self.count = self.global_scores = None
    if p.crop_size is None:
      m = p.size_multiple
      self.crops = [(0, 0, 0, _pad_to(x, -(-height // m) * m, -(-width // m) * m, p.pad_value))]
    else:
      c = p.crop_size
      ys, xs = range(0, height - c + 1, p.stride), range(0, width - c + 1, p.stride)
      if not ys or not xs or ys[-1] + c != height or xs[-1] + c != width:
        raise ValueError(f"windows of {c} at stride {p.stride} do not cover the resized "
                         f"image {height} x {width}; choose a size they tile")
      self.crops = [(1, y0, x0, x[y0:y0 + c, x0:x0 + c]) for y0 in ys for x0 in xs]
      if p.global_view:
        self.crops.append((2, 0, 0, resize_image(image, (c, c), align_corners=False)))
    self.remaining = len(self.crops)

  def add(self, kind, y0, x0, logits):
    if self.p.activation == "sigmoid":
      logits = 1 / (1 + np.exp(-logits))
    height, width = self.work
    if kind == 0:
      self.canvas = logits[:height, :width]
    elif kind == 1:
      if self.canvas is None:
        self.canvas = np.zeros((height, width, logits.shape[-1]), np.float32)
        self.count = np.zeros((height, width, 1), np.float32)
      c = logits.shape[0]
      self.canvas[y0:y0 + c, x0:x0 + c] += logits
      self.count[y0:y0 + c, x0:x0 + c] += 1
    else:
      self.global_scores = logits
    self.remaining -= 1

  def finish(self, reduce: Callable | None = None) -> np.ndarray:
    assert self.remaining == 0
    scores = self.canvas if self.count is None else self.canvas / self.count
    if self.global_scores is not None:
      scores += resize_image(self.global_scores, self.work, align_corners=False)
      scores /= 2
    self.canvas = self.count = self.global_scores = None
    return resize_blocks([scores], self.size, False, reduce=reduce, label_mask=self.label_mask)


class SlidingWindowInference:
  """Multi-scale sliding-window scores of whole images (module docstring).

  Args:
    runner: a `CropRunner` (or any callable with its signature) whose flip
      setting matches `window.flip`.
    window: the protocol parameters.
  """

  def __init__(self, runner: CropRunner, window: SlidingWindow | ViewProtocol):
    if getattr(runner, "flip", window.flip) != window.flip:
      raise ValueError(f"runner.flip={runner.flip} differs from window.flip={window.flip}")
    self.runner = runner
    self.window = window

  @classmethod
  def for_model(cls, model, window: SlidingWindow | ViewProtocol, *, mesh=None,
                crops_per_device: int = 2) -> "SlidingWindowInference":
    """For an LSeg model: checks the crop size and builds its CropRunner."""
    m = model.size_multiple
    if (window.crop_size or m) % m:
      raise ValueError(f"crop_size={window.crop_size} is not a multiple of {m}, the input "
                       f"size multiple of backbone {model.cfg.backbone}")
    if isinstance(window, ViewProtocol):
      window = dataclasses.replace(window, size_multiple=m)
    apply, state = apply_lib.model_apply(model)
    devices = jax.local_device_count() if mesh is None else mesh.size  # CropRunner's default
    runner = CropRunner(apply, state, flip=window.flip, mesh=mesh,
                        batch_size=crops_per_device * devices)
    return cls(runner, window)

  def __call__(self, image: np.ndarray, text_emb, label_mask: np.ndarray | None = None
               ) -> np.ndarray:
    """image float32 [H, W, 3] (normalised) -> scores float32 [H, W, L]."""
    return next(self.stream([(image, label_mask, None)], text_emb))[0]

  def stream(self, items: Iterable[tuple[np.ndarray, np.ndarray | None, Any]], text_emb,
             reduce: Callable | None = None) -> Iterator[tuple[np.ndarray, Any]]:
    """(scores float32 [H, W, L], or [H, W, K] for rows, or reduce's [H, W]; payload) of
    each (image float32 [H, W, 3], labels, payload) of `items`, in input order, their
    windows batched together across images (one window shape per batch); H, W may differ.

    labels: None (every label of text_emb [L, D]), a bool mask [L] (labels False score
    -inf), or int rows [K] of `text_emb`, the only labels the image is scored over (K the
    same for every image of the stream). reduce: None, or a function of device score rows
    [R, W, L] -> [R, W] (an argmax), computed by row blocks.
    """
    num_labels = text_emb.shape[0]
    batch = getattr(self.runner, "batch_size", 1)
    pending: collections.deque[_ImageJob] = collections.deque()
    queues: dict[tuple, list] = collections.defaultdict(list)
    table = None  # host copy of text_emb, for images scored over rows
    num_rows = None

    def run(entries):
      crops = np.stack([e[4] for e in entries]).astype(np.float32)
      if num_rows is not None:
        logits = self.runner(crops, table[np.stack([e[0].rows for e in entries])], None)
      else:
        masks = np.stack([np.ones(num_labels, bool) if e[0].label_mask is None
                          else e[0].label_mask for e in entries])
        logits = self.runner(crops, text_emb, masks)
      for (job, si, y0, x0, _), out in zip(entries, logits):
        job.add(si, y0, x0, out)

    for index, (image, labels, payload) in enumerate(items):
      image = np.asarray(image, np.float32)
      if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an image [H, W, 3], got shape {image.shape}")
      label_mask = rows = None
      if labels is not None and np.asarray(labels).dtype != bool:
        rows = np.asarray(labels)
        if (rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer) or not rows.size
            or rows.min() < 0 or rows.max() >= num_labels):
          raise ValueError(f"label rows {rows.tolist()}; expected a non-empty int list of "
                           f"rows in [0, {num_labels})")
        if index == 0:
          table, num_rows = np.asarray(text_emb, np.float32), rows.size
        elif num_rows is None:
          raise ValueError(f"image {index} names label rows; the images before it did not "
                           "(a stream uses one kind)")
        elif num_rows != rows.size:
          raise ValueError(f"image {index} names {rows.size} label rows; every image of a "
                           f"stream must name the same number ({num_rows} before)")
      elif num_rows is not None:
        raise ValueError(f"image {index} has a label mask or None; the images before it "
                         "named label rows (a stream uses one kind)")
      elif labels is not None:
        label_mask = np.asarray(labels, bool)
        if label_mask.shape != (num_labels,):
          raise ValueError(f"label_mask has shape {label_mask.shape}; expected [{num_labels}]")
      job_type = _ImageJob if isinstance(self.window, SlidingWindow) else _ViewJob
      job = job_type(image, label_mask, rows, payload, self.window)
      pending.append(job)
      for si, y0, x0, crop in job.crops:
        queue = queues[crop.shape]
        queue.append((job, si, y0, x0, crop))
        if len(queue) >= batch:
          run(queue)
          queue.clear()
      job.crops = None
      while pending and pending[0].remaining == 0:
        done = pending.popleft()
        yield done.finish(reduce), done.payload
    for queue in queues.values():
      if queue:
        run(queue)
    while pending:
      done = pending.popleft()
      yield done.finish(reduce), done.payload


# --- Whole-image prediction (tools/predict.py) ---
def model_input_size(h: int, w: int, multiple: int, max_side: int | None = None) -> tuple[int, int]:
  """(H', W') fed to the model: (h, w) if both are multiples of `multiple`, else
  each side rounded to the nearest multiple (at least one multiple). With `max_side`,
  an image whose long side exceeds it is first scaled down (aspect kept) so that the
  long side is at most max_side rounded down to a multiple."""
  if max_side is not None and max(h, w) > max_side:
    limit = max(multiple, max_side // multiple * multiple)
    scale = limit / max(h, w)
    return tuple(min(limit, max(multiple, int(round(s * scale / multiple)) * multiple))
                 for s in (h, w))
  if h % multiple == 0 and w % multiple == 0:
    return h, w
  return tuple(max(multiple, int(round(s / multiple)) * multiple) for s in (h, w))


def normalize_image(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 (x / 255 - 0.5) / 0.5, as the data pipeline does."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
  return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


class ImagePredictor:
  """Logits, label map and pixel embeddings of whole images, one at a time, one compilation per
  input size. An image whose sides are not multiples of `model.size_multiple` is resized (bilinear,
  align_corners=False) to `model_input_size` and its logits resized back the same way before the
  argmax; the embeddings stay at the model's resolution [H'/2, W'/2, D]."""

  def __init__(self, model):
    self.size_multiple = model.size_multiple
    self.apply, self.state = apply_lib.model_apply(model)
    self.mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.local_devices()[:1])

  def __call__(self, image: np.ndarray, text_emb, *, embeddings: bool = False) -> dict[str, Any]:
    """image uint8 [H, W, 3] -> {"logits" float32 [H, W, L], "label_map" int32
    [H, W], "embeddings" float32 [H'/2, W'/2, D] or None, "input_size" (H', W')}."""
    x = normalize_image(image)
    h, w = x.shape[:2]
    size = model_input_size(h, w, self.size_multiple)
    if size != (h, w):
      x = resize_image(x, size, align_corners=False)
    forward = apply_lib.forward(self.apply, self.mesh, with_embeddings=embeddings)
    out = forward(self.state, jnp.asarray(x)[None], jnp.asarray(text_emb), None)
    logits, emb = out if embeddings else (out, None)
    logits = np.asarray(logits[0])
    if size != (h, w):
      logits = resize_image(logits, (h, w), align_corners=False)
    return {"logits": logits, "label_map": logits.argmax(-1).astype(np.int32),
            "embeddings": None if emb is None else np.asarray(emb[0]), "input_size": size}
