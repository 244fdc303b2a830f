"""Dataset sources: a name -> factory registry and the `Source` interface.

A *source* yields raw examples (the data contract in `lseg_jax.data`'s docstring).

Most sources are *indexed*: they know their `num_examples` and can load example `i` inside a
tf.data graph (`load(i)`). The input pipeline then shuffles indices, not decoded images, so
per-epoch shuffling is a full permutation and resuming at step k skips indices without decoding
anything. A source that can only stream overrides `as_dataset` instead (`is_indexed = False`).

Registering a source (`episodic=True` for zero-shot episode sources: the one place that says
so; `is_episodic(name)` answers without building a source, and `get_source` sets the built
source's `is_episodic` from it):

  @registry.register("my_data")
  def _make(split, *, data_dir=None, **kwargs) -> Source: ...

  source = registry.get_source("my_data", "train", data_dir=...)
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

_FACTORIES: dict[str, Callable[..., "Source"]] = {}
_EPISODIC: set[str] = set()


def register(name: str, *, episodic: bool = False):
  """Decorator registering `factory(split, **kwargs) -> Source` under `name`.

  Args:
    name: the source's name in data configs.
    episodic: whether its sources are zero-shot episode sources (`get_source` sets their
      `is_episodic` from it).
  """
  def decorator(factory):
    if name in _FACTORIES and _FACTORIES[name] is not factory:
      raise ValueError(f"Dataset source {name!r} is already registered.")
    _FACTORIES[name] = factory
    if episodic:
      _EPISODIC.add(name)
    else:
      _EPISODIC.discard(name)
    return factory
  return decorator


def available_sources() -> list[str]:
  _import_builtin_sources()
  return sorted(_FACTORIES)


def is_episodic(name: str) -> bool:
  """Whether source `name` was registered as episodic (builds no source)."""
  _check_known(name)
  return name in _EPISODIC


def get_source(name: str, split: str, **kwargs) -> "Source":
  """The source registered as `name`, for `split` (kwargs go to its factory)."""
  _check_known(name)
  source = _FACTORIES[name](split, **kwargs)
  source.is_episodic = name in _EPISODIC
  return source


def _check_known(name: str):
  _import_builtin_sources()
  if name not in _FACTORIES:
    raise ValueError(f"Unknown dataset source {name!r}; expected one of {sorted(_FACTORIES)}.")


def _import_builtin_sources():
  # Sources register themselves on import; importing here avoids a cycle with
  # modules that import `register` from this file.
  import importlib
  for module in ("synthetic", "folder", "fewshot", "ade20k", "mix_datasets", "openvocab"):
    try:
      importlib.import_module(f"lseg_jax.data.{module}")
    except ModuleNotFoundError as e:
      if e.name != f"lseg_jax.data.{module}":
        raise


class Source:
  """A dataset split. Subclasses set the attributes and implement `load`.

  Attributes:
    label_names: names of the mask values 0..L-1 (for episodic sources the binary mask's table
      is ["other", class_name] per example; `class_names` lists the fold's classes).
    num_examples: number of examples in the split (None if unknown).
    is_episodic: True for zero-shot episode sources (set by `get_source` from the registration).
    is_indexed: True if `load(index)` is implemented.
    mask_ignore: the value of "ignore" in the source's stored masks (255 in PNG masks; None
      where the files have no single such value), for messages.
    scored_names: the texts a model scores on this source's images (default: `label_names`).
    scored_class: int32 [len(scored_names)]: the ground-truth class (index into `label_names`)
      that a pixel predicted as scored name j counts as (default: arange). Evaluation takes the
      argmax over `scored_names`, maps it through `scored_class` and compares the result with
      the mask. PAS-20b scores 59 names: the 20 VOC classes count as themselves, the 39 other
      PC-59 classes as background (class 20 of its masks).
  """
  label_names: list[str] = []
  num_examples: int | None = None
  is_episodic: bool = False
  is_indexed: bool = True
  mask_ignore: int | None = None
  class_names: list[str] = []
  _scored_names: list[str] | None = None
  _scored_class: np.ndarray | None = None

  @property
  def scored_names(self) -> list[str]:
    return list(self.label_names if self._scored_names is None else self._scored_names)

  @scored_names.setter
  def scored_names(self, names):
    self._scored_names = list(names)

  @property
  def scored_class(self) -> np.ndarray:
    if self._scored_class is None:
      return np.arange(len(self.scored_names), dtype=np.int32)
    return self._scored_class

  @scored_class.setter
  def scored_class(self, classes):
    self._scored_class = np.asarray(classes, np.int32)
    assert self._scored_class.shape == (len(self.scored_names),)

  def load(self, index: tf.Tensor) -> dict[str, tf.Tensor]:
    """Raw example `index` (int64 scalar tensor), written with TF ops only."""
    raise NotImplementedError

  def file_name(self, index: tf.Tensor) -> tf.Tensor:
    """tf.string naming example `index` (used when its loading fails)."""
    return tf.strings.as_string(index)

  def host_indices(self, process_index: int, process_count: int) -> np.ndarray:
    """This process's disjoint slice of the example indices, int64 [N_host]."""
    check_process(process_index, process_count)
    if self.num_examples is None:
      raise ValueError(f"{type(self).__name__} has no num_examples.")
    return np.arange(process_index, self.num_examples, process_count, dtype=np.int64)

  def as_dataset(self, *, process_index: int = 0, process_count: int = 1,
                 shuffle: bool = False, seed: int = 0) -> tf.data.Dataset:
    """One pass over this process's slice of raw examples.

    With `shuffle`, the order is a permutation drawn from `seed` alone, so the same seed gives
    the same order on every run.
    """
    indices = tf.constant(self.host_indices(process_index, process_count))
    if shuffle:
      indices = tf.random.experimental.stateless_shuffle(
          indices, seed=tf.constant([seed, 0], tf.int64))
    return tf.data.Dataset.from_tensor_slices(indices).map(
        tf.autograph.experimental.do_not_convert(self.load),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def check_process(process_index: int, process_count: int):
  """Raises a ValueError unless 0 <= process_index < process_count."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in "
                     f"[0, process_count={process_count}).")
