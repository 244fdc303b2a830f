"""Orbax checkpoints: the one place that knows the on-disk layout.

Layout, atomicity and integrity rules: docs/training.md, "Checkpoints".
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable
import zlib

from absl import logging

from etils import epath
from flax import nnx
import jax
import numpy as np
import orbax.checkpoint as ocp

from lseg_jax import errors
from lseg_jax import names
from lseg_jax.errors import MissingFileError, UserError
from lseg_jax.models import lseg

# A training work directory keeps its checkpoints here.
CHECKPOINT_SUBDIR = "checkpoints"
INTEGRITY_KEY = "integrity"
DAMAGED_SUFFIX = ".damaged"


class DamagedCheckpointError(UserError):
  """A checkpoint step that cannot be read back as it was written."""


def flat_arrays(tree) -> dict[str, Any]:
  """{"a/b/0": leaf} of any pytree (nested dicts, optax states)."""
  return {names.path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def checksums(tree, *, check_finite: str | None = None) -> dict[str, str | None]:
  """{flat name: CRC-32 hex} of every array this process holds completely (None for
  an array sharded over processes).

  check_finite: raise errors.NonFiniteError (a FloatingPointError), naming the array
  and `check_finite` (what is being saved), if a floating-point array holds NaN or Inf.
  """
  out: dict[str, str | None] = {}
  held = {}  # the arrays this process holds whole, fetched to the host in one call
  for name, x in flat_arrays(tree).items():
    out[name] = None  # named (the set of arrays is checked); summed below if held
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        # Sharded over processes: no checksum, but the finiteness check is global (a
        # collective every process runs, so every process gives the same answer).
        if check_finite and jax.numpy.issubdtype(x.dtype, jax.numpy.inexact):
          _refuse_non_finite(check_finite, name, int(_count_non_finite(x)))
        continue
      x = x.addressable_data(0)  # replicated: every process holds the same copy
    held[name] = x
  for name, a in zip(held, jax.device_get(list(held.values()))):
    a = np.ascontiguousarray(a)
    if check_finite and jax.numpy.issubdtype(a.dtype, jax.numpy.inexact):
      _refuse_non_finite(check_finite, name, int(np.size(a) - np.count_nonzero(np.isfinite(a))))
    out[name] = f"{zlib.crc32(a.tobytes()) & 0xffffffff:08x}"
  return out


def _refuse_non_finite(what: str, name: str, bad: int) -> None:
  if bad:
    raise errors.NonFiniteError(f"{what}: array {name!r} has {bad} NaN/Inf values; not saved")


@jax.jit
def _count_non_finite(x):
  return jax.numpy.sum(~jax.numpy.isfinite(x))


def verify(restored: dict[str, Any], meta: dict[str, Any], where: str) -> None:
  """Raises DamagedCheckpointError if a restored item's arrays differ from the checksums
  recorded at save time (checkpoints written before checksums existed pass)."""
  integrity = meta.get(INTEGRITY_KEY) if isinstance(meta, dict) else None
  if not integrity:
    return
  for item in ("model", "opt_state"):
    expected = integrity.get(item)
    if item not in restored or not expected:
      continue
    for name, crc in checksums(restored[item]).items():
      if crc is not None and expected.get(name) is not None and expected[name] != crc:
        raise DamagedCheckpointError(
            f"{where} is damaged: array {item}/{name} differs from the checksum recorded "
            "when it was saved")


def absolute(directory) -> epath.Path:
  """`directory` as an absolute epath.Path (remote paths are absolute already)."""
  path = epath.Path(directory)
  return path if path.is_absolute() else path.absolute()


def resolve_directory(directory: str) -> str:
  """A checkpoint directory, given it or a training work directory that holds one."""
  directory = absolute(directory)
  sub = directory / CHECKPOINT_SUBDIR
  if sub.is_dir() and not any(p.name.isdigit() for p in directory.iterdir()):
    return str(sub)
  return str(directory)


def manager(directory: str, *, max_to_keep: int | None = 3,
            async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` (created unless read_only).

  read_only: for loading; the manager never saves, deletes or creates anything.
  Orbax's own read-only mode is not used: it warns on every open.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else max_to_keep,
      enable_async_checkpointing=async_save and not read_only, create=not read_only)
  return ocp.CheckpointManager(absolute(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, model_state: Any, meta: dict[str, Any],
         opt_state: Any = None, *, force: bool = True, check_finite: bool = True) -> bool:
  """Saves one step. `model_state` is `nnx.state(model)` or its pure dict.

  Records the arrays' checksums in the meta; raises FloatingPointError (nothing saved) if any
  floating-point array is not finite (unless check_finite=False: imports, which warn instead).
  """
  if isinstance(model_state, nnx.State):
    model_state = model_state.to_pure_dict()
  where = f"checkpoint step {step}"
  integrity = {"algorithm": "crc32", "model": checksums(
      model_state, check_finite=check_finite and f"{where}: the model")}
  if opt_state is not None:
    integrity["opt_state"] = checksums(
        opt_state, check_finite=check_finite and f"{where}: the optimizer state")
  meta = {**meta, INTEGRITY_KEY: integrity}
  items = dict(model=ocp.args.StandardSave(model_state), meta=ocp.args.JsonSave(meta))
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def read_meta(directory: str, step: int | None = None) -> dict[str, Any]:
  """The `meta` JSON of `step` (default: the newest step whose meta is readable)."""
  return _read_step(directory, step, step_meta)


def _read_step(directory: str, step: int | None, read: Callable[[Any, int], Any]):
  """read(manager, step) of `step` in a checkpoint or work directory; without a step, of
  the newest intact one (damaged newer ones are skipped with a warning)."""
  directory = resolve_directory(directory)
  mngr = manager(directory, read_only=True)
  if step is not None:
    if step not in mngr.all_steps():
      raise FileNotFoundError(f"checkpoint step {step} not in {directory!r}; "
                              f"available steps: {sorted(mngr.all_steps())}")
    return read(mngr, step)
  if mngr.latest_step() is None:
    raise MissingFileError(f"no complete checkpoint found in {directory!r}; expected a directory "
                           "written by tools/train.py or tools/convert.py import")
  return restore_newest_intact(mngr, lambda s: read(mngr, s))[1]


def _where(mngr, step) -> str:
  return f"checkpoint step {step} in {os.fspath(mngr.directory)!r}"


def _damaged(mngr, step, e: Exception) -> DamagedCheckpointError:
  if isinstance(e, DamagedCheckpointError):
    return e
  detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
  return DamagedCheckpointError(f"{_where(mngr, step)} cannot be read (empty, partial or "
                                f"damaged step folder: {detail})")


def step_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The `meta` JSON of `step`; DamagedCheckpointError if it cannot be read."""
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # pylint: disable=broad-except
    raise _damaged(mngr, step, e) from e
  if not isinstance(meta, dict):
    raise DamagedCheckpointError(f"{_where(mngr, step)} has unreadable metadata")
  return meta


