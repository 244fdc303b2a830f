"""Run configs: the library's defaults, in one place, under a config file's values.

A config file of `configs/` is plain data: `get_config(arg)` returns a ConfigDict
holding only what the experiment sets. `complete(config)` lays it over `defaults()`
(every field the library reads, at the paper's values where it has them), refuses
fields the library does not know, and returns a locked config; the training loop, the
evaluator and the tools then read `config.key` directly. Fields:

  seed, batch_size (global, per optimizer step), eval_batch_size (None: batch_size),
  total_steps, log_every_steps, eval_every_steps, checkpoint_every_steps (0: only at
  the end), keep_checkpoints, stop_at_step (None; stop there with a checkpoint, as on
  SIGTERM), eval_num_batches (None: the whole eval split), eval_at_end, progress_bar,
  prefetch_to_device;
  model     `lseg_jax.models.lseg.LSegConfig` fields;
  data      `lseg_jax.data.input_pipeline.default_data_config()` fields;
  optim     `lseg_jax.optim.default_optim_config()` fields (the paper's recipe);
  mesh      {"data": -1, "fsdp": 1}: device mesh sizes (-1: the remaining devices);
  sharding  rules [(regex, "fsdp" | "replicate" | spec)] and min_size, see
            `lseg_jax.sharding`;
  init      checkpoint / timm_vit / torchvision_resnet / clip: paths, or names, Hub ids or
            URLs (`lseg_jax.weights`), see `lseg_jax.init`;
  text      tokenizer (a CLIP tokenizer folder, a Hugging Face Hub id, an official CLIP
            name such as "ViT-B/32" (`lseg_jax.text.load_tokenizer`), or "byte-level")
            and template (None: bare label names, as LSeg);
  evals     {name: evaluation} run during training and by `tools/eval.py`; each
            evaluation may set `data` (fields laid over `config.data`, e.g. another
            split, fold or dataset), `every_steps`, `batch_size`, `num_batches` and
            `at_end`; unset ones follow eval_every_steps, eval_batch_size,
            eval_num_batches and eval_at_end. Empty: one evaluation "val" of
            config.data's eval split.
"""
from __future__ import annotations

import ast
import difflib
import json
from typing import Any, Iterable

import ml_collections
from ml_collections import config_dict

from lseg_jax import text
from lseg_jax.errors import UserError
from lseg_jax.models import lseg

# Fields whose value is a free-form mapping (not checked against defaults).
_OPEN_FIELDS = ("data.source_kwargs", "evals")
REQUIRED_FIELDS = ("seed", "batch_size", "total_steps", "log_every_steps", "eval_every_steps",
                   "checkpoint_every_steps")
EVAL_FIELDS = ("data", "every_steps", "batch_size", "num_batches", "at_end")


def defaults() -> ml_collections.ConfigDict:
  """Every field the library reads, at its default."""
  # pylint: disable=g-import-not-at-top
  from lseg_jax import optim
  from lseg_jax import sharding
  from lseg_jax.data import input_pipeline
  # pylint: enable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 16
  c.eval_batch_size = config_dict.placeholder(int)
  c.total_steps = 1000
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.stop_at_step = config_dict.placeholder(int)
  c.eval_num_batches = config_dict.placeholder(int)
  c.eval_at_end = True
  c.progress_bar = True
  c.prefetch_to_device = 2

  c.model = ml_collections.ConfigDict(lseg.LSegConfig().to_dict())
  c.model.features = config_dict.placeholder(int)
  c.model.text_vocab_size = config_dict.placeholder(int)
  c.data = input_pipeline.default_data_config()
  c.data.data_dir = config_dict.placeholder(str)
  c.data.fold = config_dict.placeholder(int)
  c.data.shot = config_dict.placeholder(int)
  c.data.eval_pad_to = config_dict.placeholder(tuple)
  c.optim = optim.default_optim_config()
  c.optim.grad_clip_norm = config_dict.placeholder(float)
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  c.sharding = ml_collections.ConfigDict(dict(
      rules=sharding.DEFAULT_RULES, min_size=sharding.DEFAULT_MIN_SIZE))
  c.init = ml_collections.ConfigDict(dict(
      checkpoint=config_dict.placeholder(str), timm_vit=config_dict.placeholder(str),
      torchvision_resnet=config_dict.placeholder(str),
      clip=config_dict.placeholder(str)))
  c.text = ml_collections.ConfigDict(dict(
      tokenizer=text.DEFAULT_TOKENIZER, template=config_dict.placeholder(str)))
  c.evals = ml_collections.ConfigDict()
  return c


def _as_dict(x) -> Any:
  return x.to_dict() if isinstance(x, ml_collections.ConfigDict) else x


def _fit(value, default):
  """`value` in the type of `default` (JSON turns tuples into lists)."""
  if isinstance(default, tuple) and isinstance(value, list):
    return tuple(tuple(v) if isinstance(v, list) else v for v in value)
  if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value


