"""Multi-process training and evaluation with real processes (tools/launch.py, gloo).

2 processes x 4 CPU devices against 1 process x 8 devices, on the tiny model, 32x32
synthetic images, global batch 8 on a (data=2, fsdp=4) mesh, 8 steps: the same losses
and parameters; checkpoints that restore across process counts; SIGTERM to one process
stops both at one step; SIGKILL of one process ends the other with a message; eval
reports equal the single-process ones; bad settings fail fast and write nothing.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from lseg_jax import checkpoint
from lseg_jax import distributed
from lseg_jax.convert import mapping
from lseg_jax.data import synthetic

import hsnet_splits
import run_helpers

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic_tiny.py")
TOTAL = 8
SYNTH = dict(height=32, width=32, num_train=48, num_validation=8, seed=0)
OVERRIDES = {
    "batch_size": 8, "eval_batch_size": 8, "total_steps": TOTAL, "log_every_steps": 1,
    "checkpoint_every_steps": 4, "eval_every_steps": 0, "eval_at_end": False,
    "progress_bar": False, "model.backbone": "tiny_vit32",
    **{f"data.source_kwargs.{k}": v for k, v in SYNTH.items()},
    "data.crop_size": 32, "data.base_size": 32,
    "mesh.data": 2, "mesh.fsdp": 4, "sharding.min_size": 256,
}
# Every batch is delayed so that a signal lands mid-run.
SLOW_TRAIN = run_helpers.slow_train_script(0.5)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
              XLA_FLAGS="--xla_force_host_platform_device_count=8",
              JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
              JAX_DEFAULT_MATMUL_PRECISION="highest")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  # Built once here: processes must not build the same dataset at the same time.
  path = str(tmp_path_factory.mktemp("tfds"))
  synthetic.build(path, **SYNTH)
  synthetic.build(path, **{**SYNTH, "num_validation": 7})
  return path


def train_args(workdir, data_dir, **extra):
  flags = [f"--config.{k}={v}" for k, v in
           {**OVERRIDES, "data.data_dir": data_dir, **extra}.items()]
  return [f"--config={CONFIG}:runlocal", f"--workdir={workdir}", *flags]


def launch_cmd(processes, *command):
  if processes == 1:
    return [sys.executable, *command]
  return [sys.executable, "tools/launch.py", "--processes", str(processes),
          "--devices-per-process", str(8 // processes), "--", sys.executable, *command]


def run(cmd, env, timeout=420):
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)
  return done.returncode, done.stdout + done.stderr


def train(workdir, data_dir, env, processes, **extra):
  rc, out = run(launch_cmd(processes, "tools/train.py", *train_args(workdir, data_dir, **extra)),
                env)
  assert rc == 0, out[-4000:]
  return out


def metric_lines(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def losses(workdir):
  return {r["step"]: r["train/loss"] for r in metric_lines(workdir) if "train/loss" in r}


def params(workdir, step):
  model, _ = checkpoint.load_model(os.path.join(workdir, "checkpoints"), step=step)
  return {k: np.asarray(v) for k, v in mapping.flatten_params(model).items()}


def assert_same_run(workdir, reference, steps, exact_first_step):
  """The reference run's computation on another process layout (run_helpers says how
  close): every step in `steps` and the final parameters. With `exact_first_step`, the
  first of `steps` started from the reference's own state (its initial state or its
  checkpoint) and is held to one step's tolerance."""
  got = losses(workdir)
  run_helpers.assert_equivalent_runs(got, reference["losses"], steps, params(workdir, TOTAL),
                                     reference["params"])
  if exact_first_step:
    run_helpers.assert_same_losses(got, reference["losses"], [steps[0]],
                                   run_helpers.ONE_STEP_TOL)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, env):
  """An uninterrupted 1-process x 8-device run."""
  workdir = str(tmp_path_factory.mktemp("one_process"))
  train(workdir, data_dir, env, 1)
  return {"workdir": workdir, "losses": losses(workdir), "params": params(workdir, TOTAL)}


def pids(log_text):
  return {int(i): int(p) for i, p in
          re.findall(r"\[launch\] process (\d+) of \d+: pid (\d+)", log_text)}


