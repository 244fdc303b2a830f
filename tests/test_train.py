"""The training loop on 8 forced host devices: sharding, resuming, killing, non-finite stops.

Every run trains the tiny model on 32x32 synthetic images with a global batch of 8 on a
(data=2, fsdp=4) mesh for 12 steps, logging the loss of every step. Runs with the same
settings share compiled programs through the tests' persistent compilation cache.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lseg_jax import checkpoint
from lseg_jax import train
from lseg_jax.convert import mapping
from lseg_jax.data import input_pipeline

import run_helpers

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic_tiny.py")
TOTAL = 12
OVERRIDES = {
    "batch_size": 8, "eval_batch_size": 8, "total_steps": TOTAL, "log_every_steps": 1,
    "checkpoint_every_steps": 4, "eval_every_steps": 0, "eval_at_end": False,
    "progress_bar": False, "model.backbone": "tiny_vit32",
    "data.source_kwargs.height": 32, "data.source_kwargs.width": 32,
    "data.source_kwargs.num_train": 48, "data.source_kwargs.num_validation": 8,
    "data.crop_size": 32, "data.base_size": 32,
    "mesh.data": 2, "mesh.fsdp": 4, "sharding.min_size": 256,
}
SINGLE = {"mesh.data": 1, "mesh.fsdp": 1}


def make_config(data_dir, **extra):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module("configs.synthetic_tiny").get_config("runlocal")
  for key, value in {**OVERRIDES, "data.data_dir": str(data_dir), **extra}.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def command_line(workdir, data_dir, **extra):
  flags = [f"--config.{k}={v}" for k, v in
           {**OVERRIDES, "data.data_dir": str(data_dir), **extra}.items()]
  return [f"--config={CONFIG}:runlocal", f"--workdir={workdir}", *flags]


def losses(workdir):
  """{step: train loss} from metrics.jsonl (the last line of a step wins)."""
  out = {}
  with open(os.path.join(workdir, train.METRICS_FILE)) as f:
    for line in f:
      record = json.loads(line)
      if "train/loss" in record:
        out[record["step"]] = record["train/loss"]
  return out


def _checkpoint_params(workdir, step):
  model, _ = checkpoint.load_model(os.path.join(workdir, "checkpoints"), step=step)
  return {k: np.asarray(v) for k, v in mapping.flatten_params(model).items()
          if not k.startswith("clip_pretrained/")}


def host_params(summary):
  return {k: np.asarray(v) for k, v in
          mapping.flatten_params(jax.device_get(summary["state"]["params"])).items()}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  summary = train.train_and_evaluate(make_config(data_dir), str(workdir))
  shardings = {k: v.sharding for k, v in
               mapping.flatten_params(summary["state"]["params"]).items()}
  opt_shardings = [x.sharding for x in jax.tree.leaves(summary["state"]["opt"])]
  return {"workdir": str(workdir), "losses": losses(workdir), "params": host_params(summary),
          "shardings": shardings, "opt_shardings": opt_shardings, "summary": summary}


def test_reference_run(reference):
  assert sorted(reference["losses"]) == list(range(1, TOTAL + 1))
  # A new label set after training: the text tower's (frozen, not donated) arrays live.
  assert reference["summary"]["embed"](["cat", "dog", "other"]).shape == (3, 16)
  assert all(np.isfinite(list(reference["losses"].values())))
  mngr = checkpoint.manager(os.path.join(reference["workdir"], "checkpoints"), read_only=True)
  assert sorted(mngr.all_steps()) == [4, 8, 12]
  meta = checkpoint.read_meta(os.path.join(reference["workdir"], "checkpoints"))
  assert meta["step"] == TOTAL and meta["data"]["next_step"] == TOTAL
  assert meta["label_names"][0] == "background"
  # The checkpoint is an ordinary model directory for every tool.
  model, _ = checkpoint.load_model(os.path.join(reference["workdir"], "checkpoints"))
  np.testing.assert_array_equal(
      np.asarray(model.scratch.head1.kernel[...]), reference["params"]["scratch/head1/kernel"])


def test_parameters_are_sharded(reference):
  sh = reference["shardings"]
  kernel = sh["scratch/layer3_rn/kernel"]  # [3, 3, 32, 16]: split over fsdp
  assert kernel.spec == jax.sharding.PartitionSpec(None, None, "fsdp", None)
  assert kernel.shard_shape((3, 3, 32, 16)) == (3, 3, 8, 16)
  assert sh["pretrained/model/blocks/0/mlp/fc1/kernel"].shard_shape((32, 64)) == (32, 16)
  assert sh["pretrained/model/blocks/0/norm1/scale"].is_fully_replicated  # tiny: replicated
  num_sharded = sum(not s.is_fully_replicated for s in sh.values())
  assert num_sharded >= 20, num_sharded
  # The momentum buffers follow their parameters.
  assert sum(not s.is_fully_replicated for s in reference["opt_shardings"]) == num_sharded
  assert not any(n.startswith("clip_pretrained") for n in sh)  # frozen: not optimised


def test_single_device_matches_sharded(reference, data_dir, tmp_path):
  # A whole run on 1 device: the reference's computation, up to reordered float32 sums
  # (tolerances and what was measured: run_helpers).
  summary = train.train_and_evaluate(make_config(data_dir, **SINGLE), str(tmp_path / "run"))
  run_helpers.assert_equivalent_runs(losses(tmp_path / "run"), reference["losses"],
                                     range(1, TOTAL + 1), host_params(summary),
                                     reference["params"])
  # Its first step starts from the same initial state: one step of reordered sums.
  run_helpers.assert_same_losses(losses(tmp_path / "run"), reference["losses"], [1],
                                 run_helpers.ONE_STEP_TOL)
  # One step from the same state (the reference's step-8 checkpoint) on 1 device and on
  # the (2, 4) mesh: every parameter and BatchNorm statistic, and the loss.
  stepped = {}
  for name, extra in (("one_device", SINGLE), ("mesh", {})):
    workdir = tmp_path / name
    shutil.copytree(reference["workdir"], workdir)
    shutil.rmtree(workdir / "checkpoints" / str(TOTAL))
    train.train_and_evaluate(make_config(data_dir, stop_at_step=9, **extra), str(workdir))
    run_helpers.assert_same_losses(losses(workdir), reference["losses"], [9],
                                   run_helpers.ONE_STEP_TOL)
    stepped[name] = _checkpoint_params(workdir, 9)
  run_helpers.assert_same_state(stepped["one_device"], stepped["mesh"],
                                run_helpers.ONE_STEP_TOL)


def test_stop_and_resume_gives_the_same_losses(reference, data_dir, tmp_path):
  first = train.train_and_evaluate(make_config(data_dir, stop_at_step=6), str(tmp_path))
  assert first["preempted"] and first["step"] == 6
  assert sorted(losses(tmp_path)) == list(range(1, 7))
  second = train.train_and_evaluate(make_config(data_dir), str(tmp_path))
  assert second["step"] == TOTAL and not second["preempted"]
  resumed = losses(tmp_path)
  assert sorted(resumed) == list(range(1, TOTAL + 1))
  for step, loss in reference["losses"].items():
    assert run_helpers.rel(resumed[step], loss) < run_helpers.SAME_LAYOUT_TOL, (
        step, resumed[step], loss)
  run_helpers.assert_same_state(host_params(second), reference["params"],
                                run_helpers.SAME_LAYOUT_TOL)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    reference, data_dir, tmp_path, monkeypatch):
  del reference  # same settings: reuses the compiled step
  make_iterator = input_pipeline.make_train_iterator

  def poisoned(*args, **kwargs):
    it = make_iterator(*args, **kwargs)

    def batches():
      for i, batch in enumerate(it, start=kwargs.get("start_step", 0)):
        if i == 6:  # the batch of step 7
          batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        yield batch
    return _Labelled(batches(), it.label_names, it.episodic)
  monkeypatch.setattr(input_pipeline, "make_train_iterator", poisoned)
  with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step 7.* step 4"):
    train.train_and_evaluate(make_config(data_dir), str(tmp_path))
  ckpt = os.path.join(tmp_path, "checkpoints")
  assert checkpoint.manager(ckpt, read_only=True).latest_step() == 4
  model, _ = checkpoint.load_model(ckpt)
  assert all(np.isfinite(np.asarray(v)).all() for v in mapping.flatten_params(model).values())


class _Labelled:
  """An iterator with the `label_names` and `episodic` of a real DataIterator."""

  def __init__(self, it, label_names, episodic):
    self._it = it
    self.label_names = label_names
    self.episodic = episodic

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._it)


def test_sigkill_between_checkpoints_then_resume(reference, data_dir, tmp_path):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_DEFAULT_MATMUL_PRECISION="highest", TF_CPP_MIN_LOG_LEVEL="3")
  workdir = tmp_path / "work"
  args = command_line(workdir, data_dir)
  log = open(tmp_path / "killed.log", "w")
  proc = subprocess.Popen([sys.executable, "-c", run_helpers.slow_train_script(0.4), *args],
                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  ckpt = workdir / "checkpoints"
  deadline = time.time() + 240
  try:
    while True:
      assert proc.poll() is None, "the run ended before it could be killed: " + open(
          tmp_path / "killed.log").read()[-3000:]
      assert time.time() < deadline, "no checkpoint at step 4 within 240 s"
      logged = losses(workdir) if (workdir / train.METRICS_FILE).exists() else {}
      if (ckpt / "4").is_dir() and max(logged, default=0) >= 6:
        break
      time.sleep(0.05)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
  killed_at = max(losses(workdir))
  last_good = checkpoint.manager(str(ckpt), read_only=True).latest_step()
  assert last_good is not None and last_good < killed_at < TOTAL, (last_good, killed_at)

  done = subprocess.run([sys.executable, "tools/train.py", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  resumed = losses(workdir)
  assert sorted(resumed) == list(range(1, TOTAL + 1))
  # The same layout as the reference; the resumed steps run in another process.
  run_helpers.assert_same_losses(resumed, reference["losses"], range(1, TOTAL + 1),
                                 run_helpers.ONE_STEP_TOL)
