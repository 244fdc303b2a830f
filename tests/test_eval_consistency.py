"""Periodic evaluation inside training and tools/eval.py are one evaluator: the same
checkpoint gives the same numbers, for a fixed label set and for zero-shot episodes,
with the training config (and its overrides) read back from the checkpoint."""
import importlib
import json
import os

import pytest

from lseg_jax import train
from lseg_jax.cli import eval as eval_cli

import hsnet_splits

pytestmark = pytest.mark.slow


def _set(config, **fields):
  for key, value in fields.items():
    *parents, leaf = key.split("__")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def tiny_config(**fields):
  config = importlib.import_module("configs.synthetic_tiny").get_config("runlocal")
  return _set(config, batch_size=8, eval_batch_size=8, total_steps=3, log_every_steps=1,
              checkpoint_every_steps=0, eval_every_steps=0, progress_bar=False,
              model__backbone="tiny_vit32", data__crop_size=32, data__base_size=32,
              **fields)


def _eval_tool(workdir, tmp_path, *extra):
  out = tmp_path / "report.json"
  assert eval_cli.main(["--checkpoint", str(workdir), "--out", str(out), "--no-progress",
                        *extra]) == 0
  return json.loads(out.read_text())


def test_fixed_labels_periodic_equals_tool(tmp_path):
  config = tiny_config(data__data_dir=str(tmp_path / "tfds"))
  config.data.source_kwargs = dict(height=32, width=32, num_train=16, num_validation=12, seed=0)
  workdir = tmp_path / "work"
  summary = train.train_and_evaluate(config, str(workdir))
  # The tool reads the training config (with the overrides above) from the checkpoint.
  report = _eval_tool(workdir, tmp_path)
  assert report["protocol"] == "fixed" and report["num_examples"] == 12
  assert report["metrics"]["mIoU"] == summary["eval"]["eval/miou"]
  assert report["metrics"]["pixAcc"] == summary["eval"]["eval/pixacc"]
  # A command-line override of the saved config reaches the evaluation.
  report = _eval_tool(workdir, tmp_path, "--config.data.eval_split=train")
  assert report["split"] == "train" and report["num_examples"] == 16


@pytest.fixture(scope="module")
def fss_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("fss")
  hsnet_splits.write(root)
  hsnet_splits.write_fss_images(root, splits=("trn", "val", "test"), shots=(1, 2, 3))
  return str(root)


def test_episodes_and_several_evaluations_periodic_equal_tool(fss_root, tmp_path):
  config = tiny_config(data__name="fss1000", data__data_dir=fss_root, data__split="train",
                       data__eval_split="validation", data__eval_resize="center_crop",
                       data__source_kwargs={})
  config.evals = {"val": {}, "test": {"data": {"eval_split": "test"}, "num_batches": 1}}
  workdir = tmp_path / "work"
  summary = train.train_and_evaluate(config, str(workdir))
  assert set(summary["eval"]) == {"eval/miou", "eval/fbiou", "eval_test/miou",
                                  "eval_test/fbiou"}
  val = _eval_tool(workdir, tmp_path, "--eval", "val")
  assert val["protocol"] == "episodes" and val["background_text"] == "others"
  assert val["metrics"]["mIoU"] == summary["eval"]["eval/miou"]
  assert val["metrics"]["FB-IoU"] == summary["eval"]["eval/fbiou"]
  test = _eval_tool(workdir, tmp_path, "--eval", "test", "--max-batches", "1")
  assert test["split"] == "test"
  assert test["metrics"]["mIoU"] == summary["eval"]["eval_test/miou"]
  assert test["metrics"]["FB-IoU"] == summary["eval"]["eval_test/fbiou"]
