r"""Times the real train and inference steps of a config on generated batches.

  python tools/benchmark.py --config configs/ade20k.py:variant=vitl16 --task both
  python tools/benchmark.py --config configs/ade20k.py:variant=vitb32 --task infer \
      --config.batch_size=1 --config.data.crop_size=384 --config.model.dtype=float32 --torch
  python tools/benchmark.py --config configs/ade20k.py:variant=vitl16 --aot v5p:2x2x1 \
      --config.batch_size=32 --aot-breakdown 20
  python tools/benchmark.py --config configs/ade20k.py:variant=vitl16 --aot v5e:2x2 --aot-fit

Random weights, no data files, label embeddings computed once (the text tower is not part
of the cost). `train` times the jitted, donated train step of `tools/train.py`; `infer` the
forward + per-pixel argmax of single-scale evaluation and prediction; `--multiscale` also
the official multi-scale protocol on one `--image-size` image. Each figure: the first call
(compilation + one step) on its own, then the median and minimum of `--steps` calls, with
images/s, FLOPs (`lseg_jax.flops`), MFU (peaks: `PEAK_FLOPS`) and peak device memory.
`--torch` also times the PyTorch LSeg (`lseg_jax.torch_lseg.benchmark`), `--data` the
input pipeline (`benchmark_data.measure`); `--aot TOPOLOGY` times nothing and compiles for
a TPU slice instead (`lseg_jax.aot`, no TPU needed). What each figure means: README,
"Speed" (--aot: docs/scaling.md).

Prints one JSON line (also written to `--json FILE`); progress goes to stderr.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

from lseg_jax import distributed
from lseg_jax.cli import common
from lseg_jax.convert import langseg
from lseg_jax.errors import UserError
from lseg_jax.timing import time_calls

NA = "n/a"
TASKS = ("train", "infer", "both")
TORCH_DTYPES = ("float32", "bfloat16")
TORCH_TEXT_TOWER = ("frozen", "trained")
# Peak dense FLOP/s per GPU, by compute dtype, keyed by a substring of
# `jax.Device.device_kind` (first match wins, so the more specific keys come first).
# The float32 figures are TF32 tensor-core peaks (XLA's default float32 matmul
# precision on NVIDIA GPUs). TPUs: `aot.CHIPS` (see `peak_flops`).
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float32": 494e12}),  # SXM
    ("H200", {"bfloat16": 989e12, "float32": 494e12}),
    ("A100", {"bfloat16": 312e12, "float32": 156e12}),
)


def build_parser() -> argparse.ArgumentParser:
  p = common.new_parser(__doc__)
  common.add_config_arg(p, required=True, help_text="training config file[:arg]")
  p.add_argument("--task", choices=TASKS, default="both", help="what to time")
  p.add_argument("--steps", type=int, default=5,
                 help="timed calls per figure, after the first (compile) call")
  p.add_argument("--labels", type=int, default=150, help="labels per image (ADE20K: 150)")
  p.add_argument("--infer-batch", type=int, default=None,
                 help="inference batch (default: config.batch_size)")
  p.add_argument("--multiscale", action="store_true",
                 help="infer: also time the multi-scale sliding-window protocol")
  p.add_argument("--image-size", default="512,683",
                 help="H,W of the --multiscale image (ADE20K's typical 512x683)")
  p.add_argument("--torch", action="store_true",
                 help="also time the PyTorch LSeg (float32 and bfloat16 autocast)")
  p.add_argument("--torch-dtypes", default=",".join(TORCH_DTYPES),
                 help="comma-separated PyTorch precisions for --torch")
  p.add_argument("--torch-text-tower", choices=TORCH_TEXT_TOWER, default="frozen",
                 help="--torch train step: label embeddings cached, or trained as lang-seg")
  p.add_argument("--data", action="store_true", help="train: also time the input pipeline")
  p.add_argument("--aot", metavar="TOPOLOGY", default=None,
                 help="compile for a TPU slice instead of timing (see below)")
  p.add_argument("--aot-breakdown", type=int, default=0, metavar="N",
                 help="with --aot: the N source lines moving the most HBM bytes")
  p.add_argument("--aot-fit", type=int, nargs="?", const=1, default=None, metavar="START",
                 help="with --aot: the most images per chip whose train step fits, found "
                      "by compiles from START (default 1) images per chip")
  p.add_argument("--json", default=None, help="also write the JSON line to this file")
  distributed.add_arguments(p)
  return p


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """The device's peak dense FLOP/s for `dtype`, None if unknown. GPUs: `PEAK_FLOPS`; TPUs:
  bfloat16 from `aot.CHIPS` (float32 matmuls run as several bfloat16 passes: no peak)."""
  rows = list(PEAK_FLOPS)
  if "tpu" in device_kind.lower():
    from lseg_jax import aot  # pylint: disable=g-import-not-at-top
    tpus = {key: {"bfloat16": chip.peak_tflops * 1e12} for generation, chip in aot.CHIPS.items()
            for key in (chip.device_kind, f"TPU {generation}")}
    # By device kind or generation name, longest first: "TPU v5 lite" (v5e) and "TPU v5p"
    # before "TPU v5" (what v5p reports).
    rows += sorted(tpus.items(), key=lambda row: -len(row[0]))
  for key, peaks in rows:
    if key.lower() in device_kind.lower():
      return peaks.get(dtype)
  return None


def summarize(timing: dict[str, float], batch: int, flops_per_image: float | None,
              peak_total: float | None) -> dict[str, Any]:
  """Rounded timing plus images/s and MFU."""
  ips = batch / timing["step_s_median"]
  mfu = flops_per_image * ips / peak_total if flops_per_image is not None and peak_total else None
  out = {k: round(v, 4) for k, v in timing.items()}
  out.update(batch_size=batch, images_per_s=round(ips, 4),
             s_per_image=round(1 / ips, 4),
             flops_per_image=NA if flops_per_image is None else flops_per_image,
             achieved_tflops=(NA if flops_per_image is None
                              else round(flops_per_image * ips / 1e12, 4)),
             mfu=NA if mfu is None else round(mfu, 4))
  return out


def peak_memory(device) -> int | str:
  stats = device.memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return NA
  return int(stats["peak_bytes_in_use"])


def generated_batch(rng, batch_size: int, crop: int, num_labels: int):
  """Random image [B, H, W, 3] in [-1, 1], label [B, H, W], all labels on; crop: an int
  (square) or (H, W)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  h, w = (crop, crop) if isinstance(crop, int) else crop
  return {
      "image": rng.uniform(-1, 1, (batch_size, h, w, 3)).astype(np.float32),
      "label": rng.integers(-1, num_labels, (batch_size, h, w)).astype(np.int32),
      "label_mask": np.ones((batch_size, num_labels), bool),
  }


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


