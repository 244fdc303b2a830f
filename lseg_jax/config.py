"""Run configs: the library's defaults, in one place, under a config file's values.

A config file of `configs/` is plain data: `get_config(arg)` returns a ConfigDict holding only what
the experiment sets. `complete(config)` lays it over `defaults()` (every field the library reads, at
the paper's values where it has them), refuses fields the library does not know, and returns a
locked config; the training loop, the evaluator and the tools then read `config.key` directly. Every
field is declared once, with its default and allowed values (`lseg_jax.fields`), from which
`defaults()` and `check_config()` derive. Fields:

  seed, batch_size, ...: `TOP_FIELDS` below;
  model     `lseg_jax.models.lseg.LSegConfig` fields;
  data      `lseg_jax.data.input_pipeline.FIELDS`;
  optim     `lseg_jax.optim.FIELDS` (the paper's recipe);
  mesh      {"data": -1, "fsdp": 1}: device mesh sizes (-1: the remaining devices);
  sharding  rules [(regex, "fsdp" | "replicate" | spec)] and min_size, see `lseg_jax.sharding`;
  init      checkpoint / timm_vit / torchvision_resnet / clip weights (`lseg_jax.init`);
  text      tokenizer (`lseg_jax.text.load_tokenizer`) and template (None: bare label
            names, as LSeg);
  evals     {name: evaluation} run during training and by `tools/eval.py`; each
            evaluation may set `data` (fields laid over `config.data`, e.g. another split, fold or
            dataset), `every_steps`, `batch_size`, `num_batches` and `at_end`; unset ones follow
            eval_every_steps, eval_batch_size, eval_num_batches and eval_at_end. Empty: one
            evaluation "val" of config.data's eval split.
"""
from __future__ import annotations

import ast
import difflib
import json
from typing import Any, Iterable

import ml_collections

from lseg_jax import fields
from lseg_jax import text
from lseg_jax.errors import UserError
from lseg_jax.models import lseg

# Fields whose value is a free-form mapping (not checked against defaults).
_OPEN_FIELDS = ("data.source_kwargs", "evals")
REQUIRED_FIELDS = ("seed", "batch_size", "total_steps", "log_every_steps", "eval_every_steps",
                   "checkpoint_every_steps")
TOP_FIELDS = {
    "seed": fields.integer(0, 0),
    "batch_size": fields.integer(16, 1),  # global, per optimizer step
    "eval_batch_size": fields.integer(None, 1),  # None: batch_size
    "total_steps": fields.integer(1000, 1),
    "log_every_steps": fields.integer(50, 0),
    "eval_every_steps": fields.integer(1000, 0),
    "checkpoint_every_steps": fields.integer(1000, 0),  # 0: only at the end
    # 0 would delete every checkpoint, the trained model included; None keeps all.
    "keep_checkpoints": fields.integer(3, 1, optional=True),
    "stop_at_step": fields.integer(None, 1),  # stop there with a checkpoint, as on SIGTERM
    "eval_num_batches": fields.integer(None, 1),  # None: the whole eval split
    "eval_at_end": fields.boolean(True),
    "progress_bar": fields.boolean(True),
    "prefetch_to_device": fields.integer(2, 1),
}
EVAL_SPECS = {"every_steps": fields.integer(None, 0), "batch_size": fields.integer(None, 1),
              "num_batches": fields.integer(None, 1), "at_end": fields.boolean(None)}
EVAL_FIELDS = ("data", *EVAL_SPECS)


def _group_fields() -> dict[str, dict[str, fields.Field]]:
  # pylint: disable=g-import-not-at-top
  from lseg_jax import optim
  from lseg_jax import sharding
  from lseg_jax.data import input_pipeline
  # pylint: enable=g-import-not-at-top
  free = fields.free
  return {
      "model": lseg.FIELDS, "data": input_pipeline.FIELDS, "optim": optim.FIELDS,
      "mesh": {"data": free(-1), "fsdp": free(1)},
      "sharding": {"rules": free(sharding.DEFAULT_RULES),
                   "min_size": free(sharding.DEFAULT_MIN_SIZE)},
      "init": {k: free(None, str) for k in ("checkpoint", "timm_vit", "torchvision_resnet",
                                            "clip")},
      "text": {"tokenizer": free(text.DEFAULT_TOKENIZER), "template": free(None, str)},
  }


def all_fields() -> dict[str, fields.Field]:
  """Every declared field by its dotted name ("seed", "optim.base_lr", ...)."""
  out = dict(TOP_FIELDS)
  for group, specs in _group_fields().items():
    out.update({f"{group}.{name}": f for name, f in specs.items()})
  return out


def defaults() -> ml_collections.ConfigDict:
  """Every field the library reads, at its default."""
  c = fields.config_dict_of(TOP_FIELDS)
  for group, specs in _group_fields().items():
    c[group] = fields.config_dict_of(specs)
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
    _overlay(out.data.copy_and_resolve_references(), ev.get("data") or {}, f"evals.{name}.data.")
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


def _get(config, key):
  node = config
  for part in key.split("."):
    if part not in node:
      return KeyError
    node = node[part]
  return node


def _check(name: str, value, spec: fields.Field) -> None:
  if not spec.allows(value):
    raise UserError(f"config.{name}={value!r}; expected {spec.expected} "
                     f"(set it with --config.{name}=VALUE or in the config file)")


def check_config(config) -> None:
  """Raises UserError naming the first field whose value is outside its allowed range.

  Runs before any work starts (the tools call it on the completed config)."""
  missing = [k for k in REQUIRED_FIELDS if k not in config]
  if missing:
    raise UserError(f"config lacks required fields {missing}")
  for name, spec in all_fields().items():
    value = _get(config, name)
    if value is not KeyError:
      _check(name, value, spec)
  if config.stop_at_step is not None and config.stop_at_step > config.total_steps:
    raise UserError(f"config.stop_at_step={config.stop_at_step} is after "
                     f"config.total_steps={config.total_steps}; expected at most total_steps")
  if config.optim.warmup_steps >= config.total_steps and config.optim.warmup_steps:
    raise UserError(f"config.optim.warmup_steps={config.optim.warmup_steps}; expected fewer "
                     f"than config.total_steps={config.total_steps}")
  for name, ev in dict(config.evals).items():
    ev = dict(_as_dict(ev))
    for field, spec in EVAL_SPECS.items():
      if ev.get(field) is not None:
        _check(f"evals.{name}.{field}", ev[field], spec)


def to_json_dict(config) -> dict[str, Any]:
  """The config as JSON-able nested dicts (a checkpoint's `meta["config"]`)."""
  return json.loads(config.to_json())
