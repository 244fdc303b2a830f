"""The `folder` user dataset and bad-data handling on real files."""
import os

import numpy as np
from PIL import Image
import pytest

from lseg_jax.data import IGNORE_INDEX
from lseg_jax.data import folder
from lseg_jax.data import input_pipeline as ip
from lseg_jax.data import registry

LABELS = ["background", "road", "tree"]


def _write(root, num=5, labels=LABELS, size=(24, 32)):
  """Writes images (png and jpg), masks (255 = ignore) and labels.txt."""
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  os.makedirs(os.path.join(root, "masks"), exist_ok=True)
  with open(os.path.join(root, "labels.txt"), "w") as f:
    f.write("\n".join(labels) + "\n\n")
  arrays = {}
  for i in range(num):
    image = rng.integers(0, 256, (*size, 3), np.uint8)
    mask = rng.integers(0, len(labels), size).astype(np.uint8)
    mask[0] = 255
    stem = f"img_{i:02d}"
    ext = ".jpg" if i % 2 else ".png"
    Image.fromarray(image).save(os.path.join(root, "images", stem + ext))
    Image.fromarray(mask).save(os.path.join(root, "masks", stem + ".png"))
    arrays[stem] = (image, mask)
  return arrays


def _cfg(root, **overrides):
  cfg = ip.default_data_config()
  cfg.update({**dict(name="folder", data_dir=str(root), crop_size=16,
                     base_size=24, num_parallel_calls=2), **overrides})
  return cfg


def test_source_reads_files(tmp_path):
  arrays = _write(tmp_path)
  source = registry.get_source("folder", "train", data_dir=str(tmp_path))
  assert source.label_names == LABELS and source.num_examples == 5
  examples = list(source.as_dataset().as_numpy_iterator())
  for ex in examples:
    stem = os.path.splitext(os.path.basename(ex["file_name"].decode()))[0]
    image, mask = arrays[stem]
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == image.shape
    if ex["file_name"].endswith(b".png"):
      np.testing.assert_array_equal(ex["image"], image)
    expected = np.where(mask == 255, IGNORE_INDEX, mask.astype(np.int32))
    np.testing.assert_array_equal(ex["mask"], expected)


def test_split_subfolders(tmp_path):
  _write(tmp_path / "train", num=3)
  _write(tmp_path / "validation", num=2)
  os.remove(tmp_path / "validation" / "labels.txt")  # Falls back to the top.
  (tmp_path / "labels.txt").write_text("\n".join(LABELS))
  assert registry.get_source("folder", "train",
                             data_dir=str(tmp_path)).num_examples == 3
  assert registry.get_source("folder", "validation",
                             data_dir=str(tmp_path)).num_examples == 2


def test_train_and_eval_pipelines(tmp_path):
  _write(tmp_path)
  cfg = _cfg(tmp_path)
  assert ip.label_table(cfg) == LABELS
  batch = next(ip.make_train_iterator(cfg, global_batch_size=4, seed=0,
                                      process_index=0, process_count=1))
  assert batch["image"].shape == (4, 16, 16, 3)
  assert batch["label"].max() < 3 and (batch["label"] == IGNORE_INDEX).any()
  batches = list(ip.make_eval_iterator(cfg, batch_size=2, process_index=0,
                                       process_count=1))
  assert len(batches) == 3
  assert sum(b["valid"].sum() for b in batches) == 5
  np.testing.assert_array_equal(batches[0]["image_size"], [[24, 32]] * 2)
  assert (batches[0]["label"][:, 0] == IGNORE_INDEX).all()


@pytest.mark.parametrize("problem", ["missing_mask", "no_labels", "blank_line"])
def test_layout_errors_are_explained(tmp_path, problem):
  _write(tmp_path, num=2)
  if problem == "missing_mask":
    os.remove(tmp_path / "masks" / "img_01.png")
    match = "have no mask.*img_01"
  elif problem == "no_labels":
    os.remove(tmp_path / "labels.txt")
    match = "no labels.txt"
  else:
    (tmp_path / "labels.txt").write_text("a\n\nb\n")
    match = "line 2 is empty"
  with pytest.raises(ValueError, match=match):
    registry.get_source("folder", "train", data_dir=str(tmp_path))


def _corrupt(root):
  with open(os.path.join(root, "images", "img_02.png"), "wb") as f:
    f.write(b"\x89PNG this is not an image")
  return "img_02.png"


def _mismatch(root):
  Image.fromarray(np.zeros((10, 10), np.uint8)).save(
      os.path.join(root, "masks", "img_03.png"))
  return "img_03.jpg"


@pytest.mark.parametrize("damage,reason", [
    (_corrupt, "Unknown image file format or damaged image .*Pillow: cannot identify image "
               r"file\); expected a JPEG"),
    (_mismatch, r"mask has size \[10 10\] but its image has size \[24 32\]")])
def test_bad_example_error_or_skip(tmp_path, damage, reason):
  _write(tmp_path, num=6)
  bad_file = damage(tmp_path)
  it = ip.make_train_iterator(_cfg(tmp_path), global_batch_size=6, seed=0,
                              process_index=0, process_count=1)
  with pytest.raises(ip.BadExampleError, match=f"{bad_file}.*{reason}"):
    next(it)
  it = ip.make_train_iterator(_cfg(tmp_path, on_bad_example="skip"),
                              global_batch_size=6, seed=0, process_index=0,
                              process_count=1)
  batch = next(it)
  assert batch["image"].shape[0] == 6
  assert it.num_skipped >= 1
  assert all(name.endswith(bad_file) for name in it.stats.skipped)
  # Eval pads over skipped examples: still one fixed-size pass.
  ev = ip.make_eval_iterator(_cfg(tmp_path, on_bad_example="skip"),
                             batch_size=4, process_index=0, process_count=1)
  batches = list(ev)
  assert len(batches) == 2 and sum(b["valid"].sum() for b in batches) == 5
  assert ev.num_skipped == 1


def test_out_of_range_mask_value_names_file_and_value(tmp_path):
  _write(tmp_path, num=3)
  mask = np.zeros((24, 32), np.uint8)
  mask[5, 5] = 7
  Image.fromarray(mask).save(tmp_path / "masks" / "img_01.png")
  for on_bad in ("error", "skip"):
    it = ip.make_eval_iterator(_cfg(tmp_path, on_bad_example=on_bad),
                               batch_size=3, process_index=0, process_count=1)
    with pytest.raises(ip.BadExampleError,
                       match=r"img_01\.jpg.*value 7 outside \[0, 3\)"):
      next(it)


def test_palette_mask_is_rejected_with_advice(tmp_path):
  _write(tmp_path, num=2)
  palette = Image.fromarray(np.zeros((24, 32), np.uint8)).convert("P")
  palette.save(tmp_path / "masks" / "img_00.png")
  it = ip.make_eval_iterator(_cfg(tmp_path), batch_size=2, process_index=0,
                             process_count=1)
  with pytest.raises(ip.BadExampleError, match="img_00.png.*palette PNG"):
    next(it)


def test_read_label_names_rejects_duplicates(tmp_path):
  (tmp_path / "labels.txt").write_text("a\nb\na\n")
  with pytest.raises(ValueError, match="'a' twice"):
    folder.read_label_names(str(tmp_path / "labels.txt"))
