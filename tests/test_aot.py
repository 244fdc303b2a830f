"""`tools/benchmark.py --aot`: the real programs compiled for a TPU slice without a TPU,
and the FLOP counter held to XLA's own count.

The TPU compiles need libtpu (`pip install -e ".[tpu]"`): they run in a Python that has
it, `sys.executable` or the one named by LSEG_TPU_PYTHON (CI keeps libtpu out of the
main environment, where it would make every JAX start probe for a TPU), and skip with
the reason otherwise. The compile-only client allows one process at a time.
"""
import json
import os
from pathlib import Path
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax import aot
from lseg_jax import apply as apply_lib
from lseg_jax import config as config_lib
from lseg_jax import errors
from lseg_jax import flops
from lseg_jax import sharding
from lseg_jax import state as state_lib
from configs import synthetic_tiny

ROOT = Path(__file__).resolve().parents[1]


def _tpu_python() -> str:
  probe = "import libtpu"
  for python in (os.environ.get("LSEG_TPU_PYTHON"), sys.executable):
    if python and subprocess.run([python, "-c", probe], capture_output=True).returncode == 0:
      return python
  pytest.skip('libtpu is not installed (pip install -e ".[tpu]", or LSEG_TPU_PYTHON=a Python '
              "that has it)")


def _benchmark_aot(*args: str, timeout: int = 600) -> dict:
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [_tpu_python(), "tools/benchmark.py", "--config", "configs/synthetic_tiny.py",
       "--labels", "6", *args], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tiny_train_and_eval_compile_for_a_two_host_tpu_slice():
  """v5p:2x2x2 is 8 chips on 2 hosts, described and compiled from this one process."""
  out = _benchmark_aot("--aot", "v5p:2x2x2", "--aot-breakdown", "5")
  assert (out["chips"], out["hosts"], out["devices"]) == (8, 2, 8)
  assert out["mesh"] == {"data": 8, "fsdp": 1}
  assert out["batch_per_chip"] == 2.0
  for program in ("train", "eval"):
    fig = out[program]
    assert fig["fits"] is True
    hbm = fig["hbm_gib_per_chip"]
    assert 0 < hbm["total"] < fig["hbm_gib_chip_capacity"] == 95
    assert hbm["arguments"] > 0 and hbm["temporaries"] > 0
    assert fig["tflops_per_image"] > 0 and fig["gb_per_image"] > 0
    assert 0 < fig["hbm_gb_per_image"] <= fig["gb_per_image"]
    assert fig["roofline_images_per_s_per_chip"] > 0
    assert fig["bound"] in ("memory", "compute")
    assert len(fig["hbm_traffic_by_source"]) == 5
  # A train step costs 2-3 forward passes: the backward is up to twice the forward, less
  # where no input gradient is needed (the patch embedding; the frozen text tower does
  # not run at all). Measured 2.27 for the tiny model.
  ratio = out["train"]["tflops_per_image"] / out["eval"]["tflops_per_image"]
  assert 2 < ratio < 3, ratio


