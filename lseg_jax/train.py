"""Training LSeg, top to bottom: mesh -> data -> abstract state -> shardings -> step -> loop.

`train_and_evaluate(config, workdir)` runs a config of `configs/` (see
`configs/common.py` for every field). The state lives on a ("data", "fsdp") mesh:
the batch is split over all devices, parameters and optimizer state by regex rules
(`lseg_jax.sharding`). The training step is one pure jitted function of the state
(`nnx.merge` inside), with the state donated.

The workdir holds
  checkpoints/   Orbax steps (model state, optimizer state, meta with the config,
                 label names, tokenizer and data position), async, keep-N;
  metrics.jsonl  one JSON object per logged step ("step", "train/loss", "train/lr",
                 "train/pixacc", "train/images_per_sec", "train/step_time",
                 "eval/miou", "eval/pixacc", ...);
  events.*       the same scalars for TensorBoard.
A run restarted on the same workdir resumes from the latest complete checkpoint and
continues with the same data order, giving the same losses as an uninterrupted run.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging as logging_std
import os
import signal
import threading
import time
from typing import Any, Callable

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lseg_jax import checkpoint
from lseg_jax import evaluate
from lseg_jax import init as init_lib
from lseg_jax import losses
from lseg_jax import metrics as metrics_lib
from lseg_jax import optim
from lseg_jax import sharding
from lseg_jax.convert import mapping
from lseg_jax.data import input_pipeline
from lseg_jax.models import lseg

REQUIRED_FIELDS = ("seed", "batch_size", "total_steps", "log_every_steps", "eval_every_steps",
                   "checkpoint_every_steps")
CHECKPOINT_SUBDIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
_BATCH_KEYS = ("image", "label", "label_mask")
_EVAL_KEYS = ("image", "label", "label_mask", "valid")


# ============================================================================
# Pieces of the state (also used by tools/benchmark_train.py and the tests).
# ============================================================================
@dataclasses.dataclass(frozen=True)
class StateSpec:
  """Everything known about the train state before any array exists.

  The state is a dict {"params", "frozen", "rest", "opt", "step"}: trainable
  parameters, frozen parameters (the text tower), other model variables (BatchNorm
  statistics), optimizer state and the number of optimizer steps done.
  """
  model_cfg: lseg.LSegConfig
  graphdef: Any  # train mode (batch statistics)
  eval_graphdef: Any  # eval mode (running statistics)
  abstract: dict[str, Any]  # ShapeDtypeStructs
  shardings: dict[str, Any]  # NamedShardings
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  size_multiple: int
  create: Callable[[], nnx.Module]


def model_config(config) -> lseg.LSegConfig:
  return lseg.LSegConfig.from_dict(dict(config.model))


def state_spec(config, mesh: jax.sharding.Mesh) -> StateSpec:
  """Abstract model, optimizer and their shardings, from the config (no allocation)."""
  model_cfg = model_config(config)
  create = lambda: lseg.LSeg(model_cfg, rngs=nnx.Rngs(config.seed))
  abstract_model = nnx.eval_shape(create)
  frozen = tuple(config.optim.frozen)
  graphdef, params, frozen_params, rest = optim.partition(abstract_model, frozen)
  abstract_model.eval()
  eval_graphdef = optim.partition(abstract_model, frozen)[0]
  tx, schedule = optim.make_optimizer(config.optim, params, total_steps=config.total_steps,
                                      global_batch_size=config.batch_size)
  opt = jax.eval_shape(tx.init, params)
  abstract = {"params": params, "frozen": frozen_params, "rest": rest, "opt": opt,
              "step": jax.ShapeDtypeStruct((), jnp.int32)}

  rules = sharding.check_rules(config.sharding.rules, "config.sharding.rules")
  min_size = int(config.sharding.min_size)
  repl = sharding.replicated(mesh)
  param_sh = sharding.tree_shardings(params, mesh, rules, min_size)
  # Optimizer state mirrors the parameters it belongs to; counters are replicated.
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt, param_sh,
                                 transform_non_params=lambda _: repl)
  shardings = {"params": param_sh,
               "frozen": sharding.tree_shardings(frozen_params, mesh, rules, min_size),
               "rest": sharding.tree_shardings(rest, mesh, rules, min_size),
               "opt": opt_sh, "step": repl}
  return StateSpec(model_cfg, graphdef, eval_graphdef, abstract, shardings, tx, schedule,
                   abstract_model.size_multiple, create)


def init_state(spec: StateSpec, frozen: tuple[str, ...]):
  """A jitted () -> random initial state, created directly in its shardings."""
  def init():
    _, params, frozen_params, rest = optim.partition(spec.create(), frozen)
    return {"params": params, "frozen": frozen_params, "rest": rest,
            "opt": spec.tx.init(params), "step": jnp.zeros((), jnp.int32)}
  return jax.jit(init, out_shardings=spec.shardings)


def load_weights(state, spec: StateSpec, weights: dict[str, np.ndarray]):
  """Replaces model leaves named in `weights` ({flat name: host array}) in place."""
  model_keys = ("params", "frozen", "rest")
  names = {n for k in model_keys for n in sharding.names(spec.abstract[k])}
  unknown = sorted(set(weights) - names)
  if unknown:
    raise ValueError(f"pretrained weights name {len(unknown)} paths the model does not have: "
                     f"{unknown[:20]}")

  def place(name, x, s):
    if name not in weights:
      return x
    w = np.asarray(weights[name])
    if w.shape != x.shape:
      raise ValueError(f"pretrained weight {name!r} has shape {w.shape}; the model expects "
                       f"{tuple(x.shape)}")
    return jax.device_put(w.astype(x.dtype), s)
  state = dict(state)
  for k in model_keys:
    state[k] = sharding.map_with_names(place, state[k], spec.shardings[k])
  return state


def model_state_dict(state) -> dict[str, Any]:
  """The full model state as one nested pure dict (the checkpoint's `model` item)."""
  out: dict[str, Any] = {}

  def merge(dst, src):
    for key, value in src.items():
      if isinstance(value, dict):
        merge(dst.setdefault(key, {}), value)
      else:
        assert key not in dst, key
        dst[key] = value
  for k in ("params", "frozen", "rest"):
    merge(out, state[k].to_pure_dict() if isinstance(state[k], nnx.State) else state[k])
  return out


def split_model_state(full: dict[str, Any], spec: StateSpec) -> dict[str, Any]:
  """Inverse of `model_state_dict`: {"params", "frozen", "rest"} like the spec."""
  flat = mapping.flatten_params(full)
  return {k: sharding.map_with_names(lambda name, _: flat[name], spec.abstract[k])
          for k in ("params", "frozen", "rest")}


def model_from_state(state, graphdef) -> lseg.LSeg:
  return nnx.merge(graphdef, state["params"], state["frozen"], state["rest"])


# ============================================================================
# The training step.
# ============================================================================
def make_train_step(spec: StateSpec, frozen: tuple[str, ...], accum_steps: int,
                    mesh: jax.sharding.Mesh):
  """(state, batch, text_emb [L, D]) -> (state, metrics); pure, for jax.jit.

  With accum_steps > 1 the batch is cut into micro-batches (example i goes to
  micro-batch i % accum_steps, so each device keeps its own examples), gradients and
  losses are averaged over them and BatchNorm statistics are updated once per
  micro-batch, as PyTorch Lightning's accumulate_grad_batches does.
  """
  graphdef, tx, schedule = spec.graphdef, spec.tx, spec.schedule

  def loss_fn(params, frozen_params, rest, batch, text_emb):
    model = nnx.merge(graphdef, params, frozen_params, rest)
    logits = model(batch["image"], text_emb, batch["label_mask"])
    loss, _ = losses.cross_entropy(logits, batch["label"])
    correct, valid = losses.pixel_accuracy_counts(logits, batch["label"])
    new_rest = optim.partition(model, frozen)[3]
    return loss, (new_rest, correct, valid)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch, text_emb):
    params, rest = state["params"], state["rest"]
    if accum_steps == 1:
      (loss, (rest, correct, valid)), grads = grad_fn(
          params, state["frozen"], rest, batch, text_emb)
    else:
      micro_sharding = jax.sharding.NamedSharding(mesh, sharding.P(None, sharding.BATCH_AXES))

      def to_micro(x):
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, micro_sharding)

      def body(carry, micro):
        rest, grads, loss, correct, valid = carry
        (l, (rest, c, v)), g = grad_fn(params, state["frozen"], rest, micro, text_emb)
        grads = jax.tree.map(jnp.add, grads, g)
        return (rest, grads, loss + l, correct + c, valid + v), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      init = (rest, zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
              jnp.zeros((), jnp.int32))
      (rest, grads, loss, correct, valid), _ = jax.lax.scan(
          body, init, jax.tree.map(to_micro, batch))
      grads = jax.tree.map(lambda g: g / accum_steps, grads)
      loss = loss / accum_steps

    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt = tx.update(grads, state["opt"], params)
    new = {"params": optax.apply_updates(params, updates), "frozen": state["frozen"],
           "rest": rest, "opt": opt, "step": state["step"] + 1}
    # A non-finite step leaves the state as it was; the loop then stops the run.
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = {"loss": loss, "lr": schedule(state["step"]), "grad_norm": grad_norm,
               "correct": correct, "valid": valid, "finite": finite}
    return new, metrics

  return step


