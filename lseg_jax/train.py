"""Training LSeg, top to bottom: mesh -> state -> labels -> data -> step -> loop.

`train_and_evaluate(config, workdir)` runs a config of `configs/` (every field: `lseg_jax.config`).
The state lives on a ("data", "fsdp") mesh: the batch is split over all devices, parameters and
optimizer state by regex rules (`lseg_jax.sharding`). The training step is one pure jitted function
of the state (`nnx.merge` inside), with the state donated. The evaluations of `config.evals` run on
the sharded state with the same `lseg_jax.evaluate.Evaluation` objects that `tools/eval.py` uses.

The workdir holds
  checkpoints/   Orbax steps (model state, optimizer state, meta with the config,
                 label names, tokenizer and data position), async, keep-N;
  metrics.jsonl  one JSON object per logged step ("step", "train/loss", "train/lr", "train/pixacc",
                 "train/images_per_sec", "train/step_time", "eval/miou", "eval/pixacc", ...);
  events.*       the same scalars for TensorBoard.
A run restarted on the same workdir resumes from the latest complete checkpoint and
continues with the same data order, giving the same losses as an uninterrupted one.
"""
from __future__ import annotations

import time
from typing import Any

from absl import logging
from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

from lseg_jax import checkpoint
from lseg_jax import config as config_lib
from lseg_jax import distributed
from lseg_jax import evaluate
from lseg_jax import init as init_lib
from lseg_jax import labels
from lseg_jax import losses
from lseg_jax import metrics as metrics_lib
from lseg_jax import optim
from lseg_jax import sharding
from lseg_jax import state as state_lib
from lseg_jax import text
from lseg_jax import train_utils
from lseg_jax.data import input_pipeline
from lseg_jax import errors
from lseg_jax.errors import UserError
from lseg_jax.models import attention
from lseg_jax.models import lseg

METRICS_FILE = train_utils.METRICS_FILE
_BATCH_KEYS = ("image", "label", "label_mask")


