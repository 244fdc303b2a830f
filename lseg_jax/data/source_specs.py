"""Source specs: how a data config becomes sources and one label table.

A data config names one registered source, or a mixture (`name == "mix"`) of several.
`source_specs` reads which sources, splits, weights and factory arguments that means and
`is_episodic` whether they are zero-shot episode sources (the registry records it), both
without building anything; `build_components` builds the sources and places each source's own
labels in the union table that batches index.

Label tables: a fixed-label source contributes its `label_names`; an episodic source
["other", *class_names] (mask value 1 of an episode stands for its class); a mixture the union
of its components' tables, in order of first appearance.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow as tf

from lseg_jax.data import registry
from lseg_jax.labels import IGNORE_INDEX, OTHER_LABEL

MIX = "mix"  # The data config name of a mixture.


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One source of a data config, not built yet.

  Attributes:
    name: registered source name.
    split: the split to read.
    weight: sampling weight within a mixture (1.0 for a single source).
    kwargs: keyword arguments for the source's factory.
  """
  name: str
  split: str
  weight: float
  kwargs: dict[str, Any]


def source_specs(data_cfg, eval_split: bool = False) -> list[SourceSpec]:
  """The sources of a single-source or mixture data config.

  Args:
    data_cfg: data ConfigDict (`input_pipeline.default_data_config()` fields).
    eval_split: read `eval_split` instead of `split`.

  Returns:
    One SourceSpec per source. A mixture entry {"name", "weight", ["split", "eval_split",]
    **kwargs} passes its kwargs to its factory; data_dir, fold and shot default to the
    config's when set.
  """
  split_key, other_split_key = ("eval_split", "split") if eval_split else ("split", "eval_split")
  defaults = {key: data_cfg[key] for key in ("data_dir", "fold", "shot")
              if data_cfg.get(key) is not None}
  if data_cfg.name != MIX:
    kwargs = dict(defaults, **dict(data_cfg.source_kwargs or {}))
    return [SourceSpec(data_cfg.name, data_cfg[split_key], 1.0, kwargs)]
  specs = []
  for item in _mixture_entries(data_cfg):
    weight = float(item.pop("weight", 1.0))
    if weight <= 0:
      raise ValueError(f"Mixture weight of {item['name']!r} is {weight}; expected > 0.")
    split = item.pop(split_key, data_cfg[split_key])
    item.pop(other_split_key, None)
    specs.append(SourceSpec(item.pop("name"), split, weight, dict(defaults, **item)))
  return specs


def _mixture_entries(data_cfg) -> list[dict[str, Any]]:
  """The mixture's entries as dicts, each with a "name"."""
  if not data_cfg["mixture"]:
    raise ValueError(f"data_cfg.name={MIX!r} needs a non-empty data_cfg.mixture list of "
                     f"{{'name': ..., 'weight': ...}} dicts; got {data_cfg['mixture']!r}.")
  entries = [dict(item) for item in data_cfg["mixture"]]
  for item in entries:
    if "name" not in item:
      raise ValueError(f"Mixture entry {item} has no 'name'; expected "
                       "{'name': ..., 'weight': ...}.")
  return entries


def is_episodic(data_cfg) -> bool:
  """Whether the config reads zero-shot episodes (builds no source).

  True when any of its sources is registered as episodic (pascal5i, coco20i, fss1000); its
  eval batches then carry `class_index`. Reads only `name` and, for a mixture, `mixture`: a
  plain {"name": ...} dict will do.
  """
  if data_cfg["name"] != MIX:
    return registry.is_episodic(data_cfg["name"])
  return any(registry.is_episodic(item["name"]) for item in _mixture_entries(data_cfg))


@dataclasses.dataclass
class Component:
  """One built source and its place in the union label table.

  Attributes:
    source: the built source.
    weight: sampling weight within a mixture.
    table: the source's own label table (["other", *classes] for episodes).
    remap: int32 [len(table)], own table index -> union table index.
  """
  source: registry.Source
  weight: float
  table: list[str]
  remap: np.ndarray

  def to_table(self, mask: tf.Tensor, class_index: tf.Tensor | None,
               union_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """A raw mask in the union table, and which union labels are candidates.

    Args:
      mask: int32 [H, W] raw mask values (-1 = ignore).
      class_index: int32 scalar, the episode's class (episodic sources only).
      union_size: L, the size of the union table.

    Returns:
      label int32 [H, W] indexing the union table (-1 = ignore), and label_mask bool [L].
    """
    remap = tf.constant(self.remap)
    if self.source.is_episodic:
      own = tf.where(mask == 1, 1 + class_index, mask)
      present = tf.gather(remap, tf.stack([0, 1 + class_index]))
    else:
      own = mask
      present = remap
    label = tf.where(own == IGNORE_INDEX, IGNORE_INDEX, tf.gather(remap, tf.maximum(own, 0)))
    label_mask = tf.scatter_nd(present[:, None], tf.ones_like(present, tf.bool), [union_size])
    return label, label_mask


def num_mask_values(source: registry.Source) -> int:
  """Raw mask values of `source` lie in [0, this) (or are -1, ignore)."""
  return 2 if source.is_episodic else len(source.label_names)


def build_components(data_cfg, eval_split: bool = False) -> tuple[list[Component], list[str]]:
  """Builds the config's sources: (components, union label table)."""
  components, union = [], []
  for spec in source_specs(data_cfg, eval_split):
    source = registry.get_source(spec.name, spec.split, **spec.kwargs)
    table = [OTHER_LABEL, *source.class_names] if source.is_episodic else list(source.label_names)
    if not table:
      raise ValueError(f"Source {spec.name!r} has no label names; expected at least one.")
    for label in table:
      if label not in union:
        union.append(label)
    remap = np.array([union.index(label) for label in table], np.int32)
    components.append(Component(source, spec.weight, table, remap))
  return components, union


def label_table(data_cfg, eval_split: bool = False) -> list[str]:
  """The label names that batches' `label` values and `label_mask` index (the label
  tables of the module docstring); `eval_split` selects the evaluation split's table
  (episodic sources have other classes there)."""
  _, union = build_components(data_cfg, eval_split=eval_split)
  return union
