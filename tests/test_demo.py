"""tools/demo.py through its HTTP API: a server on a free localhost port, driven by
gradio_client, with a tiny random model saved by checkpoint.save_model."""
import json
import os
from pathlib import Path
import queue
import socket
import subprocess
import sys
import threading

from flax import nnx
import numpy as np
from PIL import Image
import pytest

gradio_client = pytest.importorskip("gradio_client", reason="the demo extra is not installed")
pytest.importorskip("gradio", reason="the demo extra is not installed")

from lseg_jax import checkpoint  # noqa: E402
from lseg_jax import predict as predict_lib  # noqa: E402
from lseg_jax import text  # noqa: E402
from lseg_jax import visualize  # noqa: E402
from lseg_jax.cli import demo  # noqa: E402
from lseg_jax.cli import predict as predict_cli  # noqa: E402
from lseg_jax.errors import UserError  # noqa: E402
from lseg_jax.models import lseg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELS = "dog, grass, other"
SINGLE, MULTI = predict_lib.SINGLE_SCALE, predict_lib.MULTI_SCALE


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def save_tiny_checkpoint(directory):
  """A tiny random LSeg with the byte-level tokenizer; multi-scale windows of 64 px."""
  cfg = lseg.LSegConfig(backbone="tiny_vit32", arch_option=1, block_depth=1,
                        text_vocab_size=text.BYTE_LEVEL_VOCAB_SIZE)
  model = lseg.LSeg(cfg, rngs=nnx.Rngs(0))
  model.eval()
  checkpoint.save_model(str(directory), model, extra_meta={
      "tokenizer": text.BYTE_LEVEL_TOKENIZER, "label_names": ["dog", "grass", "other"],
      "config": {"data": {"base_size": 64, "crop_size": 64}}})