# --- The training step ---
def make_train_step(spec: state_lib.StateSpec, frozen: tuple[str, ...], accum_steps: int,
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
    logits = model.half_logits(batch["image"], text_emb, batch["label_mask"])
    loss, valid, correct = losses.upsampled_loss_and_accuracy(
        logits, batch["label"], batch["label_mask"])
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


def train_step_program(spec: state_lib.StateSpec, config, mesh: jax.sharding.Mesh):
  """The jitted train step with explicit shardings and the state donated.

  (state without "frozen", frozen, batch, text_emb) -> (state without "frozen", metrics).
  The frozen parameters go in as an argument of their own that is not donated: they
  never change, and the label embedder keeps computing with them. `jit_train_step` runs
  it; `lseg_jax.aot` compiles it for TPU slices.
  """
  accum = int(config.optim.accum_steps)
  step = make_train_step(spec, tuple(config.optim.frozen), accum, mesh)

  def step_with_frozen(state, frozen, batch, text_emb):
    with attention.kernel_mesh(mesh):
      new, metrics = step({**state, "frozen": frozen}, batch, text_emb)
    del new["frozen"]
    return new, metrics

  repl = sharding.replicated(mesh)
  donated = {k: v for k, v in spec.shardings.items() if k != "frozen"}
  return jax.jit(
      step_with_frozen,
      in_shardings=(donated, spec.shardings["frozen"], sharding.batch_sharding(mesh), repl),
      out_shardings=(donated, repl), donate_argnums=(0,))


def jit_train_step(spec: state_lib.StateSpec, config, mesh: jax.sharding.Mesh):
  """(state, batch, text_emb) -> (state, metrics): `train_step_program`, compiled once."""
  jitted = train_step_program(spec, config, mesh)
  compiled = []

  def run(state, batch, text_emb):
    args = ({k: v for k, v in state.items() if k != "frozen"}, state["frozen"], batch, text_emb)
    if not compiled:  # several processes: compiled ahead, first run in step
      compiled.append(distributed.compile_in_step(jitted, *args))
    new, metrics = compiled[0](*args)
    return {**new, "frozen": state["frozen"]}, metrics
  return run


def check_batch_config(config, mesh: jax.sharding.Mesh) -> None:
  accum = int(config.optim.accum_steps)
  if accum < 1:
    raise UserError(f"config.optim.accum_steps={accum}; expected >= 1")
  for name, size in (("batch_size", config.batch_size),
                     ("eval_batch_size", config.eval_batch_size or config.batch_size)):
    if size % mesh.size:
      raise UserError(f"config.{name}={size} is not divisible by the {mesh.size} devices of "
                       f"the mesh {dict(mesh.shape)}")
  if config.batch_size % (accum * mesh.size):
    raise UserError(f"config.batch_size={config.batch_size} must be a multiple of "
                     f"accum_steps ({accum}) x devices ({mesh.size}) = {accum * mesh.size}")


def _restore(mngr, step: int, spec: state_lib.StateSpec, config):
  """(train state, meta) of checkpoint `step`, after checking it holds this config's
  model and optimizer (a ValueError names the config key that differs)."""
  meta = checkpoint.step_meta(mngr, step)
  where = f"checkpoint step {step} in {str(mngr.directory)!r}"
  fix = "use another --workdir, or train with the checkpoint's value"
  saved, now = meta.get("model_config") or {}, spec.model_cfg.to_dict()
  for key in sorted(set(saved) | set(now)):
    if key not in lseg.COMPUTE_ONLY_FIELDS and saved.get(key) != now.get(key):
      raise UserError(f"{where} holds another model: config.model.{key}="
                       f"{saved.get(key)!r} there, {now.get(key)!r} now; {fix}")
  recorded = (meta.get(checkpoint.INTEGRITY_KEY) or {}).get("opt_state")
  if recorded and set(recorded) != set(checkpoint.flat_arrays(spec.abstract["opt"])):
    saved_optim = (meta.get("config") or {}).get("optim") or {}
    optim_now = config_lib.to_json_dict(config)["optim"]
    differ = [k for k in sorted(saved_optim) if k in optim_now and optim_now[k] != saved_optim[k]]
    raise UserError(f"{where} holds another optimizer state"
                     + (f" (config.optim.{differ[0]}={saved_optim[differ[0]]!r} there, "
                        f"{config.optim[differ[0]]!r} now)" if differ else "") + f"; {fix}")
  return state_lib.restore(mngr, step, spec), meta


def _divergence_message(step: int, m, last_good: int | None, ckpt_dir: str, base_lr: float) -> str:
  """What went wrong at a non-finite step, and how to go on."""
  what = (f"non-finite loss or gradient at step {step} (loss={float(m['loss'])}, "
          f"grad_norm={float(m['grad_norm'])}); stopped without applying it.")
  fix = (f"a lower learning rate (e.g. --config.optim.base_lr={base_lr / 10:g}, now "
         f"{base_lr:g}) or gradient clipping (--config.optim.grad_clip_norm=1.0)")
  if last_good is None:
    return (f"{what} No checkpoint was written (the run diverged before its first "
            f"checkpoint); restart from scratch with {fix}.")
  return f"{what} The last good checkpoint is step {last_good} in {ckpt_dir}. Rerun with {fix}."


# --- train_and_evaluate ---
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates, checkpoints.

  Returns:
    {"step": last step, "preempted": bool (stopped before total_steps: SIGTERM, SIGINT or
     stop_at_step), "terminated": bool (by SIGTERM or SIGINT), "interrupted": bool (by SIGINT,
     Ctrl-C), "checkpoint_dir": where checkpoints are saved, "train": last logged train metrics,
     "eval": last eval metrics, "state": the final train state (global arrays), "label_names":
     the train label table, "embed": label names -> [L, D] label embeddings from the model's text
     tower}.

  Raises:
    errors.NonFiniteError (a FloatingPointError): a step produced a non-finite loss or
      gradient; the run stops without saving that step (the latest checkpoint is the last good one).
  """
  config = config_lib.complete(config)
  config_lib.check_config(config)

  # --- Mesh: every device of every process, axes (data, fsdp). The batch is split
  # over both axes, so BatchNorm means over the batch axis are global-batch means.
  mesh = sharding.make_mesh(config.mesh)
  check_batch_config(config, mesh)
  logging.info("Mesh %s over %d devices (%s), %d processes.", dict(mesh.shape), mesh.size,
               jax.devices()[0].platform, jax.process_count())
  # Paths go through epath (Orbax's path layer): the workdir may be gs://...
  workdir = str(checkpoint.absolute(workdir))
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)

  # --- Abstract state and shardings: shapes, dtypes and placement of every array are
  # fixed before any is allocated, so the state is created directly where it lives.
  spec = state_lib.state_spec(config, mesh)
  if config.data.crop_size % spec.size_multiple:
    raise UserError(
        f"config.data.crop_size={config.data.crop_size} is not a multiple of the model's "
        f"size multiple {spec.size_multiple}; expected e.g. "
        f"{max(1, round(config.data.crop_size / spec.size_multiple)) * spec.size_multiple}")

  # --- Checkpoints: resume from the latest complete step if there is one.
  ckpt_dir = str(epath.Path(workdir) / checkpoint.CHECKPOINT_SUBDIR)
  mngr = checkpoint.manager(ckpt_dir, max_to_keep=config.keep_checkpoints)
  # A damaged newest step (checksum mismatch, partial or empty folder) is moved aside
  # and the run resumes from the newest intact one.
  resume_step, restored = checkpoint.restore_newest_intact(
      mngr, lambda step: _restore(mngr, step, spec, config),
      move_damaged=True)  # process 0 renames; every process syncs and reloads
  state, resumed_meta = restored or (None, {})
  if resume_step is None:
    state = state_lib.init_state(spec, tuple(config.optim.frozen))()
    weights = init_lib.pretrained_weights(config.init, nnx.eval_shape(spec.create))
    if weights:
      logging.info("Initialised %d arrays from %s.", len(weights),
                   {k: v for k, v in dict(config.init).items() if v})
      state = state_lib.load_weights(state, spec, weights)
  else:
    logging.info("Resuming from %s step %d.", ckpt_dir, resume_step)
  start_step = int(metrics_lib.to_host(state["step"]))

  # --- Label embeddings: the text tower is frozen, so each label set is embedded once
  # and the step gets an [L, D] array (the tower never runs in a step).
  embedder = text.LabelEmbedder(
      state_lib.model_from_state(state, spec.eval_graphdef).clip_pretrained,
      text.load_tokenizer(config.text.tokenizer), template=config.text.template)
  repl = sharding.replicated(mesh)
  embed = lambda names: jax.device_put(embedder(names), repl)

  # --- Data: per-host tf.data from `start_step` on (a resumed run sees the batches
  # the interrupted one would have), assembled into global arrays on the mesh.
  train_iter = input_pipeline.make_train_iterator(
      config.data, global_batch_size=config.batch_size, seed=config.seed,
      start_step=start_step)
  label_names = list(train_iter.label_names)
  text_emb = embed(labels.text_names(label_names, train_iter.episodic))
  batches = input_pipeline.prefetch_to_device(
      ({k: b[k] for k in _BATCH_KEYS} for b in train_iter),
      config.prefetch_to_device, sharding.batch_sharding(mesh))

  # --- The jitted step: explicit in/out shardings; the old state is donated.
  train_step = jit_train_step(spec, config, mesh)
  evals = evaluate.Evaluation.from_config(config)

  meta = {"model_config": spec.model_cfg.to_dict(),
          "config": config_lib.to_json_dict(config),
          "label_names": label_names, "tokenizer": config.text.tokenizer,
          "text_template": config.text.template,
          "data": {"seed": config.seed, "global_batch_size": config.batch_size}}

  def save(step):
    meta["step"] = step
    meta["data"]["next_step"] = step  # the data position: batches are a function of step
    meta["train_meter"] = meter.sums()  # a resumed run logs the same averages
    checkpoint.save(mngr, step, state_lib.model_state_dict(state), meta, state["opt"])

  # --- The loop. Step metrics are fetched one step late, so the host prepares and
  # dispatches step s+1 while step s runs.
  writer = train_utils.MetricWriter(workdir, resume_step)
  meter = train_utils.TrainMeter(config.batch_size, resumed_meta.get("train_meter"))
  total = config.total_steps
  stop_at = config.stop_at_step or total
  bar = None
  if jax.process_index() == 0 and config.progress_bar:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True)
  summary: dict[str, Any] = {"train": {}, "eval": {}, "preempted": False,
                             "terminated": False, "interrupted": False,
                             "checkpoint_dir": ckpt_dir}
  pending = []  # [(step, device metrics)] not yet fetched: at most one

  def flush():
    """Fetches the pending step's metrics: the one place they reach the host."""
    while pending:
      step, m = pending.pop()
      m = jax.tree.map(metrics_lib.to_host, m)
      if not m["finite"]:
        mngr.wait_until_finished()
        raise errors.NonFiniteError(_divergence_message(
            step, m, mngr.latest_step(), ckpt_dir, config.optim.base_lr))
      meter.add(m)
      lr = float(m["lr"])
      if bar is not None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{float(m['loss']):.4f}", lr=f"{lr:.3g}")
      if train_utils.due(step, config.log_every_steps, total):
        summary["train"] = meter.summary(lr)
        writer.write(step, summary["train"])

  def run_evals(step, due_evals):
    t0 = time.perf_counter()
    model = state_lib.model_from_state(state, spec.eval_graphdef)
    for ev in due_evals:
      scalars = ev.scalars(ev.run(model, embed, mesh=mesh))
      summary["eval"].update(scalars)
      writer.write(step, scalars)
      logging.info("step %d: %s", step, scalars)
      if bar is not None:
        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
    meter.exclude(time.perf_counter() - t0)

  step = start_step
  try:
    with train_utils.Preemption() as preemption:
      while step < min(total, stop_at):
        state, m = train_step(state, next(batches), text_emb)
        flush()
        step += 1
        pending.append((step, m))
        is_last = step >= total
        stopping = preemption.reached(step) or step >= stop_at
        save_now = is_last or stopping or train_utils.due(step, config.checkpoint_every_steps)
        due_evals = [ev for ev in evals if train_utils.due(step, ev.every_steps)
                     or (is_last and ev.at_end)]
        if save_now or due_evals:
          flush()
        if due_evals:
          run_evals(step, due_evals)
        if save_now:
          # The step's metrics (train and eval) reach metrics.jsonl before its
          # checkpoint exists: a run killed before the checkpoint commits redoes the
          # step and its evaluations, one killed after finds them in the file.
          writer.flush()
          save(step)
        if stopping and not is_last:
          summary["preempted"] = True
          summary["terminated"] = preemption.requested
          summary["interrupted"] = preemption.interrupted
          if not preemption.interrupted:  # the tool reports a Ctrl-C in one line
            logging.warning("Stopped at step %d; rerun the same command to resume.", step)
          break
      flush()
  finally:
    writer.close()
    if bar is not None:
      bar.close()
    mngr.wait_until_finished()
    mngr.close()
  summary.update(step=step, state=state, label_names=label_names, embed=embed)
  return summary
