"""The open-vocabulary suite: protocols against a direct computation with the model,
scored names and synonyms, row-block scoring, and the suite command end to end on the
benchmarks' fixtures (tests/openvocab_fixtures.py: every benchmark in its prepared
layout), in one process and two on localhost, resumed after a report is deleted.
"""
import json
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax import apply as apply_lib
from lseg_jax import checkpoint
from lseg_jax import evaluate
from lseg_jax import inference
from lseg_jax import metrics
from lseg_jax import openvocab
from lseg_jax import text
from lseg_jax.cli import eval as eval_cli
from lseg_jax.data import registry
from lseg_jax.errors import UserError
from lseg_jax.models import lseg
from lseg_jax.models import resize

import openvocab_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = ["a847", "pc459", "a150", "pc59", "pas20", "pas20b", "pas21"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("openvocab")
  openvocab_fixtures.write_all(str(root))
  return str(root)


@pytest.fixture(scope="module")
def model():
  cfg = lseg.LSegConfig(backbone="tiny_vit32", arch_option=2, block_depth=1,
                        text_vocab_size=text.BYTE_LEVEL_VOCAB_SIZE)
  m = lseg.LSeg(cfg, rngs=nnx.Rngs(0))
  m.eval()
  return m


def _runner(model):
  apply, state = apply_lib.model_apply(model)
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  return inference.CropRunner(apply, state, mesh=mesh, batch_size=2)


def _direct(model, x, emb):
  """The model's logits of one image [h, w, 3] (a plain call)."""
  return np.asarray(model(jnp.asarray(x)[None], emb)[0])


def _resize(x, size):
  return np.asarray(resize.resize_bilinear(jnp.asarray(x), size, False))


def _rel(a, b):
  return np.abs(a - b).max() / np.abs(b).max()


def test_whole_protocol_equals_resize_forward_resize_back(model):
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, (50, 70, 3)).astype(np.float32)
  emb = jnp.asarray(rng.normal(size=(5, model.text_dim)), jnp.float32)
  protocol = inference.ViewProtocol(resize="short_side", size=64, max_size=256,
                                    size_multiple=model.size_multiple)
  ours = inference.SlidingWindowInference(_runner(model), protocol)(image, emb)
  assert protocol.resized(50, 70) == (64, 90)
  x = np.pad(_resize(image, (64, 90)), ((0, 0), (0, 6), (0, 0)))  # to 96: zeros
  ref = _resize(_direct(model, x, emb)[:64, :90], (50, 70))
  assert ours.shape == (50, 70, 5) and _rel(ours, ref) < 1e-5


def test_cat_seg_protocol_equals_windows_plus_global_view(model):
  rng = np.random.default_rng(1)
  image = rng.uniform(-1, 1, (45, 80, 3)).astype(np.float32)
  emb = jnp.asarray(rng.normal(size=(4, model.text_dim)), jnp.float32)
  # CAT-Seg's geometry at the configured sizes: 384 windows at stride 256 tile 640.
  cat = inference.ViewProtocol(resize="square", size=640, crop_size=384, overlap=0.333)
  assert cat.stride == 256 and cat.resized(480, 640) == (640, 640)
  # The same rule, small: 96 x 96, windows of 64 at stride 32 (2 x 2) + global 64.
  protocol = inference.ViewProtocol(resize="square", size=96, crop_size=64, overlap=0.5,
                                    global_view=True, activation="sigmoid")
  ours = inference.SlidingWindowInference(_runner(model), protocol)(image, emb)
  sig = lambda z: 1 / (1 + np.exp(-z))
  x = _resize(image, (96, 96))
  canvas, count = np.zeros((96, 96, 4), np.float32), np.zeros((96, 96, 1), np.float32)
  for y0 in (0, 32):
    for x0 in (0, 32):
      canvas[y0:y0 + 64, x0:x0 + 64] += sig(_direct(model, x[y0:y0 + 64, x0:x0 + 64], emb))
      count[y0:y0 + 64, x0:x0 + 64] += 1
  glob = _resize(sig(_direct(model, _resize(image, (64, 64)), emb)), (96, 96))
  ref = _resize((canvas / count + glob) / 2, (45, 80))
  assert _rel(ours, ref) < 1e-5
  with pytest.raises(ValueError, match="do not cover"):
    inference.SlidingWindowInference(_runner(model), inference.ViewProtocol(
        resize="square", size=90, crop_size=64, overlap=0.5))(image, emb)


@pytest.mark.parametrize("runlocal", [False, True])
def test_every_protocol_of_the_config_builds(runlocal):
  from configs import openvocab as suite_config  # pylint: disable=g-import-not-at-top
  for name in suite_config.PROTOCOLS:
    protocol = suite_config.get_config(f"protocol={name}" + (",runlocal" if runlocal else ""))
    window = openvocab.protocol_window(protocol)
    assert protocol.kind == ("views" if isinstance(window, inference.ViewProtocol)
                             else "sliding")
    assert protocol.synonyms in openvocab.SYNONYMS
  assert [n for n, _ in protocol.benchmarks] == BENCHMARKS
  with pytest.raises(ValueError, match="protocol='sam'"):
    suite_config.get_config("protocol=sam")