def jit_train_step(spec: StateSpec, config, mesh: jax.sharding.Mesh):
  """The jitted train step with explicit shardings and the state donated.

  Returns (state, batch, text_emb) -> (state, metrics). The frozen parameters go in as
  an argument of their own that is not donated: they never change, and the label
  embedder keeps computing with them.
  """
  accum = int(config.optim.get("accum_steps", 1) or 1)
  step = make_train_step(spec, tuple(config.optim.frozen), accum, mesh)

  def step_with_frozen(state, frozen, batch, text_emb):
    new, metrics = step({**state, "frozen": frozen}, batch, text_emb)
    del new["frozen"]
    return new, metrics

  repl = sharding.replicated(mesh)
  donated = {k: v for k, v in spec.shardings.items() if k != "frozen"}
  jitted = jax.jit(
      step_with_frozen,
      in_shardings=(donated, spec.shardings["frozen"], sharding.batch_sharding(mesh), repl),
      out_shardings=(donated, repl), donate_argnums=(0,))

  def run(state, batch, text_emb):
    new, metrics = jitted({k: v for k, v in state.items() if k != "frozen"},
                          state["frozen"], batch, text_emb)
    return {**new, "frozen": state["frozen"]}, metrics
  return run


@dataclasses.dataclass
class Programs:
  """The jitted functions of one (config, mesh): built once per process and reused
  by later runs with the same settings (a resumed run in the same process, tests)."""
  spec: StateSpec
  init: Callable[[], dict[str, Any]]
  train_step: Callable[..., Any]
  eval_steps: dict[Any, Callable[..., Any]]


