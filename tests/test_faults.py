"""Fault injection: the real tools as subprocesses, killed, corrupted and misused.

Every run trains the tiny model on 32x32 synthetic images (batch 8, one device) for 12
steps, with a checkpoint every 3 steps and an evaluation every 4 (and at the end). The
uninterrupted run's metrics.jsonl is the reference: after any number of SIGKILLs (at
random moments, during checkpoint saves, during evaluations, at the last step) the
rerun's file equals it line for line (timing fields aside). Damaged checkpoints are
detected (named step and array) or skipped for the newest intact step. Runs share the
tests' persistent compilation cache.
"""
import glob
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic_tiny.py") + ":runlocal"
TOTAL = 12
OVERRIDES = {
    "batch_size": 8, "eval_batch_size": 8, "total_steps": TOTAL, "log_every_steps": 1,
    "checkpoint_every_steps": 3, "eval_every_steps": 4, "eval_num_batches": 1,
    "eval_at_end": True, "keep_checkpoints": 3, "progress_bar": False,
    "model.backbone": "tiny_vit32", "data.source_kwargs.height": 32,
    "data.source_kwargs.width": 32, "data.source_kwargs.num_train": 48,
    "data.source_kwargs.num_validation": 8, "data.crop_size": 32, "data.base_size": 32,
    "mesh.data": 1,
}
TIMING = ("train/step_time", "train/images_per_sec")
ENV = dict(
    os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
    JAX_COMPILATION_CACHE_DIR=os.environ.get(
        "LSEG_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "lseg_jax_test_cache")),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_DEFAULT_MATMUL_PRECISION="highest")
ENV.pop("LSEG_DEBUG", None)

# tools/train.py with every batch delayed and its checkpoint saves and evaluations
# announced in the file $FAULT_EVENTS, so that the test can kill it there.
_FAULT_TRAIN = """
import os, sys, time
from lseg_jax import checkpoint, evaluate, train_utils
from lseg_jax.cli import common, train
from lseg_jax.data import input_pipeline

def event(name):
  with open(os.environ["FAULT_EVENTS"], "a") as f:
    f.write(name + "\\n")

_next = input_pipeline.DataIterator.__next__
def slow_next(self):
  event("batch")
  time.sleep(0.1)
  return _next(self)
input_pipeline.DataIterator.__next__ = slow_next

_save = checkpoint.save
def save(mngr, step, *args, **kwargs):
  event(f"save {step}")
  return _save(mngr, step, *args, **kwargs)
checkpoint.save = save

_run = evaluate.Evaluation.run
def run(self, *args, **kwargs):
  event("eval")
  time.sleep(0.3)
  return _run(self, *args, **kwargs)
evaluate.Evaluation.run = run

# CPython runs a signal's handler between bytecodes of the main thread: two SIGINTs that
# arrive while it is inside one C call run the handler once. The event says it ran.
_interrupt = train_utils.Preemption._interrupt
def interrupt(self, signum, frame):
  _interrupt(self, signum, frame)
  event("sigint")
train_utils.Preemption._interrupt = interrupt
common.entry_point(train.main)
"""


def train_args(workdir, data_dir, **extra):
  flags = [f"--config.{k}={v}" for k, v in
           {**OVERRIDES, "data.data_dir": str(data_dir), **extra}.items()]
  return [f"--config={CONFIG}", f"--workdir={workdir}", *flags]


def run_tool(tool, args, timeout=300):
  return subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), *map(str, args)],
                        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def metric_lines(workdir):
  """metrics.jsonl as a list of dicts without the timing fields."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def killed_run(workdir, data_dir, trigger, occurrence, delay, tmp_path):
  """Starts the slowed training, SIGKILLs it `delay` s after the `occurrence`-th
  `trigger` event ("save", "eval" or "batch"). Returns whether
  the kill landed before the run finished."""
  events = tmp_path / "events"
  if events.exists():
    events.unlink()
  log = open(tmp_path / "killed.log", "w")
  proc = subprocess.Popen(
      [sys.executable, "-c", _FAULT_TRAIN, *train_args(workdir, data_dir)], cwd=ROOT,
      env=dict(ENV, FAULT_EVENTS=str(events)), stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 240
  try:
    while proc.poll() is None:
      assert time.time() < deadline, "no kill point within 240 s"
      seen = events.read_text().split("\n") if events.exists() else []
      hits = [e for e in seen if e.startswith(trigger)]
      if len(hits) >= occurrence:
        time.sleep(delay)
        if proc.poll() is None:
          proc.send_signal(signal.SIGKILL)
          proc.wait()
          return True
      time.sleep(0.02)
    assert proc.returncode == 0, open(tmp_path / "killed.log").read()[-3000:]
    return False
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    log.close()


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  done = run_tool("train.py", train_args(workdir, data_dir))
  assert done.returncode == 0, done.stderr[-3000:]
  lines = metric_lines(workdir)
  assert [r["step"] for r in lines] == list(range(1, TOTAL + 1))
  assert [r["step"] for r in lines if "eval/miou" in r] == [4, 8, 12]
  return str(workdir)


def _kill_chain(reference, data_dir, tmp_path, plan):
  workdir = tmp_path / "work"
  kills = 0
  for trigger, occurrence, delay in plan:
    kills += killed_run(workdir, data_dir, trigger, occurrence, delay, tmp_path)
  done = run_tool("train.py", train_args(workdir, data_dir))
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"finished at step {TOTAL}" in done.stdout
  assert metric_lines(workdir) == metric_lines(reference)
  return kills


def test_sigkill_at_random_points_then_resume(reference, data_dir, tmp_path):
  rng = random.Random(14)
  plan = [("batch", rng.randint(2, 6), rng.uniform(0.0, 0.1)),
          ("save", rng.randint(1, 2), 0.0), ("eval", 1, rng.uniform(0.0, 0.5)),
          ("save", rng.randint(1, 3), rng.uniform(0, 0.3)),
          ("batch", rng.randint(3, 8), rng.uniform(0.0, 0.1)),
          ("eval", 2, rng.uniform(0.0, 0.5))]
  kills = _kill_chain(reference, data_dir, tmp_path, plan)
  assert kills >= 5, kills


def test_sigkill_during_saves_and_the_final_evaluation(reference, data_dir, tmp_path):
  # The last save and the final evaluation (step 12): the rerun still evaluates at the end.
  # Each trigger is the first of its kind after the resumed step, so every run is killed.
  plan = [("save", 1, 0.05), ("eval", 1, 0.1), ("save", 1, 0.15), ("eval", 1, 0.0),
          ("save", 1, 0.3)]
  kills = _kill_chain(reference, data_dir, tmp_path, plan)
  assert kills == 5, kills  # with the 5 or more of the test above: at least 10 kills


def test_sigterm_saves_and_exits_75_then_resumes(reference, data_dir, tmp_path):
  workdir = tmp_path / "work"
  events = tmp_path / "events"
  proc = subprocess.Popen(
      [sys.executable, "-c", _FAULT_TRAIN, *train_args(workdir, data_dir)], cwd=ROOT,
      env=dict(ENV, FAULT_EVENTS=str(events)), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while not (events.exists() and "save 3" in events.read_text()):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 75, out[-3000:]
  assert "stopped early; rerun to resume" in out
  done = run_tool("train.py", train_args(workdir, data_dir))
  assert done.returncode == 0, done.stderr[-3000:]
  assert metric_lines(workdir) == metric_lines(reference)


def _last_line(text):
  return text.strip().splitlines()[-1]


def test_sigint_saves_prints_the_resume_command_and_exits_130(reference, data_dir, tmp_path):
  workdir = tmp_path / "work"
  events = tmp_path / "events"
  args = train_args(workdir, data_dir)
  proc = subprocess.Popen(
      [sys.executable, "-c", _FAULT_TRAIN, *args], cwd=ROOT,
      env=dict(ENV, FAULT_EVENTS=str(events)), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not (events.exists() and "save 3" in events.read_text()):
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.02)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  saved = max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert 3 < saved < TOTAL, saved
  # python -c runs it here: the command names tools/train.py.
  command = shlex.join(["python", os.path.join("tools", "train.py"), *args])
  assert _last_line(err) == (f"interrupted: saved step {saved} in "
                             f"{workdir / 'checkpoints'}; resume with: {command}"), err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err and "finished" not in out
  resume = shlex.split(_last_line(err).split("resume with: ", 1)[1])
  assert resume[0] == "python"
  done = subprocess.run([sys.executable, *resume[1:]], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"Resuming from {workdir / 'checkpoints'} step {saved}." in done.stderr
  assert metric_lines(workdir) == metric_lines(reference)


def test_second_sigint_stops_at_once_without_saving(data_dir, tmp_path):
  workdir = tmp_path / "work"
  events = tmp_path / "events"
  proc = subprocess.Popen(
      [sys.executable, "-c", _FAULT_TRAIN, *train_args(workdir, data_dir)], cwd=ROOT,
      env=dict(ENV, FAULT_EVENTS=str(events)), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not (events.exists() and "save 3" in events.read_text()):
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.02)
  proc.send_signal(signal.SIGINT)
  # The second once the first was handled (not coalesced with it), within the next step
  # (each batch waits 0.1 s): no save yet.
  while "sigint" not in events.read_text():
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.005)
  proc.send_signal(signal.SIGINT)
  start = time.time()
  err = proc.communicate(timeout=60)[1]
  assert proc.returncode == 130, err[-3000:]
  assert _last_line(err) == "error: interrupted again: stopped at once, without saving"
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  assert "save 4" not in events.read_text()
  print(f"exited {time.time() - start:.2f} s after the second SIGINT")


def test_divergence_before_the_first_checkpoint_says_none_was_written(data_dir, tmp_path):
  workdir = tmp_path / "work"
  done = run_tool("train.py", train_args(workdir, data_dir, **{"optim.base_lr": "1e30"}))
  assert done.returncode == 2, done.stderr[-3000:]
  errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
  assert errors == [
      "error: non-finite loss or gradient at step 2 (loss=nan, grad_norm=nan); stopped "
      "without applying it. No checkpoint was written (the run diverged before its first "
      "checkpoint); restart from scratch with a lower learning rate (e.g. "
      "--config.optim.base_lr=1e+29, now 1e+30) or gradient clipping "
      "(--config.optim.grad_clip_norm=1.0)."], done.stderr[-3000:]
  assert "Traceback" not in done.stderr
  assert not [d for d in os.listdir(workdir / "checkpoints") if d.isdigit()]


# ---------------------------------------------------------------------------
# Damaged checkpoints.
# ---------------------------------------------------------------------------
@pytest.fixture
def damaged(reference, tmp_path):
  """A copy of the reference work directory, for damaging."""
  workdir = tmp_path / "work"
  shutil.copytree(reference, workdir)
  return workdir


def _largest_weights_file(step_dir):
  files = glob.glob(os.path.join(step_dir, "model", "**", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)


def test_overwritten_bytes_are_detected_and_skipped(damaged, tmp_path):
  path = _largest_weights_file(damaged / "checkpoints" / "12")
  data = bytearray(open(path, "rb").read())
  data[100:1100] = random.Random(0).randbytes(1000)
  open(path, "wb").write(bytes(data))
  out = tmp_path / "report.json"
  # --checkpoint is the work directory, as in the README's example.
  named = run_tool("eval.py", ["--checkpoint", damaged, "--step", 12, "--out", out,
                               "--no-progress"])
  assert named.returncode == 2, named.stderr[-3000:]
  assert "error: checkpoint step 12" in named.stderr and "damaged" in named.stderr
  assert "Traceback" not in named.stderr
  latest = run_tool("eval.py", ["--checkpoint", damaged, "--out", out, "--no-progress"])
  assert latest.returncode == 0, latest.stderr[-3000:]
  assert "Using step 9, the newest intact checkpoint" in latest.stderr
  assert json.load(open(out))["step"] == 9


def test_checksum_mismatch_names_the_array(damaged):
  meta_file = damaged / "checkpoints" / "12" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  name = sorted(meta["integrity"]["model"])[0]
  meta["integrity"]["model"][name] = "00000000"
  meta_file.write_text(json.dumps(meta))
  done = run_tool("eval.py", ["--checkpoint", damaged, "--step", 12, "--no-progress"])
  assert done.returncode == 2
  assert (f"checkpoint step 12 in {str(damaged / 'checkpoints')!r} is damaged: array "
          f"model/{name} differs from the checksum") in done.stderr


def test_truncated_file_resume_falls_back_to_the_previous_step(
    reference, damaged, data_dir):
  path = _largest_weights_file(damaged / "checkpoints" / "12")
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])
  done = run_tool("train.py", train_args(damaged, data_dir))
  assert done.returncode == 0, done.stderr[-3000:]
  assert "checkpoint step 12" in done.stderr and "Using step 9" in done.stderr
  assert (damaged / "checkpoints" / "12.damaged").is_dir()
  assert metric_lines(damaged) == metric_lines(reference)


def test_empty_step_folder_and_garbage_meta_are_never_latest(damaged, data_dir, tmp_path):
  os.makedirs(damaged / "checkpoints" / "15")  # empty, beyond the last step
  (damaged / "checkpoints" / "12" / "meta" / "metadata").write_text("{garbage")
  out = tmp_path / "report.json"
  done = run_tool("eval.py", ["--checkpoint", damaged, "--out", out, "--no-progress"])
  assert done.returncode == 0, done.stderr[-3000:]
  assert "checkpoint step 15" in done.stderr and "checkpoint step 12" in done.stderr
  assert json.load(open(out))["step"] == 9


# ---------------------------------------------------------------------------
# Bad config values: one line, exit 2, nothing written.
# ---------------------------------------------------------------------------
def test_keep_checkpoints_0_is_refused_before_any_work(data_dir, tmp_path):
  workdir = tmp_path / "keep0"
  done = run_tool("train.py", train_args(workdir, data_dir, keep_checkpoints=0))
  assert done.returncode == 2
  assert done.stderr.startswith("error: config.keep_checkpoints=0; expected an integer >= 1")
  assert len(done.stderr.strip().splitlines()) <= 2 and not workdir.exists()


@pytest.mark.parametrize("key, value, match", [
    ("optim.base_lr", "-1", "config.optim.base_lr=-1.0; expected a finite number > 0"),
    ("optim.base_lr", "nan", "config.optim.base_lr"),
    ("batch_size", "0", "config.batch_size=0; expected an integer >= 1"),
    ("total_steps", "-3", "config.total_steps=-3"),
    ("checkpoint_every_steps", "-1", "config.checkpoint_every_steps=-1"),
    ("data.crop_size", "0", "config.data.crop_size=0"),
    ("data.scale_range", "(2.0,1.0)", "config.data.scale_range"),
    ("optim.momentum", "1.5", "config.optim.momentum=1.5"),
    ("optim.accum_steps", "0", "config.optim.accum_steps=0"),
    ("eval_num_batches", "0", "config.eval_num_batches=0"),
    ("stop_at_step", "99", "config.stop_at_step=99 is after config.total_steps=12"),
    ("model.activation", "gelu", "config.model.activation='gelu'; expected one of"),
    ("no_such_key", "1", "unknown config field 'no_such_key'"),
    ("optim.base_lrr", "1", "unknown config field 'optim.base_lrr'; did you mean base_lr"),
    ("batch_size", "3", "not divisible|multiple"),
    ("data.crop_size", "48", "crop_size=48 is not a multiple of the model's size multiple 32"),
])
def test_bad_config_values_are_one_line_errors(key, value, match, data_dir, tmp_path,
                                                capsys):
  from lseg_jax.cli import common  # pylint: disable=g-import-not-at-top
  from lseg_jax.cli import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "work"
  argv = train_args(workdir, data_dir, **{key: value, "mesh.data": 2})
  rc = common.run(train.main, argv)
  err = capsys.readouterr().err
  assert rc == 2, err
  # (In-process, absl's handler may also report writing to an earlier test's stderr.)
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and re.search(match, errors[0]), err


def test_resume_onto_another_model_names_the_config_key(damaged, data_dir):
  done = run_tool("train.py", train_args(damaged, data_dir,
                                         **{"model.backbone": "tiny_vit16"}))
  assert done.returncode == 2
  assert ("holds another model: config.model.backbone='tiny_vit32' there, 'tiny_vit16' "
          "now") in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------
# The input pipeline: an error ends the process, every time.
# ---------------------------------------------------------------------------
def _folder_dataset(root, bad_value):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split in ("train", "validation"):
    os.makedirs(root / split / "images")
    os.makedirs(root / split / "masks")
    for i in range(8):
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
          root / split / "images" / f"{i}.png")
      mask = rng.integers(0, 3, (32, 32)).astype(np.uint8)
      mask[3, 3] = bad_value if i == 5 else mask[3, 3]
      Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")
  (root / "labels.txt").write_text("a\nb\nc\n")


def test_pipeline_error_ends_the_process(tmp_path):
  _folder_dataset(tmp_path / "data", bad_value=7)
  for i in range(3):
    args = train_args(tmp_path / f"work{i}", tmp_path / "data", **{
        "data.name": "folder", "data.source_kwargs": "{}", "eval_every_steps": 0})
    start = time.time()
    done = run_tool("train.py", args, timeout=240)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "its mask has value 7 outside [0, 3)" in done.stderr
    assert "Traceback" not in done.stderr
    print(f"run {i}: exited {done.returncode} after {time.time() - start:.1f} s")


def _bad_example(root, case):
  """A folder dataset whose train example 5 is broken as `case` says; returns the
  path the error names."""
  import io  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  _folder_dataset(root, bad_value=0)
  image = root / "train" / "images" / "5.png"
  mask_path = root / "train" / "masks" / "5.png"
  mask = np.asarray(Image.open(mask_path))
  if case == "truncated_jpeg":
    buf = io.BytesIO()
    Image.open(image).save(buf, "JPEG")
    image.unlink()
    image = image.with_suffix(".jpg")
    image.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
  elif case == "not_an_image":
    image.write_text("this is not an image\n")
  elif case == "wrong_size":
    Image.fromarray(mask[:16]).save(mask_path)
  elif case == "value_out_of_range":
    mask = mask.copy()
    mask[3, 3] = 7
    Image.fromarray(mask).save(mask_path)
  elif case == "value_out_of_range_16bit":
    mask = mask.astype(np.uint16)
    mask[3, 3] = 300
    Image.fromarray(mask).save(mask_path)
  elif case == "palette":
    Image.fromarray(mask).convert("P").save(mask_path)
  elif case == "rgb":
    Image.fromarray(np.stack([mask] * 3, -1)).save(mask_path)
  return image


_SKIP = " Set data_cfg.on_bad_example='skip' to skip such examples."
_DECODE = ("reading or decoding it failed ({}); expected an image Pillow reads (JPEG, PNG, "
           "GIF, BMP, WebP, TIFF, ...) and a PNG mask." + _SKIP)
BAD_DATA = {
    "truncated_jpeg": _DECODE.format("Invalid JPEG data, size 618"),
    "not_an_image": "Unknown image file format or damaged image (21 bytes; Pillow: cannot "
                    "identify image file); expected a JPEG, PNG, GIF, BMP, WebP, TIFF or "
                    "another format Pillow reads." + _SKIP,
    "wrong_size": "its mask has size [16 32] but its image has size [32 32]; expected the "
                  "same height and width." + _SKIP,
    "value_out_of_range": "its mask has value 7 outside [0, 3); expected a label index 0-2 "
                          "(3 labels) or 255 for ignore.",
    "value_out_of_range_16bit": "its mask has value 300 outside [0, 3); expected a label "
                                "index 0-2 (3 labels) or 255 for ignore.",
    "palette": "its mask is a palette PNG; expected a greyscale PNG whose pixel values are "
               "label indices (convert it with PIL: Image.fromarray(np.array(img)))." + _SKIP,
    "rgb": "its mask is not an 8- or 16-bit greyscale PNG (PIL mode L or I;16); expected one "
           "channel whose pixel values are label indices (colour, alpha, 1/2/4-bit and "
           "palette masks are refused: save np.asarray(mask) with Image.fromarray as uint8 or "
           "uint16)." + _SKIP,
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_training_data_is_one_line(case, tmp_path):
  image = _bad_example(tmp_path / "data", case)
  args = train_args(tmp_path / "work", tmp_path / "data", **{
      "data.name": "folder", "data.source_kwargs": "{}", "eval_every_steps": 0})
  env = dict(ENV)
  env.pop("TF_CPP_MIN_LOG_LEVEL")  # as a user runs it: the tool keeps TF's C++ warnings out
  done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert done.returncode == 2, done.stderr[-3000:]
  errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
  assert errors == [f"error: Bad example {str(image)!r}: {BAD_DATA[case]}"], done.stderr[-3000:]
  assert "Traceback" not in done.stderr and "tf.Tensor" not in done.stderr
  # Nothing but our own log lines and the error (libjpeg itself prints its complaint
  # about a truncated file, and absl its banner when TensorFlow first logs).
  ours = re.compile(r"[IW]\d{4} [\d:.]+ +\d+ \w+\.py:\d+\] |error: |\(rerun with "
                    r"|Improper call to JPEG library|WARNING: All log messages before absl")
  others = [line for line in done.stderr.splitlines() if line.strip() and not ours.match(line)]
  assert not others, others


# ---------------------------------------------------------------------------
# Predict, import, export.
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from lseg_jax import text  # pylint: disable=g-import-not-at-top
  from lseg_jax.models import lseg  # pylint: disable=g-import-not-at-top
  cfg = lseg.LSegConfig(backbone="tiny_vit32", text_vocab_size=text.BYTE_LEVEL_VOCAB_SIZE)
  model = lseg.LSeg(cfg, rngs=nnx.Rngs(0))
  model.eval()
  return model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / "good.jpg")
  Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / "good.png")
  (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  return folder


def test_nan_weights_at_import_and_predict(tiny_model, images, tmp_path):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from lseg_jax.convert import langseg  # pylint: disable=g-import-not-at-top
  state = langseg.export_langseg(tiny_model)
  key = "scratch.head1.weight"
  state[key] = np.full_like(state[key], np.nan)
  save_file({k: np.array(v) for k, v in state.items()}, tmp_path / "nan.safetensors")
  done = run_tool("convert.py", ["import", tmp_path / "nan.safetensors", tmp_path / "ckpt"])
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"tensor {key!r} has" in done.stderr and "NaN/Inf values" in done.stderr
  # The tokenizer is recorded: predict needs no network (offline variables set).
  offline = dict(ENV, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  done = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "predict.py"), "--checkpoint",
       str(tmp_path / "ckpt"), "--image", str(images / "good.jpg"), "--labels", "a,b",
       "--out", str(tmp_path / "out.png")], cwd=ROOT, env=offline, capture_output=True,
      text=True, timeout=300)
  assert done.returncode == 2, done.stderr[-3000:]
  assert "logits for" in done.stderr and "are not finite" in done.stderr
  assert not (tmp_path / "out.png").exists()
  del nnx


def test_predict_folder_unique_names_and_bad_images(tiny_model, images, tmp_path):
  from lseg_jax import checkpoint  # pylint: disable=g-import-not-at-top
  checkpoint.save_model(str(tmp_path / "ckpt"), tiny_model,
                        extra_meta={"tokenizer": "byte-level"})
  out = tmp_path / "out"
  done = run_tool("predict.py", ["--checkpoint", tmp_path / "ckpt", "--images", images,
                                 "--labels", "a,b", "--out", out])
  assert done.returncode == 2, done.stderr[-3000:]
  assert sorted(p for p in os.listdir(out) if p.endswith(".json")) == [
      "good_jpg.json", "good_png.json"]
  assert "1 of 3 images failed" in done.stderr and "broken.png" in done.stderr
  # Offline with a hub tokenizer that is not cached: fails fast, naming the fix.
  start = time.time()
  done = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "predict.py"), "--checkpoint",
       str(tmp_path / "ckpt"), "--image", str(images / "good.jpg"), "--labels", "a,b",
       "--out", str(tmp_path / "x.png"), "--tokenizer", "lseg-tests/no-such-tokenizer"],
      cwd=ROOT, env=dict(ENV, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
      timeout=300)
  assert done.returncode == 2
  assert "'lseg-tests/no-such-tokenizer' (vocab.json, merges.txt) is not in the local" in (
      done.stderr) and "--tokenizer FOLDER" in done.stderr
  print(f"offline tokenizer error after {time.time() - start:.1f} s")


def test_user_errors_of_predict_eval_train_are_one_line(tiny_model, images, tmp_path, capsys):
  from lseg_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from lseg_jax.cli import common  # pylint: disable=g-import-not-at-top
  from lseg_jax.cli import eval as eval_cli  # pylint: disable=g-import-not-at-top
  from lseg_jax.cli import predict  # pylint: disable=g-import-not-at-top
  from lseg_jax.cli import train  # pylint: disable=g-import-not-at-top
  ckpt = tmp_path / "ckpt"
  checkpoint.save_model(str(ckpt), tiny_model, extra_meta={"tokenizer": "byte-level"})
  base = ["--checkpoint", str(ckpt), "--image", str(images / "good.jpg"),
          "--out", str(tmp_path / "x.png")]
  cases = [
      (predict.main, base + ["--labels-file", str(tmp_path / "nope.txt")],
       "--labels-file .*nope.txt' does not exist"),
      (predict.main, base + ["--labels", "dog,cat,Dog"], "duplicate labels: 'dog'"),
      (predict.main, ["--checkpoint", str(tmp_path), "--image", str(images / "good.jpg"),
                      "--labels", "a", "--out", str(tmp_path / "x.png")],
       "no complete checkpoint found"),
      (predict.main, base + ["--labels", "a", "--tokenizer", str(tmp_path)],
       "tokenizer folder .* lacks"),
      (train.main, [f"--config={CONFIG}", f"--workdir={images / 'good.jpg'}"], "is a file"),
      (train.main, [f"--config={CONFIG}", f"--workdir={images / 'good.jpg' / 'sub'}"],
       "is not writable"),
  ]
  for main, argv, match in cases:
    rc = common.run(main, argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: "), (argv, err)
    assert len(err.strip().splitlines()) <= 2 and re.search(match, err), (argv, err)
  for flags, match in [(["--batch-size", "0"], "--batch-size 0"),
                       (["--scales", "0.5,-1"], "--scales"),
                       (["--crops-per-device", "0"], "--crops-per-device 0"),
                       (["--fold", "-2"], "--fold -2")]:
    with pytest.raises(SystemExit) as e:
      eval_cli.parse_args(["--checkpoint", str(ckpt), *flags])
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_export_refuses_to_overwrite(tiny_model, tmp_path):
  pytest.importorskip("torch")
  from lseg_jax import checkpoint  # pylint: disable=g-import-not-at-top
  checkpoint.save_model(str(tmp_path / "ckpt"), tiny_model)
  (tmp_path / "model.pt").write_bytes(b"keep me")
  done = run_tool("convert.py", ["export", tmp_path / "ckpt", tmp_path / "model.pt"])
  assert done.returncode == 2 and "exists; pass --overwrite" in done.stderr
  assert (tmp_path / "model.pt").read_bytes() == b"keep me"


def test_large_images_are_scaled_down_or_a_one_line_memory_error():
  from lseg_jax import inference  # pylint: disable=g-import-not-at-top
  from lseg_jax.cli import common  # pylint: disable=g-import-not-at-top
  assert inference.model_input_size(6000, 4000, 32, max_side=1024) == (1024, 672)
  assert inference.model_input_size(500, 700, 32, max_side=1024) == (512, 704)
  assert inference.model_input_size(40, 9000, 32, max_side=100) == (32, 96)
  oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB.")
  message = common.user_error_message(oom)
  assert "ran out of memory" in message and "--max-side" in message
  assert common.user_error_message(RuntimeError("a bug")) is None


# ---------------------------------------------------------------------------
# Config files that fail to load, and files that are not checkpoints: one line each,
# naming the file, exit code 2.
# ---------------------------------------------------------------------------
_SYNTAX_ERROR = "import ml_collections\ndef get_config(arg=None):\n  c = ml_collections.ConfigDict(\n  return c\n"
_RAISES = 'def get_config(arg=None):\n  del arg\n  raise RuntimeError("boom in get_config")\n'


def _one_error_line(done):
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 2 and lines, done.stderr[-3000:]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  return lines[-1]


def test_config_files_that_fail_to_load_are_one_line_errors(tmp_path):
  syntax = tmp_path / "syntax.py"
  syntax.write_text(_SYNTAX_ERROR)
  with pytest.raises(SyntaxError) as compiled:
    compile(_SYNTAX_ERROR, str(syntax), "exec")
  raises = tmp_path / "raises.py"
  raises.write_text(_RAISES)
  no_get = tmp_path / "no_get.py"
  no_get.write_text("X = 1\n")
  missing = tmp_path / "missing.py"
  cases = [
      (syntax, f"error: --config '{syntax}': syntax error in {syntax} line "
               f"{compiled.value.lineno}: {compiled.value.msg}"),
      (raises, f"error: --config '{raises}' failed to load (line 3): RuntimeError: "
               "boom in get_config"),
      (no_get, f"error: --config '{no_get}' has no get_config(); expected a config file "
               "that defines get_config(arg=None)"),
      (missing, f"error: --config file '{missing}' does not exist; expected "
                "configs/NAME.py[:ARGS]"),
  ]
  for path, expected in cases:
    done = run_tool("train.py", [f"--config={path}", f"--workdir={tmp_path / 'work'}"])
    assert _one_error_line(done) == expected, done.stderr[-3000:]
    assert done.stderr.count("error: ") == 1, done.stderr[-3000:]


def test_import_of_files_that_are_not_checkpoints_exits_2(tmp_path):
  torch = pytest.importorskip("torch")
  whole = tmp_path / "whole.pt"
  torch.save({"a": torch.zeros(3)}, whole)
  files = {
      "empty.pt": b"",
      "random.pt": bytes(range(1, 128)) * 20,
      "truncated.pt": whole.read_bytes()[:200],
  }
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
  cases = [
      ("empty.pt", "{src!r} is empty; expected a PyTorch checkpoint file"),
      ("random.pt", "{src!r} is not a PyTorch checkpoint file (neither a zip archive nor "
                    "a pickle)"),
      ("truncated.pt", "{src!r} is a damaged or truncated zip archive; expected a complete "
                       "PyTorch checkpoint file"),
      ("whole.pt", "{src} is not an LSegNet state dict: it has no keys under "
                   "['pretrained.model.', 'scratch.']; first keys: ['a']"),
  ]
  for name, reason in cases:
    src = str(tmp_path / name)
    done = run_tool("convert.py", ["import", src, tmp_path / "out"])
    expected = f"error: cannot import {src!r}: " + reason.format(src=src)
    assert _one_error_line(done) == expected, done.stderr[-3000:]
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr[-3000:]
    assert not (tmp_path / "out").exists()
