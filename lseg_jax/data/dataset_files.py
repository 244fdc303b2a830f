"""Reading datasets in their official on-disk layouts (shared by the sources).

A dataset root is a `FileTree`: a folder (any path `tf.io.gfile` reads, gs:// included) or a
folder inside a .zip archive, so a source reads the archive the user downloaded without
extracting it. Paths inside a tree are relative and '/'-separated. `find_root` locates a tree
and raises the "put file X at Y" error when it is missing; `pair_files` matches images with
label files; `FileSegmentation` / `FileEpisodes` are the indexed sources built on them.
"""
from __future__ import annotations

import fnmatch
import io
import threading
import zipfile

import numpy as np
import tensorflow as tf

from lseg_jax.data import preprocess
from lseg_jax.data import registry
from lseg_jax.labels import IGNORE_INDEX, OTHER_LABEL

# The first bytes of a TIFF file (little- and big-endian).
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")


class FileTree:
  """Read access to the files under one dataset root."""

  location: str

  def glob(self, pattern: str) -> list[str]:
    """Sorted relative paths matching `pattern` ('*' stays within a folder)."""
    raise NotImplementedError

  def read_bytes(self, path: str) -> bytes:
    """Contents of a (small) file, read eagerly in Python."""
    raise NotImplementedError

  def read(self, path: tf.Tensor) -> tf.Tensor:
    """Graph op: contents of file `path` (scalar tf.string)."""
    raise NotImplementedError

  def describe(self, path: str) -> str:
    """Where `path` is, for messages."""
    return f"{self.location}/{path}"


class FolderTree(FileTree):
  """Files under a folder."""

  def __init__(self, root: str):
    self.location = root.rstrip("/")

  def glob(self, pattern):
    start = len(self.location) + 1
    return sorted(p[start:] for p in tf.io.gfile.glob(f"{self.location}/{pattern}"))

  def read_bytes(self, path):
    with tf.io.gfile.GFile(self.describe(path), "rb") as f:
      return f.read()

  def read(self, path):
    return tf.io.read_file(tf.strings.join([self.location + "/", path]))


class ZipTree(FileTree):
  """Files under folder `prefix` ("" or ending in "/") of a .zip archive."""

  def __init__(self, archive: str, prefix: str = ""):
    self.archive, self.prefix = archive, prefix
    self.location = f"{archive}:{prefix}".rstrip("/")
    self._zip = None
    self._lock = threading.Lock()
    self._names = sorted(
        n[len(prefix):] for n in self._open().namelist()
        if n.startswith(prefix) and not n.endswith("/"))

  def _open(self) -> zipfile.ZipFile:
    with self._lock:
      if self._zip is None:
        self._zip = _open_zip(self.archive)
      return self._zip

  def glob(self, pattern):
    parts = pattern.split("/")
    return [n for n in self._names if len(n.split("/")) == len(parts) and all(
        fnmatch.fnmatchcase(name, part) for name, part in zip(n.split("/"), parts))]

  def read_bytes(self, path):
    # ZipFile serialises reads of a shared handle itself: safe from the parallel tf.data threads.
    return self._open().read(self.prefix + path)

  def read(self, path):
    def _read(p):
      # An object array keeps trailing NUL bytes, which bytes arrays strip.
      return np.array(self.read_bytes(preprocess.as_bytes(p).decode()), dtype=object)
    out = tf.numpy_function(_read, [path], tf.string, stateful=False)
    out.set_shape([])
    return out


def find_root(data_dir: str | None, *, marker: str, dataset: str, expected: str,
              folders: tuple[str, ...] = (), archives: tuple[str, ...] = ()) -> FileTree:
  """The dataset root under `data_dir`: the first tree that contains `marker`.

  Tried in order: `data_dir` itself, `data_dir/<folder>` for each of
  `folders`, then the archives `data_dir` (if it is a .zip file) and
  `data_dir/<archive>`, at their top level or inside one of `folders`.

  Args:
    data_dir: the directory (or .zip archive) the user gave.
    marker: a sub-folder the root must contain (e.g. "images").
    dataset: dataset name, for messages.
    expected: what to download and where to put it, for the error message.
    folders: names the dataset's top folder may have.
    archives: file names of the official .zip archives.

  Raises:
    FileNotFoundError: naming `data_dir` and what was expected there.
  """
  if not data_dir:
    raise ValueError(f"{dataset} needs data_dir=<the directory holding it>. Expected: {expected}")
  data_dir = data_dir.rstrip("/")
  for folder in ("", *folders):
    root = f"{data_dir}/{folder}".rstrip("/")
    if tf.io.gfile.isdir(f"{root}/{marker}"):
      return FolderTree(root)
  zips = [data_dir] if data_dir.endswith(".zip") else []
  zips += [f"{data_dir}/{a}" for a in archives]
  for archive in zips:
    if not tf.io.gfile.exists(archive) or tf.io.gfile.isdir(archive):
      continue
    with _open_zip(archive) as z:
      names = z.namelist()
    for prefix in ("", *(f + "/" for f in folders)):
      if any(n.startswith(f"{prefix}{marker}/") for n in names):
        return ZipTree(archive, prefix)
  looked = [f"{data_dir}/{f}".rstrip("/") for f in ("", *folders)] + zips
  raise FileNotFoundError(
      f"{dataset} not found: no folder {marker}/ in any of {looked}. Expected: {expected}")