_PROGRAMS: collections.OrderedDict[str, Programs] = collections.OrderedDict()
_PROGRAMS_KEPT = 4


def programs(config, mesh: jax.sharding.Mesh) -> Programs:
  """The cached `Programs` of everything the compiled functions depend on."""
  key = json.dumps({
      k: (config[k].to_dict() if hasattr(config[k], "to_dict") else config[k])
      for k in ("model", "optim", "sharding", "seed", "batch_size", "total_steps")
  } | {"mesh": [list(mesh.shape.items()), [d.id for d in mesh.devices.flat]]},
                   sort_keys=True, default=str)
  if key not in _PROGRAMS:
    spec = state_spec(config, mesh)
    _PROGRAMS[key] = Programs(spec, init_state(spec, tuple(config.optim.frozen)),
                              jit_train_step(spec, config, mesh), {})
    while len(_PROGRAMS) > _PROGRAMS_KEPT:
      _PROGRAMS.popitem(last=False)
  _PROGRAMS.move_to_end(key)
  return _PROGRAMS[key]


def check_batch_config(config, mesh: jax.sharding.Mesh) -> None:
  accum = int(config.optim.get("accum_steps", 1) or 1)
  if accum < 1:
    raise ValueError(f"config.optim.accum_steps={accum}; expected >= 1")
  for name, size in (("batch_size", config.batch_size),
                     ("eval_batch_size", config.get("eval_batch_size") or config.batch_size)):
    if size % mesh.size:
      raise ValueError(f"config.{name}={size} is not divisible by the {mesh.size} devices of "
                       f"the mesh {dict(mesh.shape)}")
  if config.batch_size % (accum * mesh.size):
    raise ValueError(f"config.batch_size={config.batch_size} must be a multiple of "
                     f"accum_steps ({accum}) x devices ({mesh.size}) = {accum * mesh.size}")