# --- JAX ---


def bench_infer(state, spec, mesh, text_emb, batch_size: int, crop: int, labels: int,
                steps: int) -> dict[str, float]:
  """The shared forward (`apply.forward`, as evaluation and prediction run it) + argmax
  on [batch_size, crop, crop] generated images."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  from lseg_jax import apply as apply_lib
  from lseg_jax import sharding, state as state_lib
  from lseg_jax.data import host_to_device
  # pylint: enable=g-import-not-at-top
  if batch_size % mesh.size:
    raise ValueError(f"inference batch {batch_size} is not divisible by the {mesh.size} "
                     "devices; set --infer-batch")
  apply, params = apply_lib.model_apply(state_lib.model_from_state(state, spec.eval_graphdef))
  forward = apply_lib.forward(apply, mesh)
  rng = np.random.default_rng(1)
  batches = [host_to_device.to_global(
      {k: v for k, v in generated_batch(rng, batch_size, crop, labels).items()
       if k != "label"}, sharding.batch_sharding(mesh)) for _ in range(2)]
  return time_calls(lambda i: jax.block_until_ready(jnp.argmax(
      forward(params, batches[i % 2]["image"], text_emb, batches[i % 2]["label_mask"]),
      axis=-1)), steps)


def bench_multiscale(state, spec, text_emb, crop: int, labels: int, image_size, base_size: int,
                     steps: int) -> dict[str, Any]:
  """The official multi-scale protocol (6 scales, flip) on one [H, W] image per call."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from lseg_jax import evaluate, inference, state as state_lib
  # pylint: enable=g-import-not-at-top
  h, w = image_size
  model = state_lib.model_from_state(state, spec.eval_graphdef)
  window = inference.SlidingWindow(crop_size=crop, base_size=base_size)
  ev = evaluate.Evaluator(model, [f"label {i}" for i in range(labels)], np.asarray(text_emb),
                          episodic=False, window=window)
  rng = np.random.default_rng(2)
  batch = {**generated_batch(rng, 1, (h, w), labels), "valid": np.ones(1, bool),
           "image_size": np.array([[h, w]], np.int32)}
  windows = sum(len(inference.window_origins(
      *inference.scaled_size(h, w, s, window.base_size), crop, window.stride)[1])
                for s in window.scales) * (2 if window.flip else 1)
  timing = time_calls(lambda i: ev.update(batch), steps)  # update waits for the result
  return {**{k: round(v, 4) for k, v in timing.items()}, "image_size": [h, w],
          "windows_per_image": windows, "s_per_image": round(timing["step_s_median"], 4)}