def _unknown(path: str, key: str, known: Iterable[str]) -> UserError:
  close = difflib.get_close_matches(key, list(known), n=3)
  hint = f"; did you mean {' or '.join(close)}?" if close else ""
  return UserError(f"unknown config field {path + key!r}{hint} (known fields of "
                    f"{path.rstrip('.') or 'the config'}: {', '.join(sorted(known))})")


def _overlay(dst: ml_collections.ConfigDict, src, path: str) -> None:
  for key, value in dict(src).items():
    full = path + key
    if full in _OPEN_FIELDS or any(full.startswith(f + ".") for f in _OPEN_FIELDS):
      dst[key] = _as_dict(value) if full == "data.source_kwargs" else value
      continue
    if key not in dst:
      raise _unknown(path, key, dst.keys())
    if isinstance(dst[key], ml_collections.ConfigDict):
      if not isinstance(value, (dict, ml_collections.ConfigDict)):
        raise UserError(f"config field {full!r} is a group of fields; got {value!r}")
      _overlay(dst[key], value, full + ".")
    else:
      try:
        dst[key] = _fit(_as_dict(value), dst[key])
      except TypeError as e:
        raise UserError(f"config field {full!r}={value!r}: {e}") from None


def complete(config) -> ml_collections.ConfigDict:
  """`config` (a ConfigDict or dict, e.g. a checkpoint's saved config) laid over
  `defaults()`; unknown fields raise UserError naming them. Returns a locked copy."""
  out = defaults()
  user = json.loads(config.to_json()) if isinstance(config, ml_collections.ConfigDict) else config
  _overlay(out, user, "")
  for name, ev in dict(out.evals).items():
    ev = dict(_as_dict(ev))
    unknown = sorted(set(ev) - set(EVAL_FIELDS))
    if unknown:
      raise _unknown(f"evals.{name}.", unknown[0], EVAL_FIELDS)
    _overlay(out.data.copy_and_resolve_references(), ev.get("data") or {},
             f"evals.{name}.data.")
  if out.text.tokenizer == text.BYTE_LEVEL_TOKENIZER and out.model.text_vocab_size is None:
    out.model.text_vocab_size = text.BYTE_LEVEL_VOCAB_SIZE
  out.lock()
  return out


def evals(config) -> dict[str, ml_collections.ConfigDict]:
  """The evaluations of a completed config: {name: {data, every_steps, batch_size,
  num_batches, at_end}}, each eval's `data` laid over `config.data`; the default "val"
  (config.data's eval split) when the config declares none."""
  declared = dict(config.evals) or {"val": {}}
  out = {}
  for name, ev in declared.items():
    ev = dict(_as_dict(ev))
    data = config.data.copy_and_resolve_references()
    data.unlock()
    _overlay(data, ev.get("data") or {}, f"evals.{name}.data.")
    batch_size = ev.get("batch_size") or config.eval_batch_size or config.batch_size
    out[name] = ml_collections.ConfigDict(dict(
        data=data, every_steps=ev.get("every_steps", config.eval_every_steps),
        batch_size=batch_size, num_batches=ev.get("num_batches", config.eval_num_batches),
        at_end=ev.get("at_end", config.eval_at_end)))
  return out


def parse_value(raw: str, current=None):
  """A command-line string as the type of the field it replaces (a Python literal,
  else the string)."""
  if isinstance(current, str):
    return raw
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  if raw in ("None", "none", "null"):
    return None
  if isinstance(current, bool) and isinstance(value, str):
    if value.lower() in ("true", "false"):
      return value.lower() == "true"
  return value


def override(config: ml_collections.ConfigDict, assignments: Iterable[tuple[str, str]]
             ) -> ml_collections.ConfigDict:
  """Applies ("a.b", "value") command-line overrides to a completed config.

  Values are parsed as Python literals (strings where the field is a string); the
  field must exist. Returns the config (locked).
  """
  assignments = list(assignments)
  if not assignments:
    return config
  with config.unlocked():
    for key, value_text in assignments:
      *parents, leaf = key.split(".")
      node, path = config, ""
      for p in parents:
        if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
          raise _unknown(path, p, node.keys())
        node, path = node[p], path + p + "."
      if leaf not in node:
        raise _unknown(path, leaf, node.keys())
      current = node[leaf]
      try:
        node[leaf] = _fit(parse_value(value_text, current), current)
      except TypeError as e:
        raise UserError(f"--config.{key}={value_text}: {e}") from None
  return config


# Allowed values of the fields a user sets: (check, what is expected). A None value is
# allowed only where the default is None (the field is optional).
def _int(lo=None):
  return (lambda v: isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo),
          "an integer" + (f" >= {lo}" if lo is not None else ""))