# ============================================================================
# Evaluation (metrics from lseg_jax.metrics).
# ============================================================================
def make_eval_step(spec: StateSpec, num_labels: int, episodic: bool):
  """(model state, batch, text_emb) -> confusion counts of the batch (global sum)."""
  def step(model_state, batch, text_emb):
    model = model_from_state(model_state, spec.eval_graphdef)
    pred = jnp.argmax(model(batch["image"], text_emb, batch["label_mask"]), axis=-1)
    if episodic:
      bin_pred, bin_label = evaluate.episode_binary(pred, batch["label"], batch["class_index"])
      return metrics_lib.episode_confusion(bin_pred, bin_label, batch["class_index"],
                                           num_labels - 1, valid=batch["valid"])
    return metrics_lib.confusion_matrix(pred, batch["label"], num_labels, valid=batch["valid"])
  return step


class PeriodicEval:
  """Single-scale evaluation on config.data's eval split with the train state."""

  def __init__(self, config, spec: StateSpec, mesh, embed: Callable[[list[str]], Any],
               steps: dict[Any, Callable[..., Any]] | None = None):
    self.config = config
    self.spec = spec
    self.mesh = mesh
    self.embed = embed
    self._steps = {} if steps is None else steps  # (num_labels, episodic) -> jitted step
    self.batch_size = int(config.get("eval_batch_size") or config.batch_size)

  def __call__(self, state) -> dict[str, float]:
    it = input_pipeline.make_eval_iterator(self.config.data, batch_size=self.batch_size)
    labels = list(it.label_names)
    text_emb = self.embed(labels)
    model_state = {k: state[k] for k in ("params", "frozen", "rest")}
    data_sh = sharding.batch_sharding(self.mesh)
    meter, episodic = None, None
    num_batches = self.config.get("eval_num_batches")
    for batch in itertools.islice(it, num_batches):
      if episodic is None:
        episodic = "class_index" in batch
        meter = (metrics_lib.FewShotMeter(len(labels) - 1) if episodic
                 else metrics_lib.SegmentationMeter(len(labels)))
        step = self._jitted(len(labels), episodic)
      batch = evaluate.pad_batch(batch, self.spec.size_multiple)
      keys = _EVAL_KEYS + (("class_index",) if episodic else ())
      arrays = input_pipeline.to_global({k: np.asarray(batch[k]) for k in keys}, data_sh)
      conf = step(model_state, arrays, text_emb)
      if episodic:
        meter.update(conf, batch["class_index"], batch["valid"])
      else:
        meter.update(conf)
    if meter is None:
      raise ValueError("the eval split yielded no batches")
    r = meter.result()
    if episodic:
      return {"eval/miou": r["mIoU"], "eval/fbiou": r["FB-IoU"]}
    return {"eval/miou": r["mIoU"], "eval/pixacc": r["pixAcc"]}

  def _jitted(self, num_labels, episodic):
    key = (num_labels, episodic)
    if key not in self._steps:
      model_sh = {k: self.spec.shardings[k] for k in ("params", "frozen", "rest")}
      repl = sharding.replicated(self.mesh)
      self._steps[key] = jax.jit(
          make_eval_step(self.spec, num_labels, episodic),
          in_shardings=(model_sh, sharding.batch_sharding(self.mesh), repl),
          out_shardings=repl)
    return self._steps[key]


