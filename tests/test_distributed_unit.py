"""The distributed start's argument checks, the launcher's environment, and host-side
outputs on a second filesystem (TensorFlow's ram://), without starting processes."""
import json

import pytest
import tensorflow as tf

from lseg_jax import distributed
from lseg_jax import openvocab
from lseg_jax import train_utils
from lseg_jax.cli import eval as eval_cli
from lseg_jax.cli import launch


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator="127.0.0.1:1", num_processes=2, process_id=2), "outside [0, 2)"),
    (dict(coordinator="127.0.0.1:1", num_processes=2), "missing ['--process-id']"),
    (dict(num_processes=0, process_id=0), "--num-processes 0"),
])
def test_bad_process_settings_are_refused(kwargs, message, monkeypatch):
  for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
               distributed.ENV_PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(ValueError) as e:
    distributed.initialize(**kwargs)
  assert message in str(e.value)


def test_launcher_environment():
  env = launch.process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --a"},
                           1, 2, "127.0.0.1:5", "cpu", 4)
  assert env[distributed.ENV_PROCESS_ID] == "1" and env[distributed.ENV_NUM_PROCESSES] == "2"
  assert env["XLA_FLAGS"] == "--a --xla_force_host_platform_device_count=4"
  gpu = launch.process_env({}, 1, 2, "127.0.0.1:5", "gpu", 2)
  assert gpu["CUDA_VISIBLE_DEVICES"] == "2,3"
  assert launch.exit_code(-9) == 137 and launch.exit_code(3) == 3


def test_metrics_and_reports_on_a_second_filesystem():
  workdir = "ram://lseg_test/run"
  tf.io.gfile.makedirs(workdir)
  writer = train_utils.MetricWriter(workdir, None)
  for step in (1, 2, 3):
    writer.write(step, {"train/loss": float(step)})
  writer.close()
  # A resume from step 2 drops the later lines.
  train_utils.MetricWriter(workdir, 2).close()
  with tf.io.gfile.GFile(workdir + "/metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]
  openvocab.write_json("ram://lseg_test/ckpt/eval/val.json", {"metrics": {"mIoU": 0.5}})
  with tf.io.gfile.GFile("ram://lseg_test/ckpt/eval/val.json") as f:
    assert json.load(f) == {"metrics": {"mIoU": 0.5}}
  assert eval_cli.default_out("gs://b/ckpt", _Data(), "single_scale") == (
      "gs://b/ckpt/eval/ade20k_validation_single_scale.json")


class _Data:
  name, eval_split, fold = "ade20k", "validation", None
