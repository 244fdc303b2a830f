"""Helpers for the tests that compare, interrupt and resume training runs.

How close two runs of the same computation must be
---------------------------------------------------
- Same device layout (a run resumed on the mesh it stopped on): the same programs on
  the same arrays, bit-identical in practice; held to `SAME_LAYOUT_TOL`.
- Another layout (1 device against 8, 2 processes against 1) sums in another order, so
  each step's float32 results differ in their last bits: one step from the same state
  gives every parameter, momentum and BatchNorm statistic within 2.2e-6 (max-norm,
  relative) of the other layout's; held to `ONE_STEP_TOL`.
- Another layout, a whole run: in a ReLU network those last-bit differences now and then
  flip the sign of a pre-activation that lies within ~1e-7 of zero, and the gradient
  entry it feeds moves by that pixel's share. Measured on the tiny 12-step runs of
  tests/test_train.py (1 device against the (2, 4) mesh): losses within 2e-6 of each
  other up to step 10, where a flip in `scratch/refinenet1/resConfUnit2` moved one
  BatchNorm bias gradient by 6%; then losses 1e-4 apart, parameters 1.5e-5 apart in
  global relative L2 norm. Held to `LAYOUT_TOL` on every step's loss and on the
  parameters; a wrong batch, the failure these tests guard against, moved losses by
  up to 69%.
"""
import numpy as np

SAME_LAYOUT_TOL = 1e-6
ONE_STEP_TOL = 1e-5
LAYOUT_TOL = 1e-3


def rel(a, b) -> float:
  """max |a - b| / max |b| (float64)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def global_rel(got: dict, ref: dict) -> float:
  """||got - ref|| / ||ref|| over all arrays of two {name: array} dicts (same names)."""
  assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
  diff = sum(float(np.sum((np.asarray(got[k], np.float64) - ref[k]) ** 2)) for k in ref)
  norm = sum(float(np.sum(np.asarray(ref[k], np.float64) ** 2)) for k in ref)
  return float(np.sqrt(diff / max(norm, 1e-30)))


def assert_same_losses(got: dict, ref: dict, steps, tol: float) -> None:
  """Every step's loss (from {step: loss} dicts) within `tol` of the reference's."""
  for step in steps:
    assert rel(got[step], ref[step]) < tol, (step, got[step], ref[step], tol)


def assert_equivalent_runs(got_losses: dict, ref_losses: dict, steps, got_params: dict,
                           ref_params: dict) -> None:
  """Two runs of one computation on different layouts (see the module docstring)."""
  assert_same_losses(got_losses, ref_losses, steps, LAYOUT_TOL)
  worst = global_rel(got_params, ref_params)
  assert worst < LAYOUT_TOL, worst


def assert_same_state(got: dict, ref: dict, tol: float) -> None:
  """Every array of two {name: array} dicts within `tol` (max-norm, relative)."""
  assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
  worst = max((rel(got[k], v), k) for k, v in ref.items())
  assert worst[0] < tol, worst


def slow_train_script(delay_s: float) -> str:
  """`python -c` source of tools/train.py with every batch delayed by `delay_s`, so that
  a signal or a kill lands mid-run; arguments as for tools/train.py."""
  return f"""
import time
from lseg_jax.cli import common, train
from lseg_jax.data import input_pipeline
_next = input_pipeline.DataIterator.__next__
def _slow_next(self):
  time.sleep({delay_s!r})
  return _next(self)
input_pipeline.DataIterator.__next__ = _slow_next
common.entry_point(train.main)
"""