def _float(lo=None, hi=None, lo_open=False, hi_open=False):
  def ok(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (
        float("inf"), float("-inf")):
      return False
    return ((lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi)))
  lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
  hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
  return ok, "a finite number" + (" " if lo_s or hi_s else "") + " and ".join(
      x for x in (lo_s, hi_s) if x)


def _bool():
  return (lambda v: isinstance(v, bool)), "True or False"


def _one_of(*choices):
  return (lambda v: not isinstance(v, bool) and v in choices), "one of " + ", ".join(repr(c) for c in choices)


def _range_pair():
  ok = _float(0, lo_open=True)[0]
  return (lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and ok(v[0]) and ok(v[1])
          and v[0] <= v[1]), "a pair (low, high) with 0 < low <= high"


_OPTIONAL = ("eval_batch_size", "stop_at_step", "eval_num_batches", "keep_checkpoints",
             "optim.lr_scale_batch", "optim.grad_clip_norm", "data.fold", "data.shot",
             "model.features", "model.text_vocab_size")
CHECKS = {
    "seed": _int(0),
    "batch_size": _int(1),
    "eval_batch_size": _int(1),
    "total_steps": _int(1),
    "log_every_steps": _int(0),
    "eval_every_steps": _int(0),
    "checkpoint_every_steps": _int(0),
    # 0 would delete every checkpoint, the trained model included; None keeps all.
    "keep_checkpoints": _int(1),
    "stop_at_step": _int(1),
    "eval_num_batches": _int(1),
    "eval_at_end": _bool(),
    "progress_bar": _bool(),
    "prefetch_to_device": _int(1),
    "optim.base_lr": _float(0, lo_open=True),
    "optim.lr_scale_batch": _float(0, lo_open=True),
    "optim.momentum": _float(0, 1, hi_open=True),
    "optim.nesterov": _bool(),
    "optim.weight_decay": _float(0),
    "optim.power": _float(0),
    "optim.end_lr": _float(0),
    "optim.warmup_steps": _int(0),
    "optim.grad_clip_norm": _float(0, lo_open=True),
    "optim.accum_steps": _int(1),
    "data.crop_size": _int(1),
    "data.base_size": _int(1),
    "data.scale_range": _range_pair(),
    "data.flip": _bool(),
    "data.shuffle_buffer": _int(1),
    "data.prefetch": _int(-1),
    "data.fold": _int(0),
    "data.shot": _int(0),
    "data.on_bad_example": _one_of("error", "skip"),
    "model.features": _int(1),
    "model.block_depth": _int(0),
    **{f"model.{name}": _one_of(*choices) for name, choices in lseg.FIELD_CHOICES.items()},
    "model.text_vocab_size": _int(1),
}


def _get(config, key):
  node = config
  for part in key.split("."):
    if part not in node:
      return KeyError
    node = node[part]
  return node


def _check(name: str, value, check, expected: str) -> None:
  if not check(value):
    raise UserError(f"config.{name}={value!r}; expected {expected} "
                     f"(set it with --config.{name}=VALUE or in the config file)")


def check_config(config) -> None:
  """Raises UserError naming the first field whose value is outside its allowed range.

  Runs before any work starts (the tools call it on the completed config)."""
  missing = [k for k in REQUIRED_FIELDS if k not in config]
  if missing:
    raise UserError(f"config lacks required fields {missing}")
  for name, (check, expected) in CHECKS.items():
    value = _get(config, name)
    if value is KeyError or (value is None and name in _OPTIONAL):
      continue
    _check(name, value, check, expected)
  if config.data.num_parallel_calls != -1:
    _check("data.num_parallel_calls", config.data.num_parallel_calls, _int(1)[0],
           "-1 (automatic) or an integer >= 1")
  if config.stop_at_step is not None and config.stop_at_step > config.total_steps:
    raise UserError(f"config.stop_at_step={config.stop_at_step} is after "
                     f"config.total_steps={config.total_steps}; expected at most total_steps")
  if config.optim.warmup_steps >= config.total_steps and config.optim.warmup_steps:
    raise UserError(f"config.optim.warmup_steps={config.optim.warmup_steps}; expected fewer "
                     f"than config.total_steps={config.total_steps}")
  for name, ev in dict(config.evals).items():
    ev = dict(_as_dict(ev))
    for field, (check, expected) in (("every_steps", _int(0)), ("batch_size", _int(1)),
                                     ("num_batches", _int(1)), ("at_end", _bool())):
      if ev.get(field) is not None:
        _check(f"evals.{name}.{field}", ev[field], check, expected)


def to_json_dict(config) -> dict[str, Any]:
  """The config as JSON-able nested dicts (a checkpoint's `meta["config"]`)."""
  return json.loads(config.to_json())


__all__ = ["CHECKS", "EVAL_FIELDS", "REQUIRED_FIELDS",
           "check_config", "complete", "defaults", "evals", "override", "parse_value",
           "to_json_dict"]