def _open_zip(archive):
  if "://" in archive:
    return zipfile.ZipFile(tf.io.gfile.GFile(archive, "rb"))
  return zipfile.ZipFile(archive)


def pair_files(image_tree: FileTree, image_pattern: str, mask_tree: FileTree, mask_pattern: str,
               mask_of, *, dataset: str, expected: str) -> tuple[list[str], list[str]]:
  """Images matching `image_pattern` and their label files `mask_of(image)`.

  (Called with the trees swapped, it lists the label files and finds their images.)

  Raises:
    FileNotFoundError: no file matches, or an image lacks its label file.
  """
  images = image_tree.glob(image_pattern)
  if not images:
    raise FileNotFoundError(
        f"{dataset}: no file matches {image_tree.describe(image_pattern)}. "
        f"Expected: {expected}")
  masks = [mask_of(p) for p in images]
  check_present(mask_tree, masks, mask_pattern, dataset=dataset, expected=expected)
  return images, masks


def check_present(tree: FileTree, paths: list[str], pattern: str, *, dataset: str, expected: str):
  """Raises FileNotFoundError naming the first of `paths` not in `tree`.

  `pattern` must match every one of `paths` (one glob instead of a lookup
  per file, which matters on remote file systems).
  """
  present = set(tree.glob(pattern))
  missing = [p for p in paths if p not in present]
  if missing:
    raise FileNotFoundError(
        f"{dataset}: {tree.describe(missing[0])} is missing ({len(set(missing))} of "
        f"{len(set(paths))} needed files matching {pattern} are). Expected: {expected}")


def split_folder(split: str, folders: dict[str, str], dataset: str) -> str:
  """The folder name of `split` in `folders`, or a ValueError naming both."""
  if split not in folders:
    raise ValueError(f"Unknown {dataset} split {split!r}; expected one of {sorted(folders)}.")
  return folders[split]


def decode_label_png(data: tf.Tensor) -> tf.Tensor:
  """Single-channel label PNG bytes -> int32 [H, W] of the stored values.

  Palette PNGs (VOC, Mapillary Vistas) hold palette indices, which TF's PNG
  decoder would turn into colours: those are decoded with PIL instead.
  """
  is_palette = tf.strings.substr(data, preprocess.PNG_COLOR_TYPE_OFFSET, 1) == b"\x03"
  is_16bit = tf.strings.substr(data, preprocess.PNG_BIT_DEPTH_OFFSET, 1) == b"\x10"

  def _decode_grey():
    mask = preprocess.decode_png_values(data, is_16bit)
    tf.debugging.assert_equal(
        tf.shape(mask)[-1], 1, message="expected a single-channel label PNG (pixel = label value)")
    return mask[..., 0]

  mask = tf.cond(is_palette, lambda: _decode_with_pil(data), _decode_grey)
  mask.set_shape([None, None])
  return mask


def decode_label_map(data: tf.Tensor) -> tf.Tensor:
  """Label PNG or TIFF bytes -> int32 [H, W] of the stored values.

  TIFF maps (16-bit in the prepared A-847 and PC-459 layouts) are read with PIL at
  their full depth: values above 255 stay as stored.
  """
  is_tiff = tf.reduce_any(tf.equal(tf.strings.substr(data, 0, 4), tf.constant(_TIFF_MAGIC)))
  mask = tf.cond(is_tiff, lambda: _decode_with_pil(data), lambda: decode_label_png(data))
  mask.set_shape([None, None])
  return mask


def _decode_with_pil(data):
  """Palette PNGs (their indices) and TIFFs (any integer depth) via PIL."""
  def _decode(b):
    from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
    try:
      mask = np.asarray(Image.open(io.BytesIO(preprocess.as_bytes(b))))
    except (OSError, ValueError) as e:
      reason = ("Pillow cannot identify it" if isinstance(e, UnidentifiedImageError)
                else f"Pillow: {e}")
      return np.zeros((0, 0), np.int32), f"its mask cannot be decoded ({reason})"
    if mask.ndim != 2:
      return np.zeros((0, 0), np.int32), (
          f"its mask has shape {mask.shape}; expected a single-channel label map")
    return mask.astype(np.int32), ""
  return preprocess.with_pil(_decode, data, tf.int32)  # failures as the image decoder's


