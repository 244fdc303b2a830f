"""Wall-clock timing of repeated calls, shared by the JAX and PyTorch benchmarks
(standard library only, so either side imports it without the other)."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def time_calls(fn: Callable[[int], Any], steps: int) -> dict[str, float]:
  """Times fn(i) (which must wait for its result): the first call, then `steps` calls."""
  t0 = time.perf_counter()
  fn(0)
  first = time.perf_counter() - t0
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    fn(i + 1)
    times.append(time.perf_counter() - t0)
  return {"first_step_s": first, "step_s_median": statistics.median(times),
          "step_s_min": min(times)}
