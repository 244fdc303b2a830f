"""Evaluation loops end to end on tiny generated data and a tiny random model.

Fixed labels: an in-memory source with images of different sizes, scored
single-scale and multi-scale, on 8 forced host devices and on one.
Episodes: tiny fixtures in the FSS-1000 and PASCAL-5i layouts read by the
real `fss1000` / `pascal5i` sources.
"""
import io
import json
import os
from pathlib import Path

from flax import nnx
import jax
import numpy as np
import pytest
from PIL import Image

from lseg_jax import checkpoint
from lseg_jax.cli import eval as eval_cli
from lseg_jax import evaluate
from lseg_jax import inference
from lseg_jax import metrics
from lseg_jax import text
from lseg_jax.data import input_pipeline
from lseg_jax.data import registry
from lseg_jax.data import synthetic
from lseg_jax.errors import UserError
from lseg_jax.models import lseg

import hsnet_splits

LABELS = ["sky", "tree", "road", "car"]
SIZES = [(40, 50), (64, 32), (33, 70), (64, 96), (20, 20), (48, 48), (57, 31), (32, 64),
         (61, 90), (45, 45)]


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


@registry.register("eval_test_fixed")
def _fixed_source(split, **_):
  rng = np.random.default_rng(0)
  images, masks = [], []
  for h, w in SIZES:
    images.append(_png(rng.integers(0, 256, (h, w, 3))))
    masks.append(_png(rng.choice([0, 1, 2, 3, 255], (h, w))))
  return synthetic.EncodedSource(images, masks, [f"{split}_{i}" for i in range(len(SIZES))],
                                 LABELS, mask_ignore=255)


@pytest.fixture(scope="module")
def model():
  cfg = lseg.LSegConfig(backbone="tiny_vit32", arch_option=2, block_depth=1,
                        text_vocab_size=text.BYTE_LEVEL_VOCAB_SIZE)
  model = lseg.LSeg(cfg, rngs=nnx.Rngs(0))
  model.eval()
  return model


def one_device_mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))


def fixed_cfg(**kwargs):
  cfg = input_pipeline.default_data_config()
  cfg.name = "eval_test_fixed"
  cfg.eval_resize = "none"
  cfg.eval_pad_to = (64, 96)
  cfg.update(kwargs)
  return cfg


def run(model, data_cfg, text, *, episodic, batch_size=8, **kwargs):
  it = input_pipeline.make_eval_iterator(data_cfg, batch_size=batch_size)
  ev = evaluate.Evaluator(model, it.label_names, text, episodic=episodic, **kwargs)
  return evaluate.evaluate(ev, it, num_batches=it.num_batches, progress=False)


def text_for(model, n, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, model.text_dim))