def test_every_generation_gives_one_device_per_chip_and_a_mesh():
  """v4 and v5p run each chip's two TensorCores as one device (megacore), as JAX does on
  them; the mesh constructor takes every generation's devices."""
  probe = (
      "import json\n"
      "from lseg_jax import aot, sharding\n"
      "out = {}\n"
      "for topology in ('v4:2x2x1', 'v5e:2x2', 'v5p:2x2x1', 'v6e:2x2'):\n"
      "  devices = aot.slice_devices(topology)\n"
      "  mesh = sharding.make_mesh({'data': -1, 'fsdp': 2}, devices)\n"
      "  out[topology] = [aot.slice_shape(devices), dict(mesh.shape)]\n"
      "print(json.dumps(out))\n")
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([_tpu_python(), "-c", probe], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for topology, (shape, mesh) in out.items():
    assert shape == {"devices": 4, "chips": 4, "hosts": 1}, (topology, shape)
    assert mesh == {"data": 2, "fsdp": 2}, (topology, mesh)


def test_a_program_that_does_not_fit_is_a_result():
  """v5e chips hold 16 GiB: a 1024-image batch of 512 px crops per chip does not fit."""
  out = _benchmark_aot("--aot", "v5e:2x4", "--task", "train", "--config.batch_size=8192",
                       "--config.data.crop_size=512")
  fig = out["train"]
  assert fig["fits"] is False
  assert fig["message"].startswith("does not fit: needs "), fig["message"]
  assert "GiB of 15.75 GiB" in fig["message"], fig["message"]


_V6E_STRIDED_BLOCK = """
from flax import nnx
import jax
import jax.numpy as jnp
from lseg_jax import aot, sharding
from lseg_jax.models import resnet
mesh = sharding.make_mesh({"data": -1}, aot.slice_devices("v6e:2x2"))
block = resnet.Bottleneck(8, 8, 2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
graphdef, params, rest = nnx.split(block, nnx.Param, ...)
def loss(params, rest, x):
  return jnp.sum(nnx.merge(graphdef, params, rest)(x).astype(jnp.float32) ** 2)
replicated = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(
    a.shape, a.dtype, sharding=sharding.replicated(mesh)), nnx.pure(tree))
x = jax.ShapeDtypeStruct((4, 64, 64, 8), jnp.bfloat16, sharding=sharding.batch_sharding(mesh))
result = aot.compile_program("train", jax.jit(jax.grad(loss, argnums=(0, 2))),
                             (replicated(params), replicated(rest), x))
print("compiled" if result.fits else result.message)
"""


def test_resnet_strided_block_gradient_compiles_for_v6e():
  """libtpu (jax[tpu] 0.10.2) overflowed its stack and killed the process compiling this
  for v6e (the ResNet-101 train step, at any batch) until `resnet.Bottleneck` held its
  strided conv apart from BatchNorm in TPU programs. A child process, so a crash fails
  the test instead of ending the run."""
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([_tpu_python(), "-c", _V6E_STRIDED_BLOCK], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == "compiled", (
      proc.returncode, proc.stderr[-2000:])


def test_unknown_topology_is_a_user_error():
  with pytest.raises(errors.UserError, match="expected GENERATION:GRID"):
    aot.slice_devices("v9z:2x2")


def test_flop_counter_equals_xla_cost_analysis_of_the_forward():
  """lseg_jax.flops (MFU figures) against XLA's FLOP count of the real forward on the
  CPU, tiny model, 64 px, 6 labels: within 2% (XLA also counts elementwise work that
  the counter leaves out; matmuls and convolutions dominate)."""
  config = config_lib.complete(synthetic_tiny.get_config())
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  spec = state_lib.state_spec(config, mesh)
  state = state_lib.init_state(spec, tuple(config.optim.frozen))()
  fn, model_state = apply_lib.model_apply(state_lib.model_from_state(state, spec.eval_graphdef))
  images = jnp.zeros((2, 64, 64, 3), jnp.float32)
  text = jnp.ones((6, 16), jnp.float32)
  compiled = apply_lib.forward(fn, mesh).lower(model_state, images, text, None).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_per_image = float(cost["flops"]) / 2
  counted = flops.count(spec.model_cfg, 64, 64, 6).forward
  np.testing.assert_allclose(counted, xla_per_image, rtol=0.02)


_PREFETCH_HLO = """HloModule m

ENTRY %main (p0: f32[1024], p1: f32[1024]) -> f32[1024] {
  %p0 = f32[1024]{0} parameter(0)
  %p1 = f32[1024]{0} parameter(1)
  %cs = (f32[1024]{0}, f32[1024]{0:S(1)}, u32[]) copy-start(f32[1024]{0} %p1)
  %cd = f32[1024]{0:S(1)} copy-done((f32[1024]{0}, f32[1024]{0:S(1)}, u32[]) %cs)
  ROOT %add = f32[1024]{0} fusion(f32[1024]{0} %p0, f32[1024]{0:S(1)} %cd), kind=kLoop
}
"""


def test_traffic_breakdown_counts_hbm_once_and_vmem_never():
  """A prefetch into VMEM (memory space S(1)) reads its HBM source once (copy-start);
  XLA's `bytes accessed` also counts the VMEM write (copy-done) and the fusion's VMEM
  read. Here: copy-start 4 KiB + its u32 context, the fusion's HBM operand and result
  8 KiB; the XLA-like count adds the VMEM copies (copy-done 8 KiB + 4 + fusion's 4 KiB)."""
  out = aot.traffic_breakdown(_PREFETCH_HLO, top=5)
  assert out["bytes"] == 4096 + 4 + 8192
  assert out["xla_like_bytes"] == (4096 + (8192 + 4)) + (4096 + (8192 + 4)) + 3 * 4096
  assert sum(row["gb"] for row in out["top"]) == pytest.approx(out["bytes"] / 1e9, abs=1e-3)


def test_largest_batch_brackets_the_limit(monkeypatch):
  """`--aot-fit`'s search on a stand-in compiler: 2 GiB + 1.5 GiB per image up to 9 images
  per chip, then squeezed to 0.25 GiB per image (as XLA does near the limit), refused
  above v5e's 15.75 GiB. It ends with 10 fitting and 11 refused, whatever the start."""
  monkeypatch.setattr(aot, "slice_devices", lambda topology: ["chip"] * 4)
  monkeypatch.setattr(aot, "slice_shape", lambda devices: {"devices": 4, "chips": 4, "hosts": 1})

  def compile_train(config, devices, num_labels):
    n = config.batch_size // 4
    gib = 2 + 1.5 * min(n, 9) + 0.25 * max(n - 9, 0)
    mesh = type("Mesh", (), {"shape": {"data": 4, "fsdp": 1}})()
    if gib > 15.75:
      return aot.AotResult("train", 1.0, False, {}, message="does not fit", needs_gib=gib,
                           has_gib=15.75), mesh
    return aot.AotResult("train", 1.0, True, {"total": gib}, 1e12 * n, 1e10 * n,
                         traffic={"bytes": 1e10 * n}), mesh
  monkeypatch.setattr(aot, "compile_train", compile_train)
  config = config_lib.complete(synthetic_tiny.get_config())
  for start in (1, 4, 10, 11, 16):
    out = aot.largest_batch("v5e:2x2", config, 6, start)
    assert out["largest_images_per_chip"] == 10, (start, out["tried"])
    assert out["global_batch"] == 40 and out["train"]["fits"]
    assert out["train"]["hbm_gib_per_chip"]["total"] == 15.75
    tried = {t["images_per_chip"]: t["fits"] for t in out["tried"]}
    assert tried[10] and not tried[11] and len(tried) <= 6, (start, tried)
  with pytest.raises(errors.UserError, match="at least 1 image per chip"):
    aot.largest_batch("v5e:2x2", config, 6, 0)


@pytest.mark.parametrize("xla_text", [
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
    "temporaries (16.06G) exceeds available HBM (15.75G).",
    "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out "
    "of memory in memory space hbm. Used 16.06G of 15.75G hbm. Exceeded hbm capacity by 320M."])
def test_both_wordings_of_xla_out_of_memory_give_the_figures(xla_text):
  result = aot._not_fit("train", 1.0, RuntimeError(xla_text))  # pylint: disable=protected-access
  assert result.message.startswith("does not fit: needs 16.06 GiB of 15.75 GiB ("), result.message
  assert not result.fits and (result.needs_gib, result.has_gib) == (16.06, 15.75)
