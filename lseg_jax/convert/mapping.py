"""One mapping table between PyTorch state dicts and Flax NNX parameters, both ways.

A `MappingTable` is a list of `Rule`s. A rule ties one flat NNX path pattern
(`"transformer/resblocks/{i}/attn/in_proj/kernel"`) to one or more torch key
patterns (`"transformer.resblocks.{i}.attn.in_proj_weight"`) through a `Hook`: a
pair of functions converting the arrays torch -> NNX and NNX -> torch. The same
table imports (`torch_to_nnx`) and exports (`nnx_to_torch`); `{name}` placeholders
match integer path segments (layer indices) and carry over between the two sides.

Everything works on numpy arrays; `langseg_layout.numpy_state_dict` turns torch
tensors into numpy without importing torch. Flat NNX paths are the project's flat
parameter names (`lseg_jax.names`); `flatten_params` also takes modules and States.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from lseg_jax import names
from lseg_jax.langseg_layout import numpy_state_dict, read_state_dict
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_MAX_LISTED = 100  # per category in a MappingError message


# --- Flat NNX paths ---
def flatten_params(tree) -> dict[str, Any]:
  """nnx.Module | nnx.State | nested or flat dict -> {"a/b/c": value} (`names.flatten`;
  Variables replaced by their arrays or `jax.ShapeDtypeStruct`s)."""
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree)
  if isinstance(tree, nnx.State):
    tree = tree.to_pure_dict()
  if not isinstance(tree, Mapping):
    raise TypeError(f"expected an nnx.Module, nnx.State or dict of arrays, got {type(tree)}")
  return {k: v.get_value() if isinstance(v, nnx.Variable) else v
          for k, v in names.flatten(tree).items()}


def find_prefix(state_dict: Mapping[str, Any], first: str, second: str, what: str) -> str:
  """The one prefix P for which `state_dict` has keys P + first and P + second (the
  module `what` inside a checkpoint); ValueError naming the prefixes found otherwise."""
  found = [k[:-len(first)] for k in state_dict
           if k.endswith(first) and k[:-len(first)] + second in state_dict]
  if len(found) != 1:
    raise ValueError(f"expected exactly one {what} (keys '<prefix>{first}' and "
                     f"'<prefix>{second}'), found prefixes {found}; first keys: "
                     f"{sorted(state_dict)[:10]}")
  return found[0]


def read_under_prefix(path_or_state_dict, prefix: str | None, find) -> tuple[dict, str]:
  """(the arrays of a file or state dict under `prefix`, the prefix); prefix None: the
  one `find(state_dict)` finds. Keys outside it (the rest of a checkpoint) are dropped."""
  state_dict = read_state_dict(path_or_state_dict)
  prefix = find(state_dict) if prefix is None else prefix
  return {k: v for k, v in state_dict.items() if k.startswith(prefix)}, prefix


def unflatten(flat: Mapping[str, Any]) -> nnx.State:
  """{"a/b/c": array} -> nested nnx.State (digit segments become list indices)."""
  return nnx.from_flat_state([(names.split_name(k), v) for k, v in sorted(flat.items())])


def update(model: nnx.Module, params) -> None:
  """Writes `params` (flat or nested dict, or State) into `model` in place, each in the
  dtype of the variable it replaces; variables not named keep their values."""
  current = flatten_params(model)
  flat = flatten_params(params)
  unknown = sorted(set(flat) - set(current))
  if unknown:
    raise ValueError(f"params name paths the model does not have: {unknown[:_MAX_LISTED]}")
  bad = [f"{k}: {np.shape(v)} vs model {current[k].shape}" for k, v in flat.items()
         if tuple(np.shape(v)) != tuple(current[k].shape)]
  if bad:
    raise ValueError(f"params do not match the model's shapes: {bad[:_MAX_LISTED]}")
  # jnp.array copies: jnp.asarray may share a numpy buffer on CPU, and a buffer taken
  # from a live torch module (`tensor.numpy()`) changes when torch updates it in place.
  nnx.update(model, unflatten({k: jnp.array(v, dtype=current[k].dtype) for k, v in flat.items()}))


# --- Hooks: array conversions that run in both directions ---
@dataclasses.dataclass(frozen=True)
class Hook:
  """to_nnx: torch arrays (one per torch key of the rule) -> the NNX array;
  to_torch: the NNX array -> torch arrays, inverse of to_nnx."""
  name: str
  to_nnx: Callable[[Sequence[np.ndarray]], np.ndarray]
  to_torch: Callable[[np.ndarray], Sequence[np.ndarray]]


def permute(axes: Sequence[int], name: str | None = None) -> Hook:
  """NNX array = torch array transposed by `axes` (one torch key)."""
  axes = tuple(axes)
  inverse = tuple(int(i) for i in np.argsort(axes))

  def to_nnx(xs):
    (x,) = xs
    if x.ndim != len(axes):
      raise ValueError(f"expected a {len(axes)}-d array, got shape {x.shape}")
    return np.transpose(x, axes)

  return Hook(name or f"permute{axes}", to_nnx, lambda x: (np.transpose(x, inverse),))


def reshape(torch_shape: Sequence[int], nnx_shape: Sequence[int]) -> Hook:
  """NNX array = torch array reshaped (one torch key), e.g. [1, C] <-> [C]."""
  torch_shape, nnx_shape = tuple(torch_shape), tuple(nnx_shape)

  def to_nnx(xs):
    (x,) = xs
    if x.shape != torch_shape:
      raise ValueError(f"expected shape {torch_shape}, got {x.shape}")
    return x.reshape(nnx_shape)

  return Hook(f"reshape{torch_shape}->{nnx_shape}", to_nnx, lambda x: (np.reshape(x, torch_shape),))


def concat(n: int, axis: int, then: Hook | None = None) -> Hook:
  """n torch arrays concatenated along `axis` (torch layout), then `then`.

  E.g. separate q, k, v Linear weights [W, W] -> one fused kernel [W, 3W]:
  `concat(3, 0, then=TRANSPOSE)`. Export splits into n equal parts.
  """
  then = then or IDENTITY

  def to_nnx(xs):
    if len(xs) != n:
      raise ValueError(f"expected {n} arrays, got {len(xs)}")
    if len({x.shape for x in xs}) != 1:
      raise ValueError(f"arrays to concatenate differ in shape: {[x.shape for x in xs]}")
    return then.to_nnx((np.concatenate(xs, axis=axis),))

  def to_torch(x):
    (y,) = then.to_torch(x)
    return tuple(np.split(y, n, axis=axis))

  return Hook(f"concat{n}@{axis}+{then.name}", to_nnx, to_torch)


IDENTITY = Hook("identity", lambda xs: xs[0], lambda x: (x,))
# nn.Linear weight [out, in] <-> nnx.Linear kernel [in, out].
TRANSPOSE = permute((1, 0), "transpose")
# nn.Conv2d weight [O, I, kH, kW] <-> nnx.Conv kernel [kH, kW, I, O].
CONV = permute((2, 3, 1, 0), "conv_oihw_hwio")
# torch counts BatchNorm batches in int64; our BatchStat is int32.
INT64 = Hook("int64", lambda xs: xs[0], lambda x: (np.asarray(x, np.int64),))


# --- Rules and tables ---
@functools.lru_cache(maxsize=None)
def _pattern_regex(pattern: str) -> re.Pattern:
  """"a/{i}/b" -> regex with a named group per placeholder; placeholders match
  digits only, so they never cross a separator."""
  parts, pos = [], 0
  for m in _PLACEHOLDER.finditer(pattern):
    parts.append(re.escape(pattern[pos:m.start()]))
    parts.append(f"(?P<{m.group(1)}>\\d+)")
    pos = m.end()
  parts.append(re.escape(pattern[pos:]))
  return re.compile("".join(parts))


@dataclasses.dataclass(frozen=True)
class Rule:
  """One NNX path pattern <-> one or more torch key patterns."""
  nnx: str  # "/"-separated, e.g. "blocks/{i}/attn/qkv/kernel"
  # "."-separated, e.g. "blocks.{i}.attn.qkv.weight"; several (fused parameters) are given
  # to the hook in this order
  torch: str | tuple[str, ...]
  hook: Hook = IDENTITY

  @property
  def torch_keys(self) -> tuple[str, ...]:
    return (self.torch,) if isinstance(self.torch, str) else tuple(self.torch)

  def __post_init__(self):
    placeholders = set(_PLACEHOLDER.findall(self.nnx))
    for key in self.torch_keys:
      if set(_PLACEHOLDER.findall(key)) != placeholders:
        raise ValueError(f"rule {self.nnx!r} <-> {key!r}: placeholders differ")


def linear(nnx_name: str, torch_name: str) -> list[Rule]:
  """nn.Linear `torch_name.{weight, bias}` <-> nnx.Linear `nnx_name/{kernel, bias}`."""
  return conv(nnx_name, torch_name, TRANSPOSE)


def conv(nnx_name: str, torch_name: str, hook: Hook = CONV) -> list[Rule]:
  """nn.Conv2d `torch_name.{weight, bias}` <-> nnx.Conv `nnx_name/{kernel, bias}`
  (`hook` converts the kernel: another one for transposed convolutions)."""
  return [Rule(f"{nnx_name}/kernel", f"{torch_name}.weight", hook),
          Rule(f"{nnx_name}/bias", f"{torch_name}.bias")]


def layer_norm(nnx_name: str, torch_name: str) -> list[Rule]:
  """nn.LayerNorm `torch_name.{weight, bias}` <-> nnx.LayerNorm `nnx_name/{scale, bias}`."""
  return [Rule(f"{nnx_name}/scale", f"{torch_name}.weight"),
          Rule(f"{nnx_name}/bias", f"{torch_name}.bias")]


def block_rules(nnx_block: str, torch_block: str, layer_norms, linears) -> list[Rule]:
  """The `layer_norm` and `linear` rules of one transformer block; each name is an NNX
  path under `nnx_block` (its torch name: "/" -> ".") or an (NNX, torch) pair."""
  def pairs(names):
    return [(n, n.replace("/", ".")) if isinstance(n, str) else n for n in names]
  return ([r for n, t in pairs(layer_norms) for r in layer_norm(nnx_block + n, torch_block + t)]
          + [r for n, t in pairs(linears) for r in linear(nnx_block + n, torch_block + t)])


def batch_norm(nnx_name: str, torch_name: str) -> list[Rule]:
  """nn.BatchNorm2d `torch_name.*` <-> `dpt.BatchNorm` `nnx_name/*`: weight, bias,
  running_mean, running_var, num_batches_tracked <-> scale, bias, mean, var,
  num_batches_tracked (int64 <-> int32)."""
  n, t = nnx_name + "/", torch_name + "."
  return [Rule(n + "scale", t + "weight"), Rule(n + "bias", t + "bias"),
          Rule(n + "mean", t + "running_mean"), Rule(n + "var", t + "running_var"),
          Rule(n + "num_batches_tracked", t + "num_batches_tracked", INT64)]


@dataclasses.dataclass(frozen=True)
class MappingTable:
  """Rules (every NNX path matches exactly one) plus the keys either side deliberately
  leaves out (regexes, full match): torch keys skipped on import, and NNX paths without
  a torch counterpart (import leaves them untouched, export leaves them out)."""
  rules: tuple[Rule, ...]
  ignore_torch: tuple[str, ...] = ()
  ignore_nnx: tuple[str, ...] = ()

  def prefixed(self, torch_prefix: str = "", nnx_prefix: str = "") -> MappingTable:
    """The same table for a submodule: keys become `torch_prefix + key`, paths
    `nnx_prefix + path` (include the separator: "clip_pretrained." / "clip_pretrained/")."""
    def tk(keys):
      return tuple(torch_prefix + k for k in keys)
    return MappingTable(
        rules=tuple(Rule(nnx_prefix + r.nnx, tk(r.torch_keys), r.hook) for r in self.rules),
        ignore_torch=tuple(re.escape(torch_prefix) + p for p in self.ignore_torch),
        ignore_nnx=tuple(re.escape(nnx_prefix) + p for p in self.ignore_nnx))

  def __add__(self, other: MappingTable) -> MappingTable:
    return MappingTable(self.rules + other.rules, self.ignore_torch + other.ignore_torch,
                        self.ignore_nnx + other.ignore_nnx)


class MappingError(ValueError):
  """A state dict that does not fit the table; lists every offending key at once."""

  def __init__(self, unknown=(), missing=(), mis_shaped=(), unmapped=()):
    self.unknown = list(unknown)
    self.missing = list(missing)
    self.mis_shaped = list(mis_shaped)
    self.unmapped = list(unmapped)
    lines = ["state dict does not match the model:"]
    for title, items in (
        ("unknown torch keys (no rule uses them)", self.unknown),
        ("missing torch keys (the model needs them)", self.missing),
        ("mis-shaped keys", self.mis_shaped),
        ("NNX params without a rule (a table bug)", self.unmapped)):
      if items:
        lines.append(f"  {len(items)} {title}:")
        lines += [f"    {x}" for x in items[:_MAX_LISTED]]
        if len(items) > _MAX_LISTED:
          lines.append(f"    ... and {len(items) - _MAX_LISTED} more")
    super().__init__("\n".join(lines))


def _rules_for(table: MappingTable, paths: Iterable[str], unmapped: list[str]):
  """(path, rule, torch keys) for each NNX path the table maps, in sorted order;
  paths it neither maps nor ignores are appended to `unmapped`."""
  for path in sorted(paths):
    if names.matches(path, table.ignore_nnx):
      continue
    rule, groups = _match_rule(table, path)
    if rule is None:
      unmapped.append(path)
      continue
    yield path, rule, [k.format(**groups) for k in rule.torch_keys]


def _match_rule(table: MappingTable, path: str):
  """-> (rule, placeholder values) for an NNX path, or (None, None)."""
  found = []
  for rule in table.rules:
    m = _pattern_regex(rule.nnx).fullmatch(path)
    if m:
      found.append((rule, m.groupdict()))
  assert len(found) <= 1, f"NNX path {path!r} matches several rules: {[r.nnx for r, _ in found]}"
  return found[0] if found else (None, None)


def torch_to_nnx(state_dict: Mapping[str, Any], table: MappingTable, abstract_state) -> nnx.State:
  """{torch key: array} -> nested nnx.State of numpy arrays filling every leaf of
  `abstract_state` (anything `flatten_params` takes; `ignore_nnx` paths aside) in its
  dtypes. MappingError lists all unknown, missing and mis-shaped keys at once."""
  state_dict = numpy_state_dict(state_dict)
  targets = flatten_params(abstract_state)
  out, used = {}, set()
  missing, mis_shaped, unmapped = [], [], []
  for path, rule, keys in _rules_for(table, targets, unmapped):
    target = targets[path]
    used.update(keys)
    absent = [k for k in keys if k not in state_dict]
    if absent:
      missing += absent
      continue
    arrays = tuple(state_dict[k] for k in keys)
    shapes = ", ".join(f"{k} {tuple(a.shape)}" for k, a in zip(keys, arrays))
    try:
      value = rule.hook.to_nnx(arrays)
    except ValueError as e:
      mis_shaped.append(f"{shapes} -> {path}: {rule.hook.name} failed ({e})")
      continue
    if tuple(value.shape) != tuple(target.shape):
      mis_shaped.append(f"{shapes} -> {path} {tuple(value.shape)}, expected {tuple(target.shape)}")
      continue
    out[path] = np.asarray(value, dtype=target.dtype)
  unknown = sorted(k for k in state_dict
                   if k not in used and not names.matches(k, table.ignore_torch))
  if unknown or missing or mis_shaped or unmapped:
    raise MappingError(unknown, sorted(missing), mis_shaped, unmapped)
  return unflatten(out)


def nnx_to_torch(params, table: MappingTable) -> dict[str, np.ndarray]:
  """Exports NNX params (module, State, nested or flat dict) to {torch key: np.ndarray}."""
  out: dict[str, np.ndarray] = {}
  unmapped = []
  flat = flatten_params(params)
  for path, rule, keys in _rules_for(table, flat, unmapped):
    arrays = rule.hook.to_torch(np.asarray(jax.device_get(flat[path])))
    assert len(arrays) == len(keys), (rule, len(arrays))
    for key, array in zip(keys, arrays):
      assert key not in out, f"torch key {key!r} produced twice"
      # Not np.ascontiguousarray: it makes 0-d arrays (BatchNorm counters) 1-d.
      out[key] = array if array.flags.c_contiguous else array.copy()
  if unmapped:
    raise MappingError(unmapped=unmapped)
  return out


def load_module(state_dict: Mapping[str, Any], table: MappingTable, model):
  """Imports `state_dict` into `model`, an nnx.Module updated in place, or a
  zero-argument factory whose module is built from the converted arrays without its
  random initialisation (then the table may not ignore NNX paths: they have no value)."""
  if isinstance(model, nnx.Module):
    update(model, torch_to_nnx(state_dict, table, model))
    return model
  abstract = nnx.eval_shape(model)
  assert not table.ignore_nnx, "build the module first: ignored NNX paths need values"
  graphdef, _ = nnx.split(abstract)
  params = torch_to_nnx(state_dict, table, abstract)
  return nnx.merge(graphdef, jax.tree.map(jnp.array, params))  # a copy, as in `update`
