"""tools/predict.py end to end: a tiny random model saved with checkpoint.save_model.

The tokenizer is a CLIP-format vocabulary written here (bytes only, no
merges), recorded in the checkpoint meta as the tools expect.
"""
import json
import os
from pathlib import Path

from flax import nnx
import numpy as np
import pytest
from PIL import Image

from lseg_jax import checkpoint
from lseg_jax import visualize
from lseg_jax.errors import UserError
from lseg_jax.models import lseg

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["dog", "grass", "other"]


def _load_tool(name):
  """The logic of tools/NAME.py (`lseg_jax.cli.NAME`)."""
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(f"lseg_jax.cli.{name}")


def _byte_symbols():
  """CLIP's printable stand-ins for the 256 byte values."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  symbols, extra = [], 0
  for b in range(256):
    if b in keep:
      symbols.append(chr(b))
    else:
      symbols.append(chr(256 + extra))
      extra += 1
  return symbols


def write_tiny_vocab(folder: Path) -> int:
  """A CLIP BPE vocabulary without merges; returns its size."""
  symbols = _byte_symbols()
  vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}),
                                     encoding="utf-8")
  (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
  return len(vocab)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  root = tmp_path_factory.mktemp("predict")
  vocab_size = write_tiny_vocab(root / "ckpt" / "tokenizer")
  cfg = lseg.LSegConfig(backbone="tiny_vit32", arch_option=1, block_depth=1,
                        text_vocab_size=vocab_size)
  model = lseg.LSeg(cfg, rngs=nnx.Rngs(0))
  model.eval()
  checkpoint.save_model(str(root / "ckpt"), model, extra_meta={"tokenizer": "tokenizer"})
  (root / "text_dim").write_text(str(model.text_dim))
  rng = np.random.default_rng(0)
  images = root / "images"
  images.mkdir()
  Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(images / "odd.png")
  Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(images / "even.jpg")
  return root


@pytest.fixture(scope="module")
def predict():
  return _load_tool("predict")


def test_single_image_outputs(ckpt, predict, tmp_path):
  out = tmp_path / "seg.png"
  rc = predict.main(["--checkpoint", str(ckpt / "ckpt"), "--image", str(ckpt / "images/odd.png"),
                     "--labels", " dog, grass ,other", "--prompt", "a photo of a {}.",
                     "--out", str(out), "--logits-out", str(tmp_path / "logits.npz"),
                     "--embeddings-out", str(tmp_path / "emb.npy")])
  assert rc == 0
  report = json.loads((tmp_path / "seg.json").read_text())
  assert report["labels"] == LABELS
  assert report["size"] == [50, 70] and report["model_input_size"] == [64, 64]
  assert sum(report["area_fraction"].values()) == pytest.approx(1.0)

  # Label map: values index the labels; equals the argmax of the saved logits.
  label_map = np.asarray(Image.open(tmp_path / "seg_labels.png"))
  logits = np.load(tmp_path / "logits.npz")["logits"]
  assert logits.dtype == np.float32 and logits.shape == (3, 50, 70)
  np.testing.assert_array_equal(label_map, logits.argmax(0))
  for name, frac in report["area_fraction"].items():
    assert frac == pytest.approx(np.mean(label_map == LABELS.index(name)))

  # Embeddings: [H'/2, W'/2, D] float16, unit norm.
  emb = np.load(tmp_path / "emb.npy")
  dim = int((ckpt / "text_dim").read_text())
  assert emb.dtype == np.float16 and emb.shape == (32, 32, dim)
  np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=-1), 1.0, atol=2e-3)

  # Overlay: image then legend; legend rows are the labels in order.
  overlay = np.asarray(Image.open(out).convert("RGB"))
  assert overlay.shape[0] >= 50 and overlay.shape[1] > 70
  colours = visualize.palette(3)
  for i in range(3):
    x, y = visualize.swatch_centre(i, 70)
    np.testing.assert_array_equal(overlay[y, x], colours[i])


def test_folder_of_images(ckpt, predict, tmp_path):
  labels_file = tmp_path / "labels.txt"
  labels_file.write_text("dog\n\ngrass\nother\n")
  rc = predict.main(["--checkpoint", str(ckpt / "ckpt"), "--images", str(ckpt / "images"),
                     "--labels-file", str(labels_file), "--out", str(tmp_path / "res"),
                     "--embeddings-out", str(tmp_path / "emb"),
                     "--tokenizer", str(ckpt / "ckpt" / "tokenizer")])
  assert rc == 0
  for stem, (h, w) in (("odd", (50, 70)), ("even", (64, 96))):
    assert (tmp_path / "res" / f"{stem}.png").is_file()
    report = json.loads((tmp_path / "res" / f"{stem}.json").read_text())
    assert report["labels"] == LABELS and report["size"] == [h, w]
    assert np.asarray(Image.open(tmp_path / "res" / f"{stem}_labels.png")).shape == (h, w)
  # Sides already multiples of 32: no resize, embeddings at half resolution.
  dim = int((ckpt / "text_dim").read_text())
  assert np.load(tmp_path / "emb" / "even.npy").shape == (32, 48, dim)


@pytest.mark.parametrize("argv,match", [
    (["--images", "IMG", "--labels", "a", "--out", "x.png"], "needs an output folder"),
    (["--image", "IMG", "--labels", "a", "--out", "x.png", "--logits-out", "l.npy"],
     "must end in .npz"),
    (["--image", "IMG", "--labels", "a", "--out", "x.png", "--alpha", "2"], "alpha"),
])
def test_bad_arguments(predict, argv, match, capsys):
  with pytest.raises(SystemExit) as e:
    predict.parse_args(["--checkpoint", "C"] + argv)
  assert e.value.code == 2
  assert match in capsys.readouterr().err


def test_bad_labels_and_missing_image(ckpt, predict, tmp_path):
  with pytest.raises(UserError, match="empty label"):
    predict.main(["--checkpoint", str(ckpt / "ckpt"), "--image", str(ckpt / "images/odd.png"),
                  "--labels", "dog,,grass", "--out", str(tmp_path / "x.png")])
  with pytest.raises(UserError, match="does not exist"):
    predict.main(["--checkpoint", str(ckpt / "ckpt"), "--image", str(tmp_path / "nope.png"),
                  "--labels", "dog", "--out", str(tmp_path / "x.png")])


def test_palette_is_distinct_and_never_black():
  colours = visualize.palette(300)
  assert len({tuple(c) for c in colours}) == 300
  assert not np.any(np.all(colours == 0, axis=1))


def test_labels_with_escaped_commas(ckpt, predict, tmp_path):
  # What the shell passes for --labels 'dog\, brown,grass,other'.
  rc = predict.main(["--checkpoint", str(ckpt / "ckpt"), "--image", str(ckpt / "images/odd.png"),
                     "--labels", "dog\\, brown,grass,other", "--out", str(tmp_path / "x.png")])
  assert rc == 0
  assert json.loads((tmp_path / "x.json").read_text())["labels"] == [
      "dog, brown", "grass", "other"]
  with pytest.raises(UserError) as e:
    predict.main(["--checkpoint", str(ckpt / "ckpt"), "--image", str(ckpt / "images/odd.png"),
                  "--labels", "background,red disc\\ large,other", "--out",
                  str(tmp_path / "y.png")])
  assert str(e.value) == (
      'label "red disc\\ large" in "background,red disc\\ large,other" has a '
      "backslash not followed by a comma; expected \\, for a comma inside a label and no "
      "other backslash (use --labels-file for names with backslashes)")
  assert not (tmp_path / "y.png").exists()