def start_server(argv):
  args = demo.parse_args(argv + ["--host", "127.0.0.1", "--port", str(free_port())])
  app, backend = demo.launch(args, block=False)
  return app, backend, gradio_client.Client(app.local_url, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  save_tiny_checkpoint(root / "ckpt")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(root / "odd.png")
  Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(root / "even.jpg")
  Image.fromarray(rng.integers(0, 256, (40, 60), dtype=np.uint8)).save(root / "gray.png")
  Image.fromarray(rng.integers(0, 256, (40, 60, 4), dtype=np.uint8)).save(root / "rgba.png")
  Image.fromarray(rng.integers(0, 65536, (40, 60), dtype=np.uint16)).save(root / "deep.png")
  # A very large image (long side 3000 > --max-side 128): a smooth gradient keeps the file small.
  yy, xx = np.mgrid[0:2000, 0:3000]
  big = np.stack([xx * 255 // 2999, yy * 255 // 1999, (xx + yy) % 256], -1).astype(np.uint8)
  Image.fromarray(big).save(root / "big.png")
  (root / "notes.txt").write_text("not an image\n")
  return root


@pytest.fixture(scope="module")
def server(files):
  app, backend, client = start_server(["--checkpoint", str(files / "ckpt"), "--max-side", "128"])
  yield client, backend
  app.close()
  backend.close()


def segment(client, image, labels=LABELS, template="", protocol=SINGLE, alpha=0.5):
  overlay, colour_map, table, downloads, status = client.predict(
      gradio_client.handle_file(str(image)), labels, template, protocol, alpha,
      api_name="/segment")
  by_suffix = {os.path.basename(p).split("_lseg", 1)[1]: p for p in downloads}
  with open(by_suffix[".json"], encoding="utf-8") as f:
    report = json.load(f)
  return {"overlay": np.asarray(Image.open(overlay).convert("RGB")),
          "colour_map": np.asarray(Image.open(colour_map).convert("RGB")),
          "label_map": np.asarray(Image.open(by_suffix["_labels.png"])),
          "download_overlay": np.asarray(Image.open(by_suffix[".png"]).convert("RGB")),
          "table": table, "report": report, "status": status}


def run_predict_tool(files, tmp_path, image, *extra):
  out = tmp_path / "tool" / "seg.png"
  assert predict_cli.main(["--checkpoint", str(files / "ckpt"), "--image", str(image),
                           "--labels", LABELS, "--out", str(out), *extra]) == 0
  return {"overlay": np.asarray(Image.open(out).convert("RGB")),
          "label_map": np.asarray(Image.open(tmp_path / "tool" / "seg_labels.png")),
          "report": json.loads((tmp_path / "tool" / "seg.json").read_text())}


@pytest.mark.parametrize("protocol,flags", [(SINGLE, []), (MULTI, ["--multiscale"])])
def test_same_result_as_predict_tool(server, files, tmp_path, protocol, flags):
  client, _ = server
  got = segment(client, files / "odd.png", protocol=protocol)
  want = run_predict_tool(files, tmp_path, files / "odd.png", *flags)

  np.testing.assert_array_equal(got["label_map"], want["label_map"])
  assert got["label_map"].shape == (50, 70)
  assert got["report"]["area_fraction"] == want["report"]["area_fraction"]
  assert got["report"]["labels"] == want["report"]["labels"] == ["dog", "grass", "other"]
  assert got["report"]["protocol"] == want["report"]["protocol"]
  assert got["report"]["protocol"]["name"] == protocol
  # The overlay: the image's size, then the legend; the same PNG the tool writes.
  np.testing.assert_array_equal(got["overlay"], want["overlay"])
  np.testing.assert_array_equal(got["download_overlay"], got["overlay"])
  image = predict_lib.load_image(files / "odd.png").image
  np.testing.assert_array_equal(got["overlay"][:50, :70],
                                visualize.overlay(image, got["label_map"], 3, alpha=0.5))
  assert np.all(got["overlay"][:, 70:].reshape(-1, 3).min(0) < 255)  # the legend is there
  np.testing.assert_array_equal(got["colour_map"], visualize.colorize(got["label_map"], 3))
  # The area table: one row per label, in label order, areas of the label map.
  rows = got["table"]["data"]
  assert [r[1] for r in rows] == ["dog", "grass", "other"]
  for i, row in enumerate(rows):
    assert row[4] == int(np.sum(got["label_map"] == i))
    assert row[3] == pytest.approx(100 * np.mean(got["label_map"] == i), abs=0.01)
  assert protocol in got["status"]


@pytest.mark.parametrize("image,labels,template,match", [
    ("odd.png", "", "", "no labels given"),
    ("odd.png", " , ", "", "empty label"),
    ("odd.png", "dog,,grass", "", "empty label at position 2"),
    ("odd.png", "dog, grass, Dog", "", "duplicate labels: 'dog'"),
    ("odd.png", "dog, grass", "a photo", "must contain exactly one {}"),
    ("notes.txt", "dog, grass", "", "'notes.txt' is not an image file"),
])
def test_bad_input_gets_a_message(server, files, image, labels, template, match):
  client, _ = server
  with pytest.raises(gradio_client.exceptions.AppError, match=match):
    client.predict(gradio_client.handle_file(str(files / image)), labels, template, SINGLE,
                   0.5, api_name="/segment")
  # The server keeps serving.
  assert segment(client, files / "even.jpg")["label_map"].shape == (64, 96)


def test_long_label_is_a_warning(server, files):
  client, _ = server
  long_label = "a very long label " * 6  # 108 bytes: over 77 byte-level tokens
  got = segment(client, files / "even.jpg", labels=f"dog, {long_label.strip()}",
                template="a photo of a {}.")
  assert "CLIP reads 77" in got["status"]
  assert len(got["report"]["warnings"]) == 1 and "CLIP reads 77" in got["report"]["warnings"][0]
  assert got["report"]["prompt"] == "a photo of a {}."
  assert got["label_map"].shape == (64, 96)


def test_large_image_is_shrunk(server, files):
  client, _ = server
  got = segment(client, files / "big.png")
  assert got["label_map"].shape == (85, 128)  # 2000x3000 with long side 128
  assert got["report"]["size"] == [85, 128]
  assert got["report"]["original_size"] == [2000, 3000]
  assert "shrunk to 128x85" in got["status"]


@pytest.mark.parametrize("name,note", [
    ("gray.png", "grayscale image"), ("rgba.png", "transparency"),
    ("deep.png", "16-bit grayscale image"),
])
def test_image_modes(server, files, tmp_path, name, note):
  client, _ = server
  got = segment(client, files / name)
  assert note in got["status"] and note in got["report"]["input_conversion"]
  want = run_predict_tool(files, tmp_path, files / name)
  np.testing.assert_array_equal(got["label_map"], want["label_map"])
  assert got["label_map"].shape == (40, 60)


def test_concurrent_clients_get_their_own_results(server, files):
  client, backend = server
  url = client.src
  jobs = {"a": (files / "odd.png", "dog, grass, other"),
          "b": (files / "even.jpg", "sky, road, car, tree")}
  expected = {k: backend.segmenter(predict_lib.load_image(img).image,
                                   predict_lib.parse_labels(lab))
              for k, (img, lab) in jobs.items()}
  results, errors = {}, []

  def user(key):
    try:
      own = gradio_client.Client(url, verbose=False)
      image, labels = jobs[key]
      pending = [own.submit(gradio_client.handle_file(str(image)), labels, "", SINGLE, 0.5,
                            api_name="/segment") for _ in range(3)]
      results[key] = [p.result(timeout=300) for p in pending]
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=user, args=(k,)) for k in jobs]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  for key, outs in results.items():
    want = expected[key]
    assert len(outs) == 3
    for _, _, table, downloads, _ in outs:
      assert [r[1] for r in table["data"]] == want.labels
      label_png = next(p for p in downloads if p.endswith("_labels.png"))
      np.testing.assert_array_equal(np.asarray(Image.open(label_png)), want.label_map)
      report = json.loads(open(next(p for p in downloads if p.endswith(".json")),
                               encoding="utf-8").read())
      assert report["labels"] == want.labels


def test_missing_default_checkpoint_says_how_to_make_one(files, tmp_path):
  """The real command, started where no runs/synthetic_tiny exists, then given one."""
  port = free_port()
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "demo.py"), "--port", str(port)],
                          cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = queue.Queue()
  threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
  try:
    output = ""
    while "ready in" not in output:
      output += lines.get(timeout=300)
    assert "No checkpoint to run" in output and demo.MAKE_DEFAULT_COMMAND in output
    client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
    with pytest.raises(gradio_client.exceptions.AppError, match="tools/run_default.py"):
      client.predict(None, "dog", "", SINGLE, 0.5, api_name="/segment")
    # The page carries the command too (the banner's initial value).
    banners = [c["props"].get("value") for c in client.config["components"]
               if c.get("props", {}).get("elem_id") == "checkpoint"]
    assert banners and demo.MAKE_DEFAULT_COMMAND in banners[0]
    # Once the default run exists, the running page uses it.
    save_tiny_checkpoint(tmp_path / demo.DEFAULT_CHECKPOINT)
    got = segment(client, files / "even.jpg")
    assert got["label_map"].shape == (64, 96)
    assert got["report"]["checkpoint"] == str(tmp_path / demo.DEFAULT_CHECKPOINT)
  finally:
    proc.terminate()
    proc.wait(timeout=60)


def test_bad_command_line():
  with pytest.raises(SystemExit) as e:
    demo.parse_args(["--max-side", "8"])
  assert e.value.code == 2
  with pytest.raises(UserError, match="cannot load checkpoint '/nonexistent/ckpt'"):
    demo.launch(demo.parse_args(["--checkpoint", "/nonexistent/ckpt"]), block=False)
