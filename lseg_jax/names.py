"""Flat parameter names and the regex rules over them (JAX-free).

A parameter's flat name joins its path segments with "/": the model's attribute names, with list
indices as decimal segments ("pretrained/model/blocks/0/attn/qkv/kernel"). Sharding, optimizer,
freezing and checkpoint-conversion rules are regexes over these names, all matched here: a regex
must match the whole name (`re.fullmatch`), and of `(regex, value)` rules the first match decides.

Key paths of jax pytrees are read by duck typing (`DictKey.key`, `SequenceKey.idx`,
`GetAttrKey.name`, `FlattenedIndexKey.key`), so this module imports no JAX;
`lseg_jax.sharding` walks pytrees with it.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

SEP = "/"
# Attribute names of an NNX Variable's payload: not part of the parameter's name.
_PAYLOAD_ATTRS = ("value", "raw_value")


# --- Paths -> names ---
def key_name(key) -> str | None:
  """One path segment's name (a str or int, or a jax pytree key); None for a Variable's
  payload attribute (`.value`), which names nothing."""
  if isinstance(key, (str, int)):
    return str(key)
  if hasattr(key, "idx"):  # SequenceKey
    return str(key.idx)
  if hasattr(key, "key"):  # DictKey, FlattenedIndexKey
    return str(key.key)
  if hasattr(key, "name"):  # GetAttrKey
    return None if key.name in _PAYLOAD_ATTRS else str(key.name)
  raise TypeError(f"unsupported path segment {key!r}; expected a str, an int or a jax pytree key")


def path_name(path: Iterable[Any]) -> str:
  """A path (segments or a jax key path) -> its flat name "a/b/0/c"."""
  return SEP.join(n for n in map(key_name, path) if n is not None)


def split_name(name: str) -> tuple[str | int, ...]:
  """"a/0/b" -> ("a", 0, "b"): digit segments are list indices (no attribute name is all digits)."""
  return tuple(int(s) if s.isdigit() else s for s in name.split(SEP))


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """A nested (or flat: copied) mapping -> {flat name: leaf}: {"a": {"b": x}} -> {"a/b": x}."""
  if not isinstance(tree, Mapping):
    raise TypeError(f"expected a nested mapping of arrays, got {type(tree).__name__}")
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      name = f"{prefix}{SEP}{key}" if prefix else str(key)
      if isinstance(value, Mapping):
        walk(value, name)
      else:
        flat[name] = value

  walk(tree, "")
  return flat


# --- Regex rules over names ---
def _check_regex(pattern, what: str) -> None:
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{what}: invalid regex {pattern!r} ({e})") from None


def check_rules(rules, what: str) -> list[tuple[str, Any]]:
  """Validates `(regex, value)` pairs (None: none; a config's tuples may come back as
  lists); `what` names their origin in errors ("config.sharding.rules")."""
  out = []
  for rule in rules or ():
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"{what}: each rule must be a (regex, value) pair, got {rule!r}")
    _check_regex(rule[0], what)
    out.append((rule[0], rule[1]))
  return out


def check_patterns(patterns, what: str) -> tuple[str, ...]:
  """Validates a list of regexes (a single string is refused: it is a common slip)."""
  if isinstance(patterns, str):
    raise ValueError(f"{what} must be a list of regexes, got the single string {patterns!r}")
  for pattern in patterns or ():
    if not isinstance(pattern, str):
      raise ValueError(f"{what}: each entry must be a regex string, got {pattern!r}")
    _check_regex(pattern, what)
  return tuple(patterns or ())


def first_match(name: str, rules: Sequence[tuple[str, Any]], default: Any = None) -> Any:
  """The value of the first `(regex, value)` rule whose regex fully matches `name`."""
  for pattern, value in rules:
    if re.fullmatch(pattern, name):
      return value
  return default


def matches(name: str, patterns: Iterable[str]) -> bool:
  """Whether any regex of `patterns` fully matches `name`."""
  return any(re.fullmatch(p, name) for p in patterns)
