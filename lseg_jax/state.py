"""The train state before and after it exists: abstract spec, initialisation, weights.

The state is a dict {"params", "frozen", "rest", "opt", "step"}: trainable parameters, frozen
parameters (the text tower), other model variables (BatchNorm statistics), optimizer state and the
number of optimizer steps done. `state_spec` fixes the shapes, dtypes and shardings of every array
before any is allocated, so the state is created (or restored) directly where it lives.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lseg_jax import names
from lseg_jax import optim
from lseg_jax import sharding
from lseg_jax.models import lseg

MODEL_KEYS = ("params", "frozen", "rest")


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """Everything known about the train state (module docstring) before any array exists."""
  model_cfg: lseg.LSegConfig
  graphdef: Any  # train mode (batch statistics)
  eval_graphdef: Any  # eval mode (running statistics)
  abstract: dict[str, Any]  # ShapeDtypeStructs
  shardings: dict[str, Any]  # NamedShardings
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  size_multiple: int
  create: Callable[[], nnx.Module]


def state_spec(config, mesh: jax.sharding.Mesh) -> StateSpec:
  """Abstract model, optimizer and their shardings, from the config (no allocation)."""
  model_cfg = lseg.LSegConfig.from_dict(dict(config.model))
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

  rules = names.check_rules(config.sharding.rules, "config.sharding.rules")
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
  known = {n for k in MODEL_KEYS for n in sharding.names(spec.abstract[k])}
  unknown = sorted(set(weights) - known)
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
  for k in MODEL_KEYS:
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
  for k in MODEL_KEYS:
    merge(out, state[k].to_pure_dict() if isinstance(state[k], nnx.State) else state[k])
  return out


def split_model_state(full: dict[str, Any], spec: StateSpec) -> dict[str, Any]:
  """Inverse of `model_state_dict`: {"params", "frozen", "rest"} like the spec."""
  flat = names.flatten(full)
  return {k: sharding.map_with_names(lambda name, _: flat[name], spec.abstract[k])
          for k in MODEL_KEYS}


def model_from_state(state, graphdef) -> lseg.LSeg:
  """The model of a train state (its arrays keep their shardings)."""
  return nnx.merge(graphdef, state["params"], state["frozen"], state["rest"])


def restore(mngr, step: int, spec: StateSpec) -> dict[str, Any]:
  """The train state of checkpoint `step`, restored directly into its shardings."""
  from lseg_jax import checkpoint  # pylint: disable=g-import-not-at-top
  target = {k: sharding.with_shardings(spec.abstract[k], spec.shardings[k]) for k in spec.abstract}
  restored = checkpoint.restore(mngr, step, model_state_dict(target), target["opt"])
  state = {**split_model_state(restored["model"], spec), "opt": restored["opt_state"],
           "step": jnp.asarray(step, jnp.int32)}
  return jax.tree.map(jax.device_put, state, spec.shardings)
