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
  init      checkpoint / timm_vit / torchvision_resnet / clip paths, see `lseg_jax.init`;
  text      tokenizer (a CLIP tokenizer folder, a Hugging Face name, or "byte-level")
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

CLIP_TOKENIZER = "openai/clip-vit-base-patch32"
BYTE_LEVEL_TOKENIZER = "byte-level"
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
  from lseg_jax.models import lseg
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
      tokenizer=CLIP_TOKENIZER, template=config_dict.placeholder(str)))
  c.evals = ml_collections.ConfigDict()
  return c


def _as_dict(x) -> Any:
  return x.to_dict() if isinstance(x, ml_collections.ConfigDict) else x


def _fit(value, default, path: str):
  """`value` in the type of `default` (JSON turns tuples into lists)."""
  if isinstance(default, tuple) and isinstance(value, list):
    return tuple(tuple(v) if isinstance(v, list) else v for v in value)
  if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  del path
  return value


def _unknown(path: str, key: str, known: Iterable[str]) -> ValueError:
  close = difflib.get_close_matches(key, list(known), n=3)
  hint = f"; did you mean {' or '.join(close)}?" if close else ""
  return ValueError(f"unknown config field {path + key!r}{hint} (known fields of "
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
        raise ValueError(f"config field {full!r} is a group of fields; got {value!r}")
      _overlay(dst[key], value, full + ".")
    else:
      try:
        dst[key] = _fit(_as_dict(value), dst[key], full)
      except TypeError as e:
        raise ValueError(f"config field {full!r}={value!r}: {e}") from None


def complete(config) -> ml_collections.ConfigDict:
  """`config` (a ConfigDict or dict, e.g. a checkpoint's saved config) laid over
  `defaults()`; unknown fields raise ValueError naming them. Returns a locked copy."""
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
  if out.text.tokenizer == BYTE_LEVEL_TOKENIZER and out.model.text_vocab_size is None:
    from lseg_jax import text  # pylint: disable=g-import-not-at-top
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


def parse_value(text: str, current=None):
  """A command-line string as the type of the field it replaces (a Python literal,
  else the string)."""
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if text in ("None", "none", "null"):
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
    for key, text in assignments:
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
        node[leaf] = _fit(parse_value(text, current), current, key)
      except TypeError as e:
        raise ValueError(f"--config.{key}={text}: {e}") from None
  return config


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


def to_json_dict(config) -> dict[str, Any]:
  """The config as JSON-able nested dicts (a checkpoint's `meta["config"]`)."""
  return json.loads(config.to_json())


__all__ = ["BYTE_LEVEL_TOKENIZER", "CLIP_TOKENIZER", "EVAL_FIELDS", "REQUIRED_FIELDS",
           "check_config", "complete", "defaults", "evals", "override", "parse_value",
           "to_json_dict"]