def test_scored_names_map_extras_to_background(data_root):
  source = registry.get_source("pas20b", "validation", data_dir=data_root)
  names, classes = openvocab.scored_table(source)
  assert len(source.label_names) == 21 and source.label_names[20] == "background"
  assert len(names) == 59 and classes[:20].tolist() == list(range(20))
  assert classes[20:].tolist() == [20] * 39  # the PC-59 extras count as background
  rows, row_class = openvocab.scored_texts(["cat", "dog, puppy", "sky", "grass"],
                                           np.array([1, 2, 0, 0]), "max")
  assert rows == [["cat"], ["dog"], ["puppy"], ["sky"], ["grass"]]
  assert row_class.tolist() == [1, 2, 2, 0, 0]
  # A constructed prediction: the argmax row per pixel, then its class.
  argmax_rows = np.array([[0, 1, 2], [3, 4, 0]])
  scores = np.full((2, 3, 5), -1.0, np.float32)
  np.put_along_axis(scores, argmax_rows[..., None], 5.0, axis=-1)
  pred = np.asarray(evaluate._scored_argmax(jnp.asarray(scores), jnp.asarray(row_class)))
  assert pred.tolist() == [[1, 2, 2], [0, 0, 1]]
  label = np.array([[1, 2, 0], [0, 0, -1]])
  conf = metrics.confusion_matrix_np(pred[None], label[None], 3)
  assert conf.tolist() == [[2, 0, 1], [0, 1, 0], [0, 0, 1]]
  # Identity by default: a source without scored names scores its label names.
  source = registry.get_source("pc59", "validation", data_dir=data_root)
  names, classes = openvocab.scored_table(source)
  assert names == source.label_names and classes.tolist() == list(range(59))


def test_config_evaluations_score_a_sources_scored_names(model, data_root):
  """tools/eval.py --data pas20b (an Evaluation of a config) scores its 59 names too."""
  from lseg_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  calls = []

  def embed(names):
    calls.append(list(names))
    return jax.random.normal(jax.random.key(len(names)), (len(names), model.text_dim))
  reports = {}
  for name in ("pas20b", "pas21"):
    data = input_pipeline.default_data_config()
    data.update(name=name, data_dir=data_root, eval_resize="none", eval_pad_to=(32, 32))
    reports[name] = evaluate.Evaluation("val", data, 8).run(model, embed)
  assert calls[0] == registry.get_source("pas20b", "validation",
                                         data_dir=data_root).scored_names
  assert len(calls[0]) == 59 and len(reports["pas20b"]["per_class_iou"]) == 21
  assert calls[1] == registry.get_source("pas21", "validation", data_dir=data_root).label_names


def test_synonyms_max_equals_max_over_synonym_logits():
  names = ["a, b, c", "d", "e, f"]
  rows, row_class = openvocab.scored_texts(names, np.arange(3), "max")
  assert [r[0] for r in rows] == list("abcdef") and row_class.tolist() == [0, 0, 0, 1, 2, 2]
  logits = np.random.default_rng(2).normal(size=(7, 9, 6)).astype(np.float32)
  per_class = np.stack([logits[..., :3].max(-1), logits[..., 3], logits[..., 4:].max(-1)], -1)
  pred = evaluate._scored_argmax(jnp.asarray(logits), jnp.asarray(row_class))
  np.testing.assert_array_equal(np.asarray(pred), per_class.argmax(-1))


def test_prompt_ensemble_is_the_normalised_mean_of_normalised_embeddings():
  rng = np.random.default_rng(3)
  table = {}

  def embed(texts, template):
    return jnp.asarray(np.stack([table.setdefault((template, t), rng.normal(size=4) * 3)
                                 for t in texts]), jnp.float32)
  out = np.asarray(openvocab.embed_rows(embed, [["x", "y"], ["z"]], ["a {}", "b {}"]))
  unit = lambda v: v / np.linalg.norm(v)
  want0 = unit(sum(unit(table[(t, s)]) for t in ("a {}", "b {}") for s in "xy"))
  np.testing.assert_allclose(out[0], want0, rtol=1e-5)
  np.testing.assert_allclose(out[1], unit(unit(table[("a {}", "z")])
                                          + unit(table[("b {}", "z")])), rtol=1e-5)


def test_row_blocks_equal_one_block():
  rng = np.random.default_rng(4)
  sources = [rng.normal(size=s).astype(np.float32) for s in ((13, 17, 6), (20, 9, 6))]
  mask = np.array([True, True, False, True, True, True])
  whole = inference.resize_blocks(sources, (41, 29), True, label_mask=mask)
  argmax = jax.jit(lambda s: jnp.argmax(s, -1))
  for block_bytes in (1, 4 * 29 * 6 * 5, 1 << 30):
    np.testing.assert_array_equal(inference.resize_blocks(
        sources, (41, 29), True, reduce=argmax, label_mask=mask, block_bytes=block_bytes),
        whole.argmax(-1))
    np.testing.assert_array_equal(inference.resize_blocks(
        sources, (41, 29), True, reduce=lambda s: s[..., 3], block_bytes=block_bytes),
        inference.resize_blocks(sources, (41, 29), True)[..., 3])
  assert not np.isfinite(whole[..., 2]).any()