# --------------------------------------------------------------------------
# Fixed label set.
# --------------------------------------------------------------------------
def test_single_scale_matches_a_direct_computation(model):
  text = text_for(model, len(LABELS))
  report = run(model, fixed_cfg(), text, episodic=False)
  assert report["num_examples"] == len(SIZES)
  # Direct: model on the padded batches, official formulas in numpy.
  it = input_pipeline.make_eval_iterator(fixed_cfg(), batch_size=8)
  conf = np.zeros((4, 4), np.int64)
  fwd = jax.jit(lambda x: model(x, text))
  for batch in it:
    pred = np.asarray(fwd(batch["image"])).argmax(-1)
    for i in np.flatnonzero(batch["valid"]):
      conf += metrics.confusion_matrix_np(pred[i], batch["label"][i], 4)
  expected = metrics.miou_pixacc(conf)
  assert report["metrics"]["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-12)
  assert report["metrics"]["pixAcc"] == pytest.approx(expected["pixAcc"], abs=1e-12)
  assert list(report["per_class_iou"]) == LABELS
  assert report["pixels"]["labeled"] == expected["labeled"]


def test_sharded_reports_equal_single_device(model):
  assert jax.device_count() == 8
  text = text_for(model, len(LABELS))
  window = inference.SlidingWindow(scales=(0.75, 1.0, 1.25), base_size=64, crop_size=32)
  for kwargs in [{}, {"window": window}]:
    sharded = run(model, fixed_cfg(), text, episodic=False, **kwargs)
    single = run(model, fixed_cfg(), text, episodic=False, mesh=one_device_mesh(), **kwargs)
    assert sharded == single, kwargs
    assert sharded["mode"] == ("multi_scale" if kwargs else "single_scale")


def test_multi_scale_scores_each_image_at_its_own_size(model):
  text = text_for(model, len(LABELS))
  window = inference.SlidingWindow(scales=(0.75, 1.0, 1.25), base_size=64, crop_size=32)
  report = run(model, fixed_cfg(), text, episodic=False, window=window)
  infer = inference.SlidingWindowInference.for_model(model, window)
  conf = np.zeros((4, 4), np.int64)
  source = _fixed_source("validation")
  for i in range(len(SIZES)):
    ex = source.load(i)
    image = np.asarray(ex["image"], np.float32) / 127.5 - 1
    pred = infer(image, text).argmax(-1)
    conf += metrics.confusion_matrix_np(pred, np.asarray(ex["mask"]), 4)
  expected = metrics.miou_pixacc(conf)
  assert report["metrics"]["mIoU"] == pytest.approx(expected["mIoU"], abs=1e-12)
  assert report["pixels"]["labeled"] == expected["labeled"]
  assert report["window"]["scales"] == (0.75, 1.0, 1.25)


def test_bad_inputs_raise(model):
  with pytest.raises(ValueError, match=r"text_emb has shape \(3, 8\)"):
    evaluate.Evaluator(model, LABELS, np.zeros((3, 8)), episodic=False)
  with pytest.raises(ValueError, match="'other'"):
    evaluate.Evaluator(model, LABELS, text_for(model, 4), episodic=True)
  ev = evaluate.Evaluator(model, LABELS, text_for(model, 4), episodic=False)
  with pytest.raises(ValueError, match="lacks 'valid'"):
    ev.update({"image": np.zeros((8, 32, 32, 3)), "label": np.zeros((8, 32, 32), np.int32),
               "label_mask": np.ones((8, 4), bool)})
  with pytest.raises(ValueError, match="multiple of this host's 8 devices"):
    ev.update({"image": np.zeros((3, 32, 32, 3), np.float32),
               "label": np.zeros((3, 32, 32), np.int32),
               "label_mask": np.ones((3, 4), bool), "valid": np.ones(3, bool)})


def test_format_table_lists_classes_and_metrics():
  report = {"per_class_iou": {"sky": 0.5, "tree": 0.25}, "metrics": {"mIoU": 0.375},
            "num_examples": 3}
  table = evaluate.format_table(report)
  assert "sky" in table and "50.00" in table and "37.50" in table


# --------------------------------------------------------------------------
# Zero-shot episodes on the FSS-1000 and PASCAL-5i layouts.
# --------------------------------------------------------------------------
def _save(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8)).save(path)


@pytest.fixture(scope="module")
def fss_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("fss")
  hsnet_splits.write(root)
  # Two queries per class (0-shot); with shot=1, 1.jpg would be the support.
  hsnet_splits.write_fss_images(root, splits=("test",), shots=(1, 2))
  return str(root)


@pytest.fixture(scope="module")
def pascal_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("pascal")
  hsnet_splits.write(root)
  names = sorted({name for name, _ in hsnet_splits.pascal_list("val", 0)})
  rng = np.random.default_rng(2)
  for name in names:
    _save(f"{root}/VOC2012/JPEGImages/{name}.jpg", rng.integers(0, 256, (20, 30, 3)))
    _save(f"{root}/VOC2012/SegmentationClassAug/{name}.png",
          rng.choice([0, 1, 2, 3, 4, 5, 255], (20, 30)))
  return str(root)


def episode_cfg(name, data_dir, split, fold=None):
  cfg = input_pipeline.default_data_config()
  cfg.update(name=name, data_dir=data_dir, split=split, eval_split=split,
             eval_resize="center_crop", crop_size=32, fold=fold)
  return cfg


