r"""Times the training step of a config: random weights, generated batches, no data files.

  python tools/benchmark_train.py --config configs/ade20k.py:variant=vitb32 \
      --config.batch_size=2 --config.model.dtype=float32 --steps 5

Builds the state exactly as `tools/train.py` does (mesh, shardings, the jitted and
donated step) from the config, feeds `--steps` generated batches of
`config.data.crop_size` images with `--labels` labels and prints one JSON line: compile
time, mean and best step time, global images per second (all processes; under
`tools/launch.py` process 0 prints it).
"""
import argparse
import json
import sys
import time

from lseg_jax import distributed
from lseg_jax.cli import common


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common.add_config_arg(p, required=True, help_text="training config file[:arg]")
  p.add_argument("--steps", type=int, default=5,
                 help="timed steps (after one compile+warm-up step)")
  p.add_argument("--labels", type=int, default=150, help="labels per batch (ADE20K: 150)")
  common.add_distributed_args(p)
  return p


def generated_batch(rng, batch_size: int, crop: int, num_labels: int):
  """Random image [B, crop, crop, 3] in [-1, 1], label [B, crop, crop], all labels on."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return {
      "image": rng.uniform(-1, 1, (batch_size, crop, crop, 3)).astype(np.float32),
      "label": rng.integers(-1, num_labels, (batch_size, crop, crop)).astype(np.int32),
      "label_mask": np.ones((batch_size, num_labels), bool),
  }


def main(argv=None) -> int:
  args = common.parse(build_parser(), argv)
  config = common.load_config(args.config, args.overrides)
  common.setup_logging()
  common.start_jax(args)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lseg_jax import sharding, state as state_lib, train  # pylint: disable=g-import-not-at-top
  from lseg_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(config.mesh)
  train.check_batch_config(config, mesh)
  spec = state_lib.state_spec(config, mesh)
  state = state_lib.init_state(spec, tuple(config.optim.frozen))()
  train_step = train.jit_train_step(spec, config, mesh)
  rng = np.random.default_rng(0)
  text_emb = jax.device_put(
      rng.normal(size=(args.labels, spec.abstract["frozen"]["clip_pretrained"][
          "text_projection"].shape[-1])).astype(np.float32), sharding.replicated(mesh))
  batch_sh = sharding.batch_sharding(mesh)
  batches = [input_pipeline.to_global(
      generated_batch(rng, config.batch_size // jax.process_count(), config.data.crop_size,
                      args.labels), batch_sh)
             for _ in range(2)]

  t0 = time.perf_counter()
  state, metrics = train_step(state, batches[0], text_emb)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = train_step(state, batches[i % 2], text_emb)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  mean = float(np.mean(times))
  distributed.done()
  if jax.process_index():
    return 0
  print(json.dumps({
      "backbone": config.model.backbone, "dtype": config.model.dtype,
      "batch_size": config.batch_size, "crop": config.data.crop_size,
      "labels": args.labels, "processes": jax.process_count(), "devices": mesh.size,
      "platform": jax.devices()[0].platform,
      "first_step_s": round(compile_s, 2), "step_s_mean": round(mean, 3),
      "step_s_best": round(float(np.min(times)), 3),
      "images_per_sec": round(config.batch_size / mean, 3),
      "loss": float(metrics["loss"])}))
  return 0


if __name__ == "__main__":
  common.entry_point(main)