def test_suite_errors_name_the_value(model, tmp_path):
  with pytest.raises(UserError, match="'nope'"):
    openvocab.check_benchmarks(["a150", "nope"], {"a150": "A-150"})
  with pytest.raises(UserError, match="'fss1000'"):  # episodic
    openvocab.check_benchmarks(["fss1000"], {"a150": "A-150"})
  with pytest.raises(UserError, match="synonyms='all'"):
    openvocab.scored_texts(["a"], np.arange(1), "all")
  ckpt = _checkpoint(model, tmp_path)
  with pytest.raises(UserError, match="protocol='nope'"):
    eval_cli.main(["--checkpoint", ckpt, "--suite", "openvocab", "--protocol", "nope",
                   "--data-dir", str(tmp_path)])
  with pytest.raises(UserError, match="--data-dir"):
    eval_cli.main(["--checkpoint", ckpt, "--suite", "openvocab"])
  with pytest.raises(UserError, match="empty"):  # the source names the missing folder
    eval_cli.main(["--checkpoint", ckpt, "--suite", "openvocab", "--benchmarks", "pc59",
                   "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])


def _checkpoint(model, tmp_path):
  ckpt = tmp_path / "ckpt"
  if not ckpt.exists():
    checkpoint.save_model(str(ckpt), model, extra_meta={"tokenizer": text.BYTE_LEVEL_TOKENIZER})
  return str(ckpt)


SUITE_ARGS = ["--suite", "openvocab", "--protocol", "whole,runlocal", "--no-progress"]
# The byte-level tokenizer of the tiny model spends a token per byte: long prompts of
# ViLD's templates are truncated at 77 tokens (CLIP's BPE would not truncate them).
TRUNCATION = pytest.mark.filterwarnings("ignore:label .* tokens; truncated")


@TRUNCATION
def test_suite_command_writes_reports_and_resumes(model, data_root, tmp_path, monkeypatch):
  ckpt, out = _checkpoint(model, tmp_path), tmp_path / "suite"
  args = ["--checkpoint", ckpt, "--data-dir", data_root, "--out", str(out), *SUITE_ARGS]
  assert eval_cli.main(args) == 0
  summary = json.loads((out / "suite.json").read_text())
  assert summary["protocol"] == "whole_runlocal" and list(summary["benchmarks"]) == BENCHMARKS
  b = json.loads((out / "pas20b.json").read_text())
  assert b["num_texts"] == 59 and b["num_classes"] == 21 and b["num_examples"] == 2
  assert b["mode"] == "views" and b["window"]["size"] == 64 and b["synonyms"] == "join"
  assert len(b["templates"]) == 14
  assert summary["benchmarks"]["pas20b"]["mIoU"] == b["metrics"]["mIoU"]
  assert json.loads((out / "a847.json").read_text())["num_classes"] == 847
  table = (out / "suite.md").read_text().splitlines()
  assert table[0] == "| benchmark | classes | images | mIoU | protocol |"
  assert len(table) == 2 + len(BENCHMARKS)
  assert table[7] == f"| PAS-20b | 21 | 2 | {100 * b['metrics']['mIoU']:.2f} | whole_runlocal |"

  # A rerun recomputes only the benchmark whose report is gone.
  calls = []
  real = openvocab.evaluate_benchmark
  monkeypatch.setattr(openvocab, "evaluate_benchmark",
                      lambda m, e, name, *a, **k: calls.append(name) or real(m, e, name, *a, **k))
  os.remove(out / "a150.json")
  assert eval_cli.main(args) == 0
  assert calls == ["a150"]
  assert json.loads((out / "suite.json").read_text())["benchmarks"] == summary["benchmarks"]
  # Another synonym rule is another result: nothing is reused.
  calls.clear()
  assert eval_cli.main(args + ["--synonyms", "max", "--benchmarks", "pc59"]) == 0
  assert calls == ["pc59"]


@pytest.mark.slow
def test_suite_two_processes_equal_one(model, data_root, tmp_path):
  ckpt = _checkpoint(model, tmp_path)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  summaries = []
  for processes in (1, 2):
    out = tmp_path / f"suite_{processes}"
    cmd = [sys.executable, "tools/eval.py", "--checkpoint", ckpt, "--data-dir", data_root,
           "--out", str(out), *SUITE_ARGS]
    if processes == 2:
      cmd = [sys.executable, "tools/launch.py", "--processes", "2", "--devices-per-process",
             "1", "--", *cmd]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summaries.append(json.loads((out / "suite.json").read_text())["benchmarks"])
    assert (out / "suite.md").read_text().count("\n") == 2 + len(BENCHMARKS)
  assert summaries[0] == summaries[1]