def start_slow(tmp_path, name, workdir, data_dir, env, **extra):
  log_path = tmp_path / f"{name}.log"
  log = open(log_path, "w")
  cmd = launch_cmd(2, "-c", SLOW_TRAIN, *train_args(workdir, data_dir, **extra))
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  return proc, log, log_path


def wait_for_step(proc, workdir, step, log_path, timeout=300):
  deadline = time.time() + timeout
  while max(losses(workdir), default=0) < step:
    assert proc.poll() is None, "the run ended early: " + log_path.read_text()[-4000:]
    assert time.time() < deadline, f"step {step} not reached in {timeout} s"
    time.sleep(0.1)


def test_two_processes_equal_one_process(reference, data_dir, env, tmp_path):
  workdir = str(tmp_path / "two")
  out = train(workdir, data_dir, env, 2)
  assert "process 1 of 2, 4 local / 8 global cpu devices" in out
  # metrics.jsonl holds each step once (process 0 alone writes it).
  steps = [r["step"] for r in metric_lines(workdir) if "train/loss" in r]
  assert steps == list(range(1, TOTAL + 1))
  assert out.count("finished at step") == 1
  # Same losses and parameters; the 2-process checkpoint restores in this 1 process.
  assert_same_run(workdir, reference, range(1, TOTAL + 1), exact_first_step=True)
  # Its step-4 checkpoint resumed in 1 process: the step-5 loss is computed from the
  # restored state, and equals the 2-process run's to one step's tolerance.
  resumed = str(tmp_path / "two_then_one")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", str(TOTAL)))
  train(resumed, data_dir, env, 1, stop_at_step=5)
  run_helpers.assert_same_losses(losses(resumed), losses(workdir), [5],
                                 run_helpers.ONE_STEP_TOL)


def test_sigterm_to_one_process_stops_both_then_resume_in_one(reference, data_dir, env,
                                                               tmp_path):
  workdir = str(tmp_path / "term")
  proc, log, log_path = start_slow(tmp_path, "term", workdir, data_dir, env)
  try:
    wait_for_step(proc, workdir, 2, log_path)
    time.sleep(1.0)  # the launcher has printed the pids
    os.kill(pids(log_path.read_text())[1], signal.SIGTERM)  # process 1 only
    # Both processes exit 75 (preempted: rerun to resume); the launcher passes it on.
    assert proc.wait(timeout=120) == 75, log_path.read_text()[-4000:]
  finally:
    if proc.poll() is None:
      proc.kill()
    log.close()
  text = log_path.read_text()
  stops = {int(i): int(s) for i, s in
           re.findall(r"^\[(\d)\] .*Stopped at step (\d+)", text, re.MULTILINE)}
  assert set(stops) == {0, 1} and stops[0] == stops[1], text[-3000:]
  stopped = stops[0]
  assert 2 <= stopped < TOTAL
  assert f"finished at step {stopped} (stopped early" in text
  mngr = checkpoint.manager(os.path.join(workdir, "checkpoints"), read_only=True)
  assert mngr.latest_step() == stopped
  # The 2-process checkpoint resumes in 1 process. Its state came from 2 x 4 devices,
  # the reference's from 1 x 8: not the same state, so no step is held to one step's
  # tolerance (measured: 2.3e-5 at step 8 after a stop at step 5).
  train(workdir, data_dir, env, 1)
  assert_same_run(workdir, reference, range(stopped + 1, TOTAL + 1), exact_first_step=False)


def test_sigkill_one_process_ends_the_other_then_rerun(reference, data_dir, env, tmp_path):
  workdir = str(tmp_path / "kill")
  # A 1-process checkpoint at step 4, resumed and killed in 2 processes.
  train(workdir, data_dir, env, 1, stop_at_step=4)
  kill_env = dict(env, **{distributed.ENV_HEARTBEAT_TIMEOUT: "10"})
  proc, log, log_path = start_slow(tmp_path, "kill", workdir, data_dir, kill_env)
  try:
    wait_for_step(proc, workdir, 5, log_path)
    time.sleep(0.5)
    os.kill(pids(log_path.read_text())[1], signal.SIGKILL)
    killed = time.time()
    rc = proc.wait(timeout=90)
    elapsed = time.time() - killed
  finally:
    if proc.poll() is None:
      proc.kill()
    log.close()
  text = log_path.read_text()
  assert rc != 0 and elapsed < 60, (rc, elapsed)
  assert "[0] error: process 1 of 2 was lost" in text, text[-3000:]
  assert f"exit codes [{distributed.EXIT_PROCESS_LOST}, 137]" in text, text[-3000:]
  assert "Rerun the same command" in text
  assert checkpoint.manager(os.path.join(workdir, "checkpoints"),
                            read_only=True).latest_step() == 4
  # Rerunning both processes resumes from step 4: the 1-process checkpoint (the
  # reference's own state at step 4) restores in 2 processes and training continues.
  train(workdir, data_dir, env, 2)
  assert_same_run(workdir, reference, range(5, TOTAL + 1), exact_first_step=True)