def _direct_episodes(model, data_cfg, text):
  """HSNet's accumulation written out: per-class fg/bg intersection and union."""
  it = input_pipeline.make_eval_iterator(data_cfg, batch_size=8)
  k = len(it.label_names) - 1
  inter, union = np.zeros((2, k)), np.zeros((2, k))
  fwd = jax.jit(lambda x, m: model(x, text, m))
  for batch in it:
    pred = np.asarray(fwd(batch["image"], batch["label_mask"])).argmax(-1)
    for i in np.flatnonzero(batch["valid"]):
      ci = batch["class_index"][i]
      assert set(np.unique(pred[i])) <= {0, 1 + ci}
      p = (pred[i] == 1 + ci).astype(int)
      g = batch["label"][i]
      g = np.where(g < 0, -1, (g == 1 + ci).astype(int))
      p = np.where(g < 0, -1, p)
      for c in (0, 1):
        i_c = np.sum((p == c) & (g == c))
        inter[c, ci] += i_c
        union[c, ci] += np.sum(p == c) + np.sum(g == c) - i_c
  miou = (inter[1] / np.maximum(union[1], 1)).mean()
  fb = (inter.sum(1) / union.sum(1)).mean()
  return miou, fb


@pytest.mark.parametrize("dataset", ["fss1000", "pascal5i"])
def test_zero_shot_episodes_end_to_end(model, dataset, fss_dir, pascal_dir):
  if dataset == "fss1000":
    data_cfg = episode_cfg("fss1000", fss_dir, "test")
    num_classes = len(hsnet_splits.FSS_CLASSES["test"])
    num_episodes = 2 * num_classes  # 0-shot (the default): 1.jpg and 2.jpg are queries
  else:
    data_cfg = episode_cfg("pascal5i", pascal_dir, "validation", fold=0)
    num_episodes, num_classes = 1000, 5
  names = input_pipeline.make_eval_iterator(data_cfg, batch_size=8).label_names
  assert names[0] == "other" and len(names) == num_classes + 1
  text = text_for(model, len(names), seed=3)
  report = run(model, data_cfg, text, episodic=True)
  assert report["protocol"] == "episodes"
  assert report["num_examples"] == num_episodes
  assert sum(report["per_class_episodes"].values()) == num_episodes
  assert list(report["per_class_iou"]) == names[1:]
  miou, fb = _direct_episodes(model, data_cfg, text)
  assert report["metrics"]["mIoU"] == pytest.approx(miou, abs=1e-12)
  assert report["metrics"]["FB-IoU"] == pytest.approx(fb, abs=1e-12)


# --------------------------------------------------------------------------
# tools/eval.py
# --------------------------------------------------------------------------
CONFIG = """
import ml_collections
from lseg_jax.data import input_pipeline


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.data = input_pipeline.default_data_config()
  c.data.name = "eval_test_fixed"
  c.data.eval_resize = "none"
  c.data.eval_pad_to = (64, 96)
  c.data.base_size = 64
  c.data.crop_size = 32
  c.eval_batch_size = 8
  c.model = dict(backbone="tiny_vit32")
  return c
"""


def test_eval_tool_writes_reports(model, tmp_path):
  ckpt = tmp_path / "ckpt"
  checkpoint.save_model(str(ckpt), model, extra_meta={"tokenizer": text.BYTE_LEVEL_TOKENIZER})
  (tmp_path / "cfg.py").write_text(CONFIG)
  tool = eval_cli

  assert tool.main(["--checkpoint", str(ckpt), "--config", f"{tmp_path}/cfg.py:x",
                    "--no-progress"]) == 0
  single = json.loads((ckpt / "eval" / "eval_test_fixed_validation_single_scale.json").read_text())
  assert single["protocol"] == "fixed" and single["num_examples"] == len(SIZES)
  assert single["tokenizer"] == "byte-level" and single["fold"] is None
  assert list(single["per_class_iou"]) == LABELS

  # The same numbers as the library with the checkpoint's label embeddings.
  loaded, meta = checkpoint.load_model(str(ckpt))
  embedder, _, _ = text.checkpoint_label_embedder(loaded, meta, str(ckpt))
  direct = run(loaded, fixed_cfg(), embedder(LABELS), episodic=False)
  assert single["metrics"] == direct["metrics"]

  out = tmp_path / "ms.json"
  assert tool.main(["--checkpoint", str(ckpt), "--config", f"{tmp_path}/cfg.py",
                    "--scales", "0.75,1.25", "--flip", "--no-progress", "--max-batches", "1",
                    "--out", str(out)]) == 0
  multi = json.loads(out.read_text())
  assert multi["mode"] == "multi_scale" and multi["eval_resize"] == "none"
  assert multi["window"]["scales"] == [0.75, 1.25] and multi["window"]["flip"]
  assert multi["window"]["crop_size"] == 32 and multi["num_examples"] == 8


