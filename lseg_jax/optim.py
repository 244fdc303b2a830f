"""The paper's optimizer as optax, driven by regex rules over flat parameter names.

lang-seg's recipe and the torch-SGD parity: docs/training.md, "The optimizer".
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from flax import nnx
import jax
import ml_collections
import optax

from lseg_jax import fields
from lseg_jax import names
from lseg_jax import sharding

PAPER_BASE_LR = 0.004
PAPER_BATCH = 16  # base_lr is given for this global batch and scaled linearly


# The paper's recipe; configs override fields.
FIELDS = {
    "base_lr": fields.number(PAPER_BASE_LR, 0, lo_open=True),
    # lr = base_lr * global_batch / this; None: no scaling
    "lr_scale_batch": fields.number(PAPER_BATCH, 0, lo_open=True, optional=True),
    "momentum": fields.number(0.9, 0, 1, hi_open=True),
    "nesterov": fields.boolean(False),
    "weight_decay": fields.number(1e-4, 0),
    "power": fields.number(0.9, 0),
    "end_lr": fields.number(0.0, 0),
    "warmup_steps": fields.integer(0, 0),
    "lr_mults": fields.free((("scratch/.*", 10.0),)),
    "frozen": fields.free(("clip_pretrained/.*",)),
    "no_decay": fields.free(()),
    "grad_clip_norm": fields.number(None, 0, lo_open=True),  # None: no clipping
    # micro-batches per optimizer step (see train.make_train_step)
    "accum_steps": fields.integer(1, 1),
}


def default_optim_config() -> ml_collections.ConfigDict:
  return fields.config_dict_of(FIELDS)


def complete_optim_config(optim_cfg) -> ml_collections.ConfigDict:
  """`optim_cfg` (a mapping, possibly partial) over `default_optim_config()`."""
  out = default_optim_config()
  unknown = sorted(set(dict(optim_cfg)) - set(out))
  if unknown:
    raise ValueError(f"config.optim has unknown fields {unknown}; expected some of {sorted(out)}")
  for key, value in dict(optim_cfg).items():
    out[key] = value
  return out


# --- Which parameters are trained ---
def trainable_filter(frozen: Sequence[str]) -> Callable[[tuple, Any], bool]:
  """An NNX filter: parameters whose flat name matches no `frozen` regex."""
  frozen = names.check_patterns(frozen, "optim.frozen")

  def is_trainable(path, x):
    return isinstance(x, nnx.Param) and not names.matches(names.path_name(path), frozen)
  return is_trainable


def partition(model: nnx.Module, frozen: Sequence[str]):
  """model -> (graphdef, trainable params, frozen params, the rest: BatchNorm statistics),
  pure and disjoint; `nnx.merge(graphdef, params, frozen_params, rest)` rebuilds it."""
  graphdef, params, frozen_params, rest = nnx.split(model, trainable_filter(frozen), nnx.Param, ...)
  return graphdef, nnx.pure(params), nnx.pure(frozen_params), nnx.pure(rest)


# --- Learning rate ---
def base_learning_rate(optim_cfg, global_batch_size: int) -> float:
  """The configured base lr, scaled by global_batch / lr_scale_batch (lang-seg)."""
  optim_cfg = complete_optim_config(optim_cfg)
  ref = optim_cfg.lr_scale_batch
  return float(optim_cfg.base_lr) * (global_batch_size / float(ref) if ref else 1.0)


def lr_schedule(base_lr: float, total_steps: int, *, power: float = 0.9,
                warmup_steps: int = 0, end_lr: float = 0.0) -> optax.Schedule:
  """Optional linear warmup, then base_lr * (1 - t / T) ** power down to end_lr."""
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps}; expected >= 1")
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"warmup_steps={warmup_steps}; expected 0 <= warmup_steps < "
                     f"total_steps={total_steps}")
  decay = optax.polynomial_schedule(base_lr, end_lr, power, total_steps - warmup_steps)
  if not warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def lr_multipliers(params, rules) -> Any:
  """A tree like `params` of floats: the first matching `(regex, mult)` rule, else 1."""
  rules = names.check_rules(rules, "optim.lr_mults")
  for pattern, mult in rules:
    if not isinstance(mult, (int, float)) or mult <= 0:
      raise ValueError(f"optim.lr_mults: multiplier of {pattern!r} is {mult!r}; expected a "
                       "number > 0 (freeze parameters with optim.frozen instead of 0)")
  return sharding.map_with_names(lambda name, _: float(names.first_match(name, rules, 1.0)), params)


def decay_mask(params, no_decay: Sequence[str]) -> Any:
  """A tree like `params` of bools: True where weight decay applies."""
  no_decay = names.check_patterns(no_decay, "optim.no_decay")
  return sharding.map_with_names(lambda name, _: not names.matches(name, no_decay), params)


def scale_by_tree(factors) -> optax.GradientTransformation:
  """Multiplies each update by its factor in `factors` (a tree like the params)."""
  return optax.stateless(lambda updates, _: jax.tree.map(lambda u, f: u * f, updates, factors))


# --- The optimizer ---
def make_optimizer(optim_cfg, params, *, total_steps: int, global_batch_size: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(SGD with momentum, torch-style weight decay, poly decay and lr multipliers, the
  schedule of the base lr reaching end_lr at `total_steps`) for the trainable `params`
  (arrays or ShapeDtypeStructs: names and structure only)."""
  optim_cfg = complete_optim_config(optim_cfg)
  schedule = lr_schedule(
      base_learning_rate(optim_cfg, global_batch_size), total_steps,
      power=float(optim_cfg.power), warmup_steps=int(optim_cfg.warmup_steps),
      end_lr=float(optim_cfg.end_lr))
  parts = []
  clip = optim_cfg.grad_clip_norm
  if clip:
    parts.append(optax.clip_by_global_norm(float(clip)))
  if optim_cfg.weight_decay:
    parts.append(optax.add_decayed_weights(
        float(optim_cfg.weight_decay), mask=decay_mask(params, optim_cfg.no_decay)))
  parts.append(optax.trace(decay=float(optim_cfg.momentum), nesterov=bool(optim_cfg.nesterov)))
  parts.append(optax.scale_by_learning_rate(schedule))
  mults = lr_multipliers(params, optim_cfg.lr_mults)
  if any(m != 1.0 for m in jax.tree.leaves(mults)):
    parts.append(scale_by_tree(mults))
  return optax.chain(*parts), schedule
