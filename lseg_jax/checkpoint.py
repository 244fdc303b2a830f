"""Orbax checkpoints: the one place that knows the on-disk layout.

A checkpoint directory is an Orbax `CheckpointManager` root with one folder per step.
Each step holds the items
  model:     the model state (parameters and BatchNorm statistics) as a pure pytree,
  meta:      JSON with `model_config` (LSegConfig.to_dict()) and free-form extras
             (training config, data position, label names, ...),
  opt_state: optional optimizer state (training checkpoints only).
Everything that loads a model (prediction, evaluation, fine-tuning, export) calls
`load_model`, whichever tool wrote the directory (training or `tools/convert.py import`).
Orbax writes each step to a temporary folder and renames it when complete, so a run
killed mid-save leaves the previous step as the latest complete one. In a
multi-process job every process takes part in saving and restoring (each writes its
own shards; process 0 writes the metadata). Paths go through `etils.epath`, Orbax's
own path layer, so a directory may be remote (gs://...).
"""
from __future__ import annotations

from typing import Any

from etils import epath
from flax import nnx
import jax
import orbax.checkpoint as ocp

from lseg_jax.models import lseg

# A training work directory keeps its checkpoints here.
CHECKPOINT_SUBDIR = "checkpoints"


def absolute(directory) -> epath.Path:
  """`directory` as an absolute epath.Path (remote paths are absolute already)."""
  path = epath.Path(directory)
  return path if path.is_absolute() else path.absolute()


def resolve_directory(directory: str) -> str:
  """A checkpoint directory, given it or a training work directory that holds one."""
  directory = absolute(directory)
  sub = directory / CHECKPOINT_SUBDIR
  if sub.is_dir() and not _has_steps(directory):
    return str(sub)
  return str(directory)


def _has_steps(directory: epath.Path) -> bool:
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def manager(directory: str, *, max_to_keep: int | None = 3,
            async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` (created unless read_only).

  read_only: for loading; the manager never saves, deletes or creates anything.
  Orbax's own read-only mode is not used: it warns on every open.
  """
  directory = absolute(directory)
  if read_only:
    options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=False,
                                           create=False)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(directory, options=options)


def save(mngr: ocp.CheckpointManager, step: int, model_state: Any, meta: dict[str, Any],
         opt_state: Any = None, *, force: bool = True) -> bool:
  """Saves one step. `model_state` is `nnx.state(model)` or its pure dict."""
  if isinstance(model_state, nnx.State):
    model_state = model_state.to_pure_dict()
  items = dict(model=ocp.args.StandardSave(model_state), meta=ocp.args.JsonSave(meta))
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def read_meta(directory: str, step: int | None = None) -> dict[str, Any]:
  """The `meta` JSON of `step` (default: the latest complete step)."""
  directory = resolve_directory(directory)
  mngr = manager(directory, read_only=True)
  step = _resolve_step(mngr, directory, step)
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _resolve_step(mngr, directory, step):
  if step is None:
    step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint found in {directory!r}; expected a directory "
                            "written by tools/train.py or tools/convert.py import")
  if step not in mngr.all_steps():
    raise FileNotFoundError(f"checkpoint step {step} not in {directory!r}; "
                            f"available steps: {sorted(mngr.all_steps())}")
  return step


def restore(mngr: ocp.CheckpointManager, step: int, abstract_model_state: Any,
            abstract_opt_state: Any = None) -> dict[str, Any]:
  """Restores `model` (and `opt_state` if an abstract one is given) into the shardings
  of the abstract (`jax.ShapeDtypeStruct`) trees, plus `meta`."""
  if isinstance(abstract_model_state, nnx.State):
    abstract_model_state = abstract_model_state.to_pure_dict()
  items = dict(model=ocp.args.StandardRestore(abstract_model_state),
               meta=ocp.args.JsonRestore())
  if abstract_opt_state is not None:
    items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
  return dict(mngr.restore(step, args=ocp.args.Composite(**items)))


def abstract_model(model_config: lseg.LSegConfig) -> nnx.Module:
  """An LSeg model whose arrays are `jax.ShapeDtypeStruct`s (nothing allocated)."""
  return nnx.eval_shape(lambda: lseg.LSeg(model_config, rngs=nnx.Rngs(0)))


def load_model(directory: str, step: int | None = None,
               **config_overrides) -> tuple[lseg.LSeg, dict[str, Any]]:
  """Builds the LSeg model stored in `directory` and loads its weights.

  `config_overrides` change compute-only fields (e.g. dtype="bfloat16",
  attention="cudnn"). `directory` may also be a training work directory.
  Returns (model in eval mode, meta).
  """
  directory = resolve_directory(directory)
  mngr = manager(directory, read_only=True)
  step = _resolve_step(mngr, directory, step)
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  if "model_config" not in meta:
    raise ValueError(f"checkpoint {directory!r} step {step} has no model_config in its meta")
  cfg = lseg.LSegConfig.from_dict({**meta["model_config"], **config_overrides})
  model = abstract_model(cfg)
  graphdef, state = nnx.split(model)
  pure = state.to_pure_dict()
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0])),
      pure)
  restored = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))
  nnx.replace_by_pure_dict(state, restored["model"])
  model = nnx.merge(graphdef, state)
  model.eval()
  return model, meta


def save_model(directory: str, model: lseg.LSeg, *, step: int = 0,
               extra_meta: dict[str, Any] | None = None) -> None:
  """Writes `model` as a one-step checkpoint directory that `load_model` reads."""
  mngr = manager(directory, max_to_keep=None, async_save=False)
  meta = {"model_config": model.cfg.to_dict(), **(extra_meta or {})}
  save(mngr, step, nnx.state(model), meta)
  mngr.wait_until_finished()
  mngr.close()
