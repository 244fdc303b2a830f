"""Device mesh and regex rules -> `NamedSharding`s for parameters, state and batches.

Mesh axes and rule actions: docs/scaling.md, "Sharding rules".
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np

from lseg_jax import names as names_lib

P = jax.sharding.PartitionSpec
MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # the batch axis is split over both mesh axes
DEFAULT_RULES = ((".*", "fsdp"),)
DEFAULT_MIN_SIZE = 2 ** 14  # smaller arrays are cheaper replicated than gathered


# --- Flat names of pytree leaves (`lseg_jax.names` turns key paths into names) ---
def names(tree) -> list[str]:
  """Flat names of the leaves of `tree`, in `jax.tree.leaves` order."""
  return [names_lib.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def map_with_names(fn: Callable[[str, Any], Any], tree, *rest):
  """`jax.tree.map` whose function also receives each leaf's flat name."""
  return jax.tree_util.tree_map_with_path(lambda p, *x: fn(names_lib.path_name(p), *x), tree, *rest)


# --- Mesh ---
def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A ("data", "fsdp") mesh from sizes like {"data": -1, "fsdp": 1}.

  One size may be -1: it takes all remaining devices. Sizes whose product is smaller
  than the device count use the first devices (single-process runs only).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = dict(mesh_config)
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh config has unknown axes {unknown}; expected {list(MESH_AXES)}")
  sizes = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} must be positive, with at "
                     "most one -1 (all remaining devices)")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh sizes "
                       f"{dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // known
  total = math.prod(sizes)
  if total > len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {total} devices; "
                     f"{len(devices)} are available")
  if total < len(devices) and jax.process_count() > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {total} of {len(devices)} "
                     "devices; multi-process runs must use them all (set one size to -1)")
  return jax.make_mesh(tuple(sizes), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices[:total])


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading (batch) axis split over every device of the mesh: over BATCH_AXES for
  a `make_mesh` mesh, over all its axes for any other."""
  axes = BATCH_AXES if mesh.axis_names == MESH_AXES else tuple(mesh.axis_names)
  return jax.sharding.NamedSharding(mesh, P(axes))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, P())


# --- Rules -> shardings ---
def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = DEFAULT_MIN_SIZE) -> P:
  """Splits the largest axis divisible by `fsdp_size` (ties: the last such axis)."""
  if fsdp_size == 1 or math.prod(shape) < min_size:
    return P()
  candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: (shape[i], i))
  spec = [None] * len(shape)
  spec[axis] = "fsdp"
  return P(*spec)


def partition_spec(name: str, shape: Sequence[int], rules, mesh: jax.sharding.Mesh,
                   min_size: int = DEFAULT_MIN_SIZE) -> P:
  """The PartitionSpec the first matching rule gives the array `name` of `shape`."""
  action = names_lib.first_match(name, rules, "replicate")
  if action == "fsdp":
    return fsdp_spec(shape, mesh.shape["fsdp"], min_size)
  if action == "replicate":
    return P()
  if isinstance(action, (tuple, list)):
    if len(action) > len(shape):
      raise ValueError(f"sharding rule gives {name!r} (shape {tuple(shape)}) the spec "
                       f"{tuple(action)}, which has more axes than the array")
    for dim, axis in zip(shape, action):
      axes = axis if isinstance(axis, (tuple, list)) else (axis,)
      size = math.prod(mesh.shape[a] for a in axes if a is not None)
      if dim % size:
        raise ValueError(f"sharding rule splits an axis of size {dim} of {name!r} (shape "
                         f"{tuple(shape)}) over {size} devices; it must divide evenly")
    return P(*action)
  raise ValueError(f"sharding rule action for {name!r} is {action!r}; expected 'fsdp', "
                   "'replicate' or a PartitionSpec tuple")


def tree_shardings(tree, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES,
                   min_size: int = DEFAULT_MIN_SIZE):
  """A pytree of NamedShardings for `tree` (arrays or ShapeDtypeStructs)."""
  rules = names_lib.check_rules(rules, "sharding rules")
  return map_with_names(
      lambda name, x: jax.sharding.NamedSharding(
          mesh, partition_spec(name, np.shape(x), rules, mesh, min_size)), tree)


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying `shardings` (targets for Orbax restores and jit)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)