def test_eval_tool_argument_errors(tmp_path):
  tool = eval_cli
  with pytest.raises(UserError, match="does not exist"):
    tool.main(["--checkpoint", "c", "--config", str(tmp_path / "nope.py")])
  with pytest.raises(SystemExit):
    tool.parse_args(["--checkpoint", "c", "--config", "x.py", "--scales", "a,b"])
  with pytest.raises(SystemExit):
    tool.parse_args(["--checkpoint", "c", "--config", "x.py", "--multiscale", "--scales", "1"])


def test_episodes_through_the_sliding_window(model, fss_dir):
  # 32 x 32 episodes, one scale whose long side is the crop, no flip: the
  # sliding window reduces to one plain model call per image.
  import itertools  # pylint: disable=g-import-not-at-top
  data_cfg = episode_cfg("fss1000", fss_dir, "test")
  it = input_pipeline.make_eval_iterator(data_cfg, batch_size=8)
  text = text_for(model, len(it.label_names), seed=4)
  window = inference.SlidingWindow(scales=(1.0,), base_size=32, crop_size=32, flip=False)
  reports = []
  for kwargs in ({}, {"window": window}):
    it = input_pipeline.make_eval_iterator(data_cfg, batch_size=8)
    ev = evaluate.Evaluator(model, it.label_names, text, episodic=True, **kwargs)
    reports.append(evaluate.evaluate(ev, itertools.islice(it, 2), progress=False))
  single, multi = reports
  assert multi["mode"] == "multi_scale" and multi["num_examples"] == 16
  assert multi["per_class_episodes"] == single["per_class_episodes"]
  assert multi["metrics"] == pytest.approx(single["metrics"], abs=1e-9)


def test_sum_over_hosts_is_exact_beyond_int32():
  x = np.array([[0, 2 ** 31 - 1], [2 ** 31 + 3, 5 * 2 ** 33 + 7]], np.int64)
  np.testing.assert_array_equal(evaluate._sum_over_hosts(x), x)  # pylint: disable=protected-access


@pytest.mark.parametrize("arch_option", [1, 2])
def test_episode_pair_logits_equal_the_masked_table(arch_option):
  # An episode's two labels computed alone (per-example embeddings [B, 2, D]) give the
  # logits the whole table gives under the episode's mask: with a Bottleneck head the
  # max over labels sees the same two labels in both. Equal up to float32 rounding
  # (the matmul over D is blocked differently for 2 and for 241 labels).
  cfg = lseg.LSegConfig(backbone="tiny_vit32", arch_option=arch_option, block_depth=2,
                        text_vocab_size=text.BYTE_LEVEL_VOCAB_SIZE)
  m = lseg.LSeg(cfg, rngs=nnx.Rngs(0))
  m.eval()
  table = np.asarray(text_for(m, 241, seed=5))
  images = jax.random.normal(jax.random.key(6), (4, 64, 64, 3))
  class_index = np.array([0, 7, 239, 100])
  rows = evaluate.episode_rows(class_index)
  np.testing.assert_array_equal(rows, [[0, 1], [0, 8], [0, 240], [0, 101]])
  mask = np.zeros((4, 241), bool)
  np.put_along_axis(mask, rows, True, axis=1)
  whole = np.asarray(jax.jit(lambda x, t, k: m(x, t, k))(images, table, mask))
  pair = np.asarray(jax.jit(lambda x, t: m(x, t, None))(images, table[rows]))
  assert pair.shape == (4, 64, 64, 2)
  want = np.take_along_axis(whole, rows[:, None, None], -1)
  # 1e-6 of the tensor's largest logit (~14): one float32 rounding of the scores.
  np.testing.assert_allclose(pair, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_episode_batches_must_mask_other_and_their_class(model, fss_dir):
  data_cfg = episode_cfg("fss1000", fss_dir, "test")
  it = input_pipeline.make_eval_iterator(data_cfg, batch_size=8)
  ev = evaluate.Evaluator(model, it.label_names, text_for(model, len(it.label_names)),
                          episodic=True)
  batch = dict(next(iter(it)))
  batch["label_mask"] = np.array(batch["label_mask"])
  batch["label_mask"][1, 0] = False  # "other" dropped from a valid episode
  with pytest.raises(ValueError, match=r"episode 1 .* expected exactly \[0, "):
    ev.update(batch)