def bench_train(state, spec, config, mesh, text_emb, labels: int, steps: int):
  """The donated train step on generated batches; returns (timing, last loss)."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from lseg_jax import sharding, train
  from lseg_jax.data import host_to_device
  # pylint: enable=g-import-not-at-top
  train.check_batch_config(config, mesh)
  train_step = train.jit_train_step(spec, config, mesh)
  rng = np.random.default_rng(0)
  per_process = config.batch_size // jax.process_count()  # each process feeds its share
  batches = [host_to_device.to_global(
      generated_batch(rng, per_process, config.data.crop_size, labels),
      sharding.batch_sharding(mesh)) for _ in range(2)]
  box = {"state": state, "metrics": None}

  def step(i):
    box["state"], box["metrics"] = train_step(box["state"], batches[i % 2], text_emb)
    jax.block_until_ready(box["metrics"])

  timing = time_calls(step, steps)
  return timing, float(box["metrics"]["loss"])


# --- PyTorch ---


def add_torch(results: dict[str, Any], args, model_cfg, platform: str, infer_batch: int,
              train_batch: int, crop: int, peak_by_dtype: Callable[[str], float | None],
              flops_of: Callable[[str], float | None]) -> None:
  """results["torch"] = {"version", "device", task: {dtype: figure}}, or {"skipped": why}.

  The figures come from `lseg_jax.torch_lseg.benchmark` in a child process: importing
  timm after TensorFlow (which the JAX side's data utilities load) crashes some installs,
  and a GPU stays shared more predictably.
  """
  dtypes = [d.strip() for d in args.torch_dtypes.split(",") if d.strip()]
  bad = [d for d in dtypes if d not in TORCH_DTYPES]
  if bad:
    raise ValueError(f"--torch-dtypes: unknown {bad}; expected some of {TORCH_DTYPES}")
  figures = [(task, dtype, infer_batch if task == "infer" else train_batch)
             for task in ("infer", "train") if task in results for dtype in dtypes]
  if not all(importlib.util.find_spec(m) for m in ("torch", "timm")):
    results["torch"] = {"skipped": "PyTorch (or timm) is not installed"}
    log(f"--torch skipped: {results['torch']['skipped']}")
    return
  job = {"model": langseg.torch_config(model_cfg), "platform": platform, "crop": crop,
         "labels": args.labels, "steps": args.steps, "figures": figures,
         "text_tower": args.torch_text_tower}
  # Run from the folder holding this lseg_jax package, so the child imports the same one.
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run(
      [sys.executable, "-m", "lseg_jax.torch_lseg.benchmark"],
      input=json.dumps(job), stdout=subprocess.PIPE, text=True, cwd=root, check=False)
  lines = proc.stdout.strip().splitlines()
  if proc.returncode or not lines:
    raise RuntimeError(f"the PyTorch benchmark process failed (exit code {proc.returncode})")
  answer = json.loads(lines[-1])
  if "skipped" in answer:
    results["torch"] = answer
    log(f"--torch skipped: {answer['skipped']}")
    return
  out = {"version": answer["version"], "device": answer["device"],
         "text_tower": args.torch_text_tower}
  for (task, dtype, batch), fig in zip(figures, answer["figures"]):
    fig.update({k: v for k, v in summarize(
        {k: fig[k] for k in ("first_step_s", "step_s_median", "step_s_min")}, batch,
        flops_of(task), peak_by_dtype(dtype)).items() if k not in fig})
    fig["jax_speedup"] = round(results[task]["images_per_s"] / fig["images_per_s"], 3)
    out.setdefault(task, {})[dtype] = fig
    log(f"  torch {task} {dtype}: {json.dumps(fig)}")
  results["torch"] = out


def add_data(results: dict[str, Any], config, process_count: int, steps: int) -> None:
  """results["data"]: this process's input pipeline rate on ADE20K-shaped data, and
  results["bound"]: "input pipeline" if it is slower than this process's share of the
  train step's images/s, else "train step"."""
  from lseg_jax.cli import benchmark_data  # pylint: disable=g-import-not-at-top
  per_process = config.batch_size // process_count
  log(f"data: batch {per_process} per process, crop {config.data.crop_size}")
  # At least 64 images timed, so that small batches are not timed by a few calls.
  data = benchmark_data.measure(batch_size=per_process,
                                num_batches=max(steps, -(-64 // per_process)),
                                crop_size=int(config.data.crop_size),
                                base_size=int(config.data.base_size),
                                num_parallel_calls=int(config.data.num_parallel_calls))
  need = results["train"]["images_per_s"] / process_count
  results["data"] = {**data, "train_images_per_s_per_process": round(need, 4)}
  results["bound"] = "input pipeline" if data["images_per_s"] < need else "train step"
  log(f"  {json.dumps(results['data'])}; bound: {results['bound']}")


# --- --aot ---
def run_aot(args, config) -> int:
  """`--aot`: the programs of --task compiled for a TPU slice; one JSON line."""
  import jax  # pylint: disable=g-import-not-at-top
  from lseg_jax import aot  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")  # the host; the TPU devices are described
  names = ("train", "eval") if args.task == "both" else (
      "eval" if args.task == "infer" else "train",)
  if args.aot_fit is not None:
    log(f"the largest train batch per chip that fits {args.aot}, from {args.aot_fit}")
    results = aot.largest_batch(args.aot, config, args.labels, args.aot_fit, log=log)
  else:
    log(f"compiling {', '.join(names)} for {args.aot} (minutes for full-size models)")
    programs = {name: aot.PROGRAMS[name] for name in names}
    results = aot.report(args.aot, config, args.labels, programs,
                         breakdown=args.aot_breakdown)
  results["date"] = datetime.date.today().isoformat()
  emit(results, args.json)
  return 0


def emit(results: dict[str, Any], path: str | None) -> None:
  """Prints the JSON line, and writes it to `path` when given."""
  line = json.dumps(results)
  print(line, flush=True)
  if path:
    with open(path, "w", encoding="utf-8") as f:
      f.write(line + "\n")


def bench_jax(results: dict[str, Any], args, config, spec, mesh, state, text_emb,
              flops_of: Callable[[str], float | None], peak: float | None) -> None:
  """Times the JAX tasks `args.task` names on `state` and records them in `results`."""
  device = mesh.devices.flat[0]
  crop = config.data.crop_size
  infer_batch = args.infer_batch or config.batch_size
  tasks = ("infer", "train") if args.task == "both" else (args.task,)
  # Inference first: the train step donates (invalidates) the state it is given.
  if "infer" in tasks:
    log(f"infer: batch {infer_batch}, {args.steps} timed steps")
    timing = bench_infer(state, spec, mesh, text_emb, infer_batch, crop, args.labels, args.steps)
    results["infer"] = {**summarize(timing, infer_batch, flops_of("infer"), peak),
                        "peak_memory_bytes": peak_memory(device)}
    log(f"  {json.dumps(results['infer'])}")
    if args.multiscale:
      h, w = (int(s) for s in args.image_size.split(","))
      log(f"infer --multiscale: one {h}x{w} image, {args.steps} timed steps")
      results["infer_multiscale"] = bench_multiscale(
          state, spec, text_emb, crop, args.labels, (h, w), int(config.data.base_size),
          args.steps)
      log(f"  {json.dumps(results['infer_multiscale'])}")
  if "train" in tasks:
    log(f"train: batch {config.batch_size}, {args.steps} timed steps")
    timing, loss = bench_train(state, spec, config, mesh, text_emb, args.labels, args.steps)
    results["train"] = {**summarize(timing, config.batch_size, flops_of("train"), peak),
                        "peak_memory_bytes": peak_memory(device), "loss": round(loss, 4)}
    log(f"  {json.dumps(results['train'])}")


def main(argv=None) -> int:
  args = common.parse(build_parser(), argv)
  if args.steps < 1:
    raise UserError(f"--steps={args.steps}; expected >= 1")
  if args.labels < 1:
    raise UserError(f"--labels={args.labels}; expected >= 1")
  if args.aot_fit is not None and not args.aot:
    raise UserError(f"--aot-fit {args.aot_fit} searches a TPU slice's batch: it needs --aot "
                    "TOPOLOGY")
  config = common.load_config(args.config, args.overrides)
  if args.aot:
    return run_aot(args, config)
  if args.torch:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  common.setup_logging()
  common.start_jax(args)  # images/s are global under tools/launch.py (process 0 prints)
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from lseg_jax import flops, sharding, state as state_lib
  # pylint: enable=g-import-not-at-top

  mesh = sharding.make_mesh(config.mesh)
  device = mesh.devices.flat[0]
  spec = state_lib.state_spec(config, mesh)
  model_cfg = spec.model_cfg
  crop = config.data.crop_size
  try:
    counted = flops.count(model_cfg, crop, crop, args.labels)
  except ValueError:  # no formula for ResNet backbones
    counted = None
  flops_of = lambda task: (None if counted is None else
                           counted.train if task == "train" else counted.forward)
  peak_by_dtype = lambda dtype: (lambda p: None if p is None else p * mesh.size)(
      peak_flops(device.device_kind, dtype))
  peak = peak_by_dtype(model_cfg.dtype)
  results: dict[str, Any] = {
      "date": datetime.date.today().isoformat(),
      "backbone": model_cfg.backbone, "dtype": model_cfg.dtype, "attention": model_cfg.attention,
      "crop_size": crop, "labels": args.labels, "task": args.task, "steps": args.steps,
      "platform": device.platform, "device_kind": device.device_kind,
      "devices": mesh.size, "mesh": dict(mesh.shape), "cpu_count": os.cpu_count(),
      "jax_version": jax.__version__,
      "peak_flops_per_device": NA if peak is None else peak / mesh.size,
      "forward_flops_per_image": NA if counted is None else counted.forward,
  }
  log(f"{model_cfg.backbone} ({model_cfg.dtype}) at {crop}x{crop}, {args.labels} labels, on "
      f"{mesh.size} x {device.device_kind} ({device.platform})")

  t0 = time.perf_counter()
  state = state_lib.init_state(spec, tuple(config.optim.frozen))()
  jax.block_until_ready(state)
  results["init_s"] = round(time.perf_counter() - t0, 2)
  rng = np.random.default_rng(0)
  text_dim = spec.abstract["frozen"]["clip_pretrained"]["text_projection"].shape[-1]
  text_emb = jax.device_put(rng.normal(size=(args.labels, text_dim)).astype(np.float32),
                            sharding.replicated(mesh))

  bench_jax(results, args, config, spec, mesh, state, text_emb, flops_of, peak)
  del state
  if args.data and "train" in results:
    add_data(results, config, jax.process_count(), args.steps)

  if args.torch:
    add_torch(results, args, model_cfg, device.platform,
              args.infer_batch or config.batch_size, config.batch_size,
              crop, peak_by_dtype, flops_of)

  if jax.process_index() == 0:
    emit(results, args.json)
  distributed.done()
  return 0


if __name__ == "__main__":
  common.entry_point(main)
