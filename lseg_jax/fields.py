"""Config field declarations: each field's default, type and allowed values, once.

Each group declares its fields where it lives (`config.TOP_FIELDS`, `optim.FIELDS`,
`data.input_pipeline.FIELDS`, the dataclass fields of `models.lseg.LSegConfig`); the run
config's defaults and checks (`lseg_jax.config`), LSegConfig's validation and the tools'
argument choices are derived from them. JAX-free.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import ml_collections
from ml_collections import config_dict


@dataclasses.dataclass(frozen=True)
class Field:
  """`default`; `type` (what a None default stands for); `ok(value)` and `expected`, the
  allowed values in words (`ok` None: free-form); `optional`: None is allowed too;
  `choices`: the values of a field that takes one of a few."""
  default: Any
  type: type | None = None
  ok: Callable[[Any], bool] | None = None
  expected: str = ""
  optional: bool = False
  choices: tuple | None = None

  def allows(self, value) -> bool:
    return self.ok is None or (value is None and self.optional) or self.ok(value)

  def dataclass_field(self):
    """As a dataclass field whose metadata holds this declaration."""
    return dataclasses.field(default=self.default, metadata={"spec": self})


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def free(default, type_=None) -> Field:
  return Field(default, type_ or type(default))


def integer(default, lo=None, *, optional=False) -> Field:
  return Field(default, int, lambda v: _is_int(v) and (lo is None or v >= lo),
               "an integer" + (f" >= {lo}" if lo is not None else ""), optional or default is None)


def number(default, lo=None, hi=None, *, lo_open=False, hi_open=False, optional=False) -> Field:
  def ok(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return False
    return ((lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi)))
  bounds = [f"{'>' if lo_open else '>='} {lo}"] if lo is not None else []
  bounds += [f"{'<' if hi_open else '<='} {hi}"] if hi is not None else []
  return Field(default, float, ok, " ".join(["a finite number", " and ".join(bounds)]).strip(),
               optional or default is None)


def boolean(default) -> Field:
  return Field(default, bool, lambda v: isinstance(v, bool), "True or False")


def one_of(default, choices) -> Field:
  choices = tuple(choices)
  return Field(default, type(default), lambda v: not isinstance(v, bool) and v in choices,
               "one of " + ", ".join(repr(c) for c in choices), choices=choices)


def range_pair(default) -> Field:
  ok = number(None, 0, lo_open=True).ok
  return Field(default, tuple, lambda v: isinstance(v, (tuple, list)) and len(v) == 2
               and ok(v[0]) and ok(v[1]) and v[0] <= v[1],
               "a pair (low, high) with 0 < low <= high")


def config_dict_of(fields: dict[str, Field]) -> ml_collections.ConfigDict:
  """The fields at their defaults (a None default as a placeholder of the field's type)."""
  return ml_collections.ConfigDict({
      name: config_dict.placeholder(f.type) if f.default is None else f.default
      for name, f in fields.items()})
