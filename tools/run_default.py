r"""The built-in default, end to end on a CPU: train, evaluate, predict an image.

  python tools/run_default.py --workdir runs/synthetic_tiny

1. trains `configs/synthetic_tiny.py` (tiny LSeg, generated data; a few minutes on two
   cores) into WORKDIR (rerunning resumes; a finished run is not retrained);
2. evaluates the final checkpoint on the validation split with tools/eval.py
   (WORKDIR/eval.json);
3. segments a newly generated scene with tools/predict.py, labels given as text
   (WORKDIR/example.png -> WORKDIR/prediction.png, plus its label map and JSON).
Config overrides work as for tools/train.py (`--config.total_steps=...`).
"""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs", "synthetic_tiny.py"), "Training config.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/synthetic_tiny", "Output directory.")


def _tool(name: str):
  """tools/NAME.py as a module (its `main(argv)` is the command line)."""
  spec = importlib.util.spec_from_file_location(f"_tool_{name}",
                                                os.path.join(ROOT, "tools", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def write_example_image(path: str, height: int, width: int, seed: int = 12345) -> None:
  """A scene from the synthetic generator that is in neither split (another seed)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from lseg_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  image, _ = synthetic.generate_scene(np.random.default_rng(seed), height, width)
  Image.fromarray(image).save(path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from lseg_jax import train  # pylint: disable=g-import-not-at-top
  train.quiet_library_logs()
  from lseg_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  if config.data.name != "synthetic":
    raise app.UsageError(f"run_default.py runs the synthetic config; got data "
                         f"{config.data.name!r} (use tools/train.py for other configs)")

  summary = train.train_and_evaluate(config, workdir)
  if summary["preempted"]:
    print(f"training stopped at step {summary['step']}; rerun to resume")
    return 1
  ckpt = os.path.join(workdir, train.CHECKPOINT_SUBDIR)

  eval_argv = ["--checkpoint", ckpt, "--config", os.path.join(ROOT, "configs",
                                                                "synthetic_tiny.py"),
               "--out", os.path.join(workdir, "eval.json"), "--no-progress"]
  if config.data.data_dir:
    eval_argv += ["--data-dir", config.data.data_dir]
  rc = _tool("eval").main(eval_argv)
  if rc:
    return rc

  example = os.path.join(workdir, "example.png")
  kwargs = config.data.source_kwargs
  write_example_image(example, kwargs.get("height", 64), kwargs.get("width", 64))
  rc = _tool("predict").main([
      "--checkpoint", ckpt, "--image", example, "--labels", ",".join(synthetic.LABEL_NAMES),
      "--out", os.path.join(workdir, "prediction.png")])
  if rc:
    return rc
  print(f"\nTrained, evaluated and predicted in {workdir}:\n"
        f"  checkpoints/  eval.json  metrics.jsonl  example.png -> prediction.png")
  return 0


if __name__ == "__main__":
  app.run(main)