@pytest.fixture(scope="module")
def fss_root(tmp_path_factory):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("fss")
  hsnet_splits.write(root)
  rng = np.random.default_rng(1)
  for categories in hsnet_splits.FSS_CLASSES.values():
    for category in categories:
      os.makedirs(f"{root}/FSS-1000/{category}", exist_ok=True)
      for n in (1, 2, 3):
        Image.fromarray(rng.integers(0, 256, (24, 28, 3)).astype(np.uint8)).save(
            f"{root}/FSS-1000/{category}/{n}.jpg")
        Image.fromarray(rng.choice([0, 255], (24, 28)).astype(np.uint8)).save(
            f"{root}/FSS-1000/{category}/{n}.png")
  return str(root)


@pytest.mark.parametrize("protocol", ["fixed", "episodes"])
def test_eval_two_processes_equal_one(reference, fss_root, env, tmp_path, protocol):
  # 7 fixed-label examples or 9 episodes: the last batch does not split evenly.
  data = (["--config.data.source_kwargs.num_validation=7"] if protocol == "fixed" else
          ["--data", "fss1000", f"--config.data.data_dir={fss_root}",
           "--config.data.crop_size=32", "--config.data.base_size=32"])
  reports = []
  for processes in (1, 2):
    out = tmp_path / f"report_{processes}.json"
    rc, text = run(launch_cmd(processes, "tools/eval.py", "--checkpoint",
                              reference["workdir"], "--out", str(out), "--no-progress",
                              "--batch-size", str(8 // processes), *data), env)
    assert rc == 0, text[-4000:]
    reports.append(json.loads(out.read_text()))
  for r in reports:
    r.pop("seconds")
  assert reports[0]["protocol"] == protocol
  assert reports[0]["num_examples"] == (7 if protocol == "fixed" else 9)
  assert reports[0] == reports[1]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_bad_settings_fail_fast_and_write_nothing(data_dir, env, tmp_path):
  fast = dict(env, **{distributed.ENV_INIT_TIMEOUT: "10"})
  # A global batch that the 8 data-parallel devices cannot split.
  workdir = tmp_path / "batch"
  t0 = time.time()
  rc, out = run(launch_cmd(2, "tools/train.py",
                           *train_args(workdir, data_dir, batch_size=12)), fast, timeout=120)
  assert rc != 0 and "batch_size=12 is not divisible by the 8 devices" in out, out[-3000:]
  assert not workdir.exists()
  # An unreachable coordinator.
  workdir = tmp_path / "unreachable"
  rc, out = run([sys.executable, "tools/train.py", *train_args(workdir, data_dir),
                 "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2",
                 "--process-id", "1"], fast, timeout=120)
  assert rc != 0 and "could not join the job" in out, out[-3000:]
  assert not workdir.exists()
  # Processes that disagree on the process count.
  workdir = tmp_path / "inconsistent"
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = []
  for count, index in ((2, 0), (3, 2)):
    penv = dict(fast, **{distributed.ENV_COORDINATOR: coordinator,
                         distributed.ENV_NUM_PROCESSES: str(count),
                         distributed.ENV_PROCESS_ID: str(index),
                         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    procs.append(subprocess.Popen([sys.executable, "tools/train.py",
                                   *train_args(workdir, data_dir)], cwd=ROOT, env=penv,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  outs = [p.communicate(timeout=120)[0] for p in procs]
  assert all(p.returncode != 0 for p in procs), [o[-2000:] for o in outs]
  assert "could not join the job" in outs[0] + outs[1], [o[-2000:] for o in outs]
  assert not workdir.exists()
  assert time.time() - t0 < 300