def decode_luma(data: tf.Tensor) -> tf.Tensor:
  """Image bytes -> int32 [H, W] grey level, exactly as PIL's convert("L")."""
  rgb = tf.cast(preprocess.decode_image(data), tf.int32)
  weights = tf.constant([19595, 38470, 7471], tf.int32)
  return (tf.reduce_sum(rgb * weights, axis=-1) + 32768) // 65536


def map_values(mask: tf.Tensor, table: np.ndarray) -> tf.Tensor:
  """int32 [H, W] raw values -> `table[value]`; values past the table -> -1."""
  size = len(table)
  mapped = tf.gather(tf.constant(table, tf.int32), tf.clip_by_value(mask, 0, size - 1))
  return tf.where((mask >= 0) & (mask < size), mapped, IGNORE_INDEX)


def check_same_size(image: tf.Tensor, mask: tf.Tensor, file_name: tf.Tensor):
  """Fails the example unless image [H, W, 3] and mask [H, W] agree."""
  tf.debugging.Assert(
      tf.reduce_all(tf.shape(image)[:2] == tf.shape(mask)),
      [tf.strings.join([file_name, ": image and label sizes differ"])])


class FilePairs(registry.Source):
  """Image/label file pairs of two trees, addressed by example index."""

  def __init__(self, image_tree: FileTree, images: list[str],
               mask_tree: FileTree, masks: list[str]):
    assert len(images) == len(masks) and images
    self.num_examples = len(images)
    self._image_tree, self._mask_tree = image_tree, mask_tree
    self._images = tf.constant(images)
    self._masks = tf.constant(masks)
    self._names = tf.constant([image_tree.describe(p) for p in images])

  def file_name(self, index):
    return tf.gather(self._names, index)

  def _read(self, index):
    """(image uint8 [H, W, 3], label file bytes, file name) of `index`."""
    image = preprocess.decode_image(self._image_tree.read(tf.gather(self._images, index)))
    mask_bytes = self._mask_tree.read(tf.gather(self._masks, index))
    return image, mask_bytes, self.file_name(index)


class FileSegmentation(FilePairs):
  """A fixed-label-set source: label PNG or TIFF values mapped by `value_table`.

  Raw label value v becomes `value_table[v]` (-1 = ignore); values beyond the table are ignored
  too. With `ignore_value`, the table is unused: that value becomes -1 and every other value is
  its class, so that a value outside [0, L) reaches the bad-example guard, which names it.
  """

  def __init__(self, *, label_names, image_tree, images, mask_tree, masks,
               value_table: np.ndarray, ignore_value: int | None = None):
    super().__init__(image_tree, images, mask_tree, masks)
    self.label_names = list(label_names)
    self._table = np.asarray(value_table, np.int32)
    assert self._table.max() < len(self.label_names)
    self.mask_ignore = ignore_value

  def load(self, index):
    image, mask_bytes, name = self._read(index)
    raw = decode_label_map(mask_bytes)
    if self.mask_ignore is None:
      mask = map_values(raw, self._table)
    else:
      mask = tf.where(raw == self.mask_ignore, IGNORE_INDEX, raw)
    check_same_size(image, mask, name)
    return {"image": image, "mask": mask, "file_name": name}


class FileEpisodes(FilePairs):
  """Zero-shot episodes: one query image and the binary mask of one class.

  Mask: 1 where the raw label equals the example's `foreground` value, -1 where it equals
  `ignore_value`, 0 elsewhere. With `luma_threshold`, the raw label is the label image's grey
  level >= threshold (0/1). Registered with `episodic=True` (see `registry.register`).
  """

  def __init__(self, *, class_names, image_tree, images, mask_tree, masks, class_index, foreground,
               ignore_value: int | None = None, luma_threshold: int | None = None):
    super().__init__(image_tree, images, mask_tree, masks)
    self.class_names = list(class_names)
    self.label_names = [OTHER_LABEL, *self.class_names]
    self._class_index = tf.constant(np.asarray(class_index, np.int32))
    self._foreground = tf.constant(np.asarray(foreground, np.int32))
    self._ignore_value = ignore_value
    self._luma_threshold = luma_threshold

  def load(self, index):
    image, mask_bytes, name = self._read(index)
    if self._luma_threshold is None:
      raw = decode_label_png(mask_bytes)
    else:
      raw = tf.cast(decode_luma(mask_bytes) >= self._luma_threshold, tf.int32)
    mask = tf.cast(raw == tf.gather(self._foreground, index), tf.int32)
    if self._ignore_value is not None:
      mask = tf.where(raw == self._ignore_value, IGNORE_INDEX, mask)
    check_same_size(image, mask, name)
    class_index = tf.gather(self._class_index, index)
    return {"image": image, "mask": mask, "file_name": name, "class_index": class_index,
            "class_name": tf.gather(tf.constant(self.class_names), class_index)}