def restore_newest_intact(mngr: ocp.CheckpointManager, restore_step: Callable[[int], Any],
                          *, move_damaged: bool = False) -> tuple[int | None, Any]:
  """(step, restore_step(step)) for the newest step that restores without a
  DamagedCheckpointError, warning about each damaged one; (None, None) without steps.

  move_damaged: rename damaged step folders to STEP.damaged (Orbax ignores them), so
  that a resumed run can save those steps again.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  damaged = []
  for step in steps:
    try:
      result = restore_step(step)
    except DamagedCheckpointError as e:
      logging.warning("%s; trying the previous step.", e)
      damaged.append(step)
      continue
    if damaged:
      logging.warning("Using step %d, the newest intact checkpoint in %s (damaged: %s).",
                      step, os.fspath(mngr.directory), damaged)
      if move_damaged:
        _move_aside(mngr, damaged)
    return step, result
  if steps:
    raise DamagedCheckpointError(
        f"every checkpoint in {os.fspath(mngr.directory)!r} is damaged (steps {steps}); "
        "move the folder aside to start again, or restore it from a copy")
  return None, None


def _move_aside(mngr, steps) -> None:
  """Renames damaged step folders (process 0; every process waits, then reloads)."""
  if jax.process_index() == 0:
    for step in steps:
      src = epath.Path(mngr.directory) / str(step)
      if src.is_dir():
        dst = src.parent / f"{src.name}{DAMAGED_SUFFIX}"
        n = 1
        while dst.exists():
          dst, n = src.parent / f"{src.name}{DAMAGED_SUFFIX}{n}", n + 1
        src.rename(dst)
        logging.warning("Moved the damaged step folder %s to %s.", src, dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("lseg_jax checkpoint moved aside")
  mngr.reload()


def restore(mngr: ocp.CheckpointManager, step: int, abstract_model_state: Any,
            abstract_opt_state: Any = None) -> dict[str, Any]:
  """Restores `model` (and `opt_state` if an abstract one is given) into the shardings
  of the abstract (`jax.ShapeDtypeStruct`) trees, plus `meta`; verifies the checksums
  (DamagedCheckpointError naming the array)."""
  if isinstance(abstract_model_state, nnx.State):
    abstract_model_state = abstract_model_state.to_pure_dict()
  items = dict(model=ocp.args.StandardRestore(abstract_model_state), meta=ocp.args.JsonRestore())
  if abstract_opt_state is not None:
    items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
  return _restore_verified(mngr, step, items)


def _restore_verified(mngr, step: int, items: dict[str, Any], meta=None) -> dict[str, Any]:
  """The restored `items` of `step`, checked against the checksums of `meta` (default:
  the restored meta); DamagedCheckpointError if unreadable or different."""
  try:
    restored = dict(mngr.restore(step, args=ocp.args.Composite(**items)))
  except Exception as e:  # pylint: disable=broad-except
    raise _damaged(mngr, step, e) from e
  verify(restored, restored["meta"] if meta is None else meta, _where(mngr, step))
  return restored


def abstract_model(model_config: lseg.LSegConfig) -> nnx.Module:
  """An LSeg model whose arrays are `jax.ShapeDtypeStruct`s (nothing allocated)."""
  return nnx.eval_shape(lambda: lseg.LSeg(model_config, rngs=nnx.Rngs(0)))


def load_model(directory: str, step: int | None = None,
               **config_overrides) -> tuple[lseg.LSeg, dict[str, Any]]:
  """(LSeg model in eval mode, meta) of `step` in `directory` (as `read_meta`);
  `config_overrides` change compute-only fields (e.g. dtype="bfloat16")."""
  return _read_step(directory, step, lambda m, s: _load_step(m, s, config_overrides))


def _load_step(mngr, step, config_overrides):
  meta = step_meta(mngr, step)
  if "model_config" not in meta:
    raise DamagedCheckpointError(f"{_where(mngr, step)} has no model_config in its meta")
  cfg = lseg.LSegConfig.from_dict({**meta["model_config"], **config_overrides})
  model = abstract_model(cfg)
  graphdef, state = nnx.split(model)
  pure = state.to_pure_dict()
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), pure)
  restored = _restore_verified(mngr, step, {"model": ocp.args.StandardRestore(target)}, meta)
  nnx.replace_by_pure_dict(state, restored["model"])
  model = nnx.merge(graphdef, state)
  model.eval()
  return model, meta


def save_model(directory: str, model: lseg.LSeg, *, step: int = 0,
               extra_meta: dict[str, Any] | None = None, check_finite: bool = True) -> None:
  """Writes `model` as a one-step checkpoint directory that `load_model` reads."""
  mngr = manager(directory, max_to_keep=None, async_save=False)
  meta = {"model_config": model.cfg.to_dict(), **(extra_meta or {})}
  save(mngr, step, nnx.state(model), meta, check_finite=check_finite)
  mngr.wait_until_finished()
  mngr.close()


def write_dir_atomically(out_dir: str, write: Callable[[str], Any]) -> None:
  """Runs write(tmp_dir) on a temporary directory next to `out_dir`, then renames it
  to `out_dir`: a failure leaves `out_dir` as it was."""
  out_dir = os.path.abspath(out_dir)
  parent, name = os.path.split(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-")
  old = None
  try:
    write(tmp)
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(dir=parent, prefix=f".{name}.old-")
      os.rename(out_dir, os.path.join(old, name))
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and not os.path.exists(out_dir):
      os.rename(os.path.join(old, name), out_dir)
    raise
  finally:
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