# ============================================================================
# Logging.
# ============================================================================
class MetricWriter:
  """metrics.jsonl (one object per step) and TensorBoard scalars; process 0 only."""

  def __init__(self, workdir: str, resume_step: int | None):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, METRICS_FILE)
    self._step, self._values = None, {}
    if not self.enabled:
      return
    if resume_step is not None and os.path.exists(self.path):
      # Steps after the restored checkpoint are trained again: drop their old lines.
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(kept)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._tf = tf
    self._tb = tf.summary.create_file_writer(workdir)

  def write(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    if self._step is not None and step != self._step:
      self.flush()
    self._step = step
    self._values.update(values)

  def flush(self) -> None:
    if not self.enabled or self._step is None:
      return
    record = {"step": int(self._step), **{k: float(v) for k, v in self._values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    with self._tb.as_default(step=int(self._step)):
      for k, v in self._values.items():
        self._tf.summary.scalar(k, float(v))
    self._tb.flush()
    self._step, self._values = None, {}

  def close(self) -> None:
    self.flush()
    if self.enabled:
      self._tb.close()


class TrainMeter:
  """Averages fetched step metrics over a logging interval; times the steps."""

  def __init__(self, global_batch: int):
    self.global_batch = global_batch
    self.reset()
    self._t0 = None

  def reset(self):
    self.loss, self.correct, self.valid, self.steps = 0.0, 0, 0, 0
    self.timed_steps = 0

  def add(self, m: dict[str, np.ndarray]) -> None:
    if self._t0 is None:  # the first step of a run includes compilation: not timed
      self._t0 = time.perf_counter()
    else:
      self.timed_steps += 1
    self.loss += float(m["loss"])
    self.correct += int(m["correct"])
    self.valid += int(m["valid"])
    self.steps += 1

  def exclude(self, seconds: float) -> None:
    """Time spent outside training steps (evaluation) does not count."""
    if self._t0 is not None:
      self._t0 += seconds

  def summary(self, lr: float) -> dict[str, float]:
    out = {"train/loss": self.loss / max(self.steps, 1),
           "train/pixacc": self.correct / max(self.valid, 1), "train/lr": lr}
    now = time.perf_counter()
    if self.timed_steps:
      dt = (now - self._t0) / self.timed_steps
      out.update({"train/step_time": dt, "train/images_per_sec": self.global_batch / dt})
    self._t0 = now
    self.reset()
    return out


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping after this step.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _DropLibraryInfo(logging_std.Filter):
  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
  """Keeps Orbax's per-save INFO lines out of the console (warnings still show)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())


def text_names(label_names: list[str]) -> list[str]:
  """The texts embedded for a label table: an episode table's "other" is embedded as
  "others", as lang-seg's zero-shot code (and `lseg_jax.evaluate`) do."""
  names = list(label_names)
  if names and names[0] == input_pipeline.OTHER_LABEL:
    names[0] = evaluate.EPISODE_BACKGROUND_TEXT
  return names


def _jsonable_config(config) -> dict[str, Any]:
  return json.loads(config.to_json())


def check_config(config) -> None:
  missing = [k for k in REQUIRED_FIELDS if k not in config]
  if missing:
    raise ValueError(f"config lacks required fields {missing}")
  for k in REQUIRED_FIELDS[1:]:
    value = config[k]
    if k in ("eval_every_steps", "checkpoint_every_steps", "log_every_steps") and not value:
      continue
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{k}={value!r}; expected a positive integer")


# ============================================================================
# train_and_evaluate
# ============================================================================
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates, checkpoints.

  Returns:
    {"step": last step, "preempted": bool, "train": last logged train metrics,
     "eval": last eval metrics, "state": the final train state (global arrays),
     "label_names": the train label table, "embed": label names -> [L, D] label
     embeddings from the model's text tower}.

  Raises:
    FloatingPointError: a step produced a non-finite loss or gradient; the run stops
      without saving that step (the latest checkpoint is the last good one).
  """
  check_config(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)

  # --- Mesh: every device, axes (data, fsdp). The batch is split over both axes, so
  # BatchNorm means over the batch axis are global-batch means.
  mesh = sharding.make_mesh(config.mesh)
  check_batch_config(config, mesh)
  logging.info("Mesh %s over %d devices (%s).", dict(mesh.shape), mesh.size,
               jax.devices()[0].platform)

  # --- Abstract state and shardings: shapes, dtypes and placement of every array are
  # fixed before any is allocated, so the state is created directly where it lives.
  progs = programs(config, mesh)
  spec = progs.spec

  # --- Checkpoints: resume from the latest complete step if there is one.
  ckpt_dir = os.path.join(workdir, CHECKPOINT_SUBDIR)
  mngr = checkpoint.manager(ckpt_dir, max_to_keep=config.get("keep_checkpoints", 3))
  resume_step = mngr.latest_step()
  if resume_step is None:
    state = progs.init()
    weights = init_lib.pretrained_weights(config.get("init"), nnx.eval_shape(spec.create))
    if weights:
      logging.info("Initialised %d arrays from %s.", len(weights),
                   {k: v for k, v in dict(config.init).items() if v})
      state = load_weights(state, spec, weights)
  else:
    logging.info("Resuming from %s step %d.", ckpt_dir, resume_step)
    target = {k: sharding.with_shardings(spec.abstract[k], spec.shardings[k])
              for k in spec.abstract}
    restored = checkpoint.restore(mngr, resume_step, model_state_dict(target), target["opt"])
    state = {**split_model_state(restored["model"], spec), "opt": restored["opt_state"],
             "step": jax.device_put(jnp.asarray(resume_step, jnp.int32),
                                    spec.shardings["step"])}
    state = jax.tree.map(lambda x, s: jax.device_put(x, s), state, spec.shardings)
  start_step = int(metrics_lib.to_host(state["step"]))

  # --- Label embeddings: the text tower is frozen, so each label set is embedded once
  # and the step gets an [L, D] array (the tower never runs in a step).
  from lseg_jax import text  # pylint: disable=g-import-not-at-top
  tokenizer_spec = config.text.tokenizer
  embedder = text.LabelEmbedder(model_from_state(state, spec.eval_graphdef).clip_pretrained,
                                init_lib.tokenizer(tokenizer_spec),
                                template=config.text.get("template"))
  repl = sharding.replicated(mesh)
  embed = lambda labels: jax.device_put(embedder(text_names(labels)), repl)

  # --- Data: per-host tf.data from `start_step` on (a resumed run sees the batches
  # the interrupted one would have), assembled into global arrays on the mesh.
  train_iter = input_pipeline.make_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=config.seed,
      start_step=start_step)
  label_names = list(train_iter.label_names)
  text_emb = embed(label_names)
  batches = input_pipeline.prefetch_to_device(
      ({k: b[k] for k in _BATCH_KEYS} for b in train_iter),
      int(config.get("prefetch_to_device", 2)), sharding.batch_sharding(mesh))

  # --- The jitted step: explicit in/out shardings; the old state is donated.
  train_step = progs.train_step
  periodic_eval = PeriodicEval(config, spec, mesh, embed, progs.eval_steps)

  meta = {"model_config": spec.model_cfg.to_dict(), "config": _jsonable_config(config),
          "label_names": label_names, "tokenizer": tokenizer_spec,
          "text_template": config.text.get("template"),
          "data": {"seed": config.seed, "global_batch_size": config.batch_size}}

  def save(step):
    meta["step"] = step
    meta["data"]["next_step"] = step  # the data position: batches are a function of step
    checkpoint.save(mngr, step, model_state_dict(state), meta, state["opt"])

  # --- The loop. Step metrics are fetched one step late, so the host prepares and
  # dispatches step s+1 while step s runs.
  writer = MetricWriter(workdir, resume_step)
  meter = TrainMeter(config.batch_size)
  total = int(config.total_steps)
  stop_at = config.get("stop_at_step") or total
  log_every = config.log_every_steps or total
  eval_every = config.eval_every_steps or 0
  ckpt_every = config.checkpoint_every_steps or 0
  bar = None
  if jax.process_index() == 0 and config.get("progress_bar", True):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True)
  summary: dict[str, Any] = {"train": {}, "eval": {}, "preempted": False}
  pending = None
  last_lr = 0.0

  def consume(pending):
    nonlocal last_lr
    step, m = pending
    m = jax.tree.map(metrics_lib.to_host, m)
    if not m["finite"]:
      mngr.wait_until_finished()
      raise FloatingPointError(
          f"non-finite loss or gradient at step {step} (loss={float(m['loss'])}, "
          f"grad_norm={float(m['grad_norm'])}); stopped without applying it. The last good "
          f"checkpoint is step {mngr.latest_step()} in {ckpt_dir}. Lower config.optim.base_lr "
          "or set config.optim.grad_clip_norm.")
    meter.add(m)
    last_lr = float(m["lr"])
    if bar is not None:
      bar.update(step - bar.n)
      bar.set_postfix(loss=f"{float(m['loss']):.4f}", lr=f"{last_lr:.3g}")
    if step % log_every == 0 or step == total:
      summary["train"] = meter.summary(last_lr)
      writer.write(step, summary["train"])

  step = start_step
  try:
    with _Preemption() as preemption:
      while step < min(total, stop_at):
        batch = next(batches)
        state, m = train_step(state, batch, text_emb)
        if pending is not None:
          consume(pending)
        step += 1
        pending = (step, m)
        is_last = step >= total
        stopping = preemption.requested or step >= stop_at
        if is_last or stopping or (ckpt_every and step % ckpt_every == 0):
          consume(pending)
          pending = None
          save(step)
        if ((is_last and config.get("eval_at_end", True))
            or (eval_every and step % eval_every == 0)):
          if pending is not None:
            consume(pending)
            pending = None
          t0 = time.perf_counter()
          summary["eval"] = periodic_eval(state)
          meter.exclude(time.perf_counter() - t0)
          writer.write(step, summary["eval"])
          logging.info("step %d: %s", step, summary["eval"])
          if bar is not None:
            bar.write(f"step {step}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in summary["eval"].items()))
        if stopping and not is_last:
          summary["preempted"] = True
          logging.warning("Stopped at step %d; rerun the same command to resume.", step)
          break
      if pending is not None:
        consume(pending)
  finally:
    writer.close()
    if bar is not None:
      bar.close()
    mngr.wait_until_finished()
    mngr.close()
  summary.update(step=step, state=state, label_names=label_names, embed=embed)
  return summary


__all__ = ["CHECKPOINT_SUBDIR", "METRICS_FILE", "Programs", "REQUIRED_FIELDS", "StateSpec",
           "check_batch_config", "check_config", "init_state", "jit_train_step",
           "load_weights", "make_eval_step", "make_train_step", "model_config",
           "model_from_state", "model_state_dict", "programs", "quiet_library_logs",
           "split_model_state",
           "state_spec", "text_names",
           "train_and_evaluate"]
