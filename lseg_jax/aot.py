"""The real train and evaluation programs compiled for a TPU slice, without a TPU.

libtpu's compile-only client describes every chip of a slice on any CPU machine
(`topologies.get_topology_desc("v5p:2x2x2", "tpu")`), and `jax.jit(f).lower(<sharded
ShapeDtypeStructs>).compile()` runs XLA's TPU compiler on them: `compile_train` for the
train step `tools/train.py` runs (on `config.mesh` over the slice), `compile_eval` for the
forward of evaluation and inference. The result (`AotResult`) is XLA's
own account of the program: per-device HBM (arguments, outputs, temporaries; the
compiler refuses a program that does not fit, which becomes a result, not an error),
FLOPs and bytes per device (`cost_analysis`: XLA's `bytes accessed`, which also counts
the accesses to the on-chip VMEM that operands are prefetched into; and the HBM bytes
alone, `traffic_breakdown`), and the roofline step time max(FLOPs / peak FLOP/s, HBM
bytes / HBM bandwidth) from the generation's published peaks (`CHIPS`; sources in
docs/scaling.md).
"""
from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lseg_jax import apply as apply_lib
from lseg_jax import names
from lseg_jax.errors import UserError
from lseg_jax import sharding
from lseg_jax import state as state_lib
from lseg_jax import train
from lseg_jax.models import attention

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures of a TPU generation (bfloat16 dense peak)."""
  device_kind: str  # jax.Device.device_kind of its devices
  hbm_gib: float
  peak_tflops: float
  hbm_tb_per_s: float


# Sources: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} (system architecture tables).
CHIPS = {
    "v4": Chip("TPU v4", 32, 275, 1.2),
    "v5e": Chip("TPU v5 lite", 16, 197, 0.819),
    "v5p": Chip("TPU v5", 95, 459, 2.765),
    "v6e": Chip("TPU v6 lite", 32, 918, 1.64),
}


def slice_devices(topology: str) -> list[Any]:
  """The devices of a TPU slice named like "v5p:2x2x2" (generation:chip grid)."""
  generation = topology.split(":")[0]
  if generation not in CHIPS or ":" not in topology:
    raise UserError(f"TPU topology {topology!r}: expected GENERATION:GRID with a "
                     f"generation in {sorted(CHIPS)}, e.g. v5p:2x2x2 or v5e:2x4")
  # pylint: disable=g-import-not-at-top
  try:
    import libtpu  # noqa: F401  pylint: disable=unused-import
  except ImportError as e:
    raise UserError("compiling for a TPU needs libtpu: pip install -e \".[tpu]\"") from e
  from jax.experimental import topologies
  # pylint: enable=g-import-not-at-top
  # v4 and v5p chips run their two TensorCores as one device ("megacore"), as JAX does
  # on them; the compile-only client would otherwise show each core as a device.
  options = {"chip_config_name": "megacore"} if generation in ("v4", "v5p") else {}
  try:
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **options)
  except jax.errors.JaxRuntimeError as e:
    raise UserError(f"TPU topology {topology!r}: {str(e).splitlines()[0]}") from e
  return list(desc.devices)


def slice_shape(devices) -> dict[str, int]:
  """Chips, hosts and devices of a slice."""
  chips = {tuple(d.coords) for d in devices}
  return {"devices": len(devices), "chips": len(chips),
          "hosts": len({d.process_index for d in devices})}


@dataclasses.dataclass
class AotResult:
  """What XLA's TPU compiler says of one program (per device unless named otherwise)."""
  program: str
  compile_s: float
  fits: bool
  hbm: dict[str, float]  # GiB per device: arguments, outputs, temporaries, total
  flops: float | None = None
  bytes_accessed: float | None = None  # XLA's count (VMEM accesses included)
  message: str = ""  # "does not fit: ..." when it does not
  needs_gib: float | None = None  # when it does not fit and XLA says: what it needs, per device
  has_gib: float | None = None  # and what the device has for it
  # `traffic_breakdown` of the compiled program, every source ranked
  traffic: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

  def as_dict(self, chip: Chip, shape: dict[str, int], images: int) -> dict[str, Any]:
    """JSON-ready figures with per-image costs and the roofline for `images` per step."""
    out: dict[str, Any] = {"program": self.program, "compile_s": round(self.compile_s, 1),
                           "fits": self.fits}
    per_chip = shape["devices"] // shape["chips"]
    out["hbm_gib_per_chip"] = {k: round(v * per_chip, 3) for k, v in self.hbm.items()}
    out["hbm_gib_chip_capacity"] = chip.hbm_gib
    if not self.fits:
      out["message"] = self.message
      return out
    flops_chip, bytes_chip = self.flops * per_chip, self.bytes_accessed * per_chip
    hbm_chip = self.traffic["bytes"] * per_chip
    images_chip = images / shape["chips"]
    compute_s = flops_chip / (chip.peak_tflops * 1e12)
    memory_s = hbm_chip / (chip.hbm_tb_per_s * 1e12)
    step_s = max(compute_s, memory_s)
    out.update(
        tflops_per_chip=_sig(flops_chip / 1e12), gb_per_chip=_sig(bytes_chip / 1e9),
        tflops_per_image=_sig(flops_chip / images_chip / 1e12),
        gb_per_image=_sig(bytes_chip / images_chip / 1e9),
        hbm_gb_per_image=_sig(hbm_chip / images_chip / 1e9),
        roofline_step_s=_sig(step_s),
        roofline_images_per_s_per_chip=_sig(images_chip / step_s),
        bound="memory" if memory_s > compute_s else "compute")
    return out


def _sig(x: float, digits: int = 4) -> float:
  return float(f"{x:.{digits}g}")


# XLA's two wordings: "... temporaries (16.68G) exceeds available HBM (15.75G)" and
# "Used 15.82G of 15.75G hbm": the first figure is what the program needs, the last the chip.
_GIB_FIGURE = re.compile(r"(?:\(|Used |of )([\d.]+)([KMGT])\b")
_GIB_UNIT = {"K": 2 ** -20, "M": 2 ** -10, "G": 1, "T": 2 ** 10}


def _not_fit(program: str, seconds: float, error: Exception) -> AotResult:
  """'does not fit: needs X GiB of Y' (and the two figures) from XLA's RESOURCE_EXHAUSTED."""
  text = str(error)
  line = next((l for l in text.splitlines() if "RESOURCE_EXHAUSTED" in l), text.splitlines()[0])
  figures = _GIB_FIGURE.findall(line)
  if len(figures) < 2:
    return AotResult(program, seconds, False, {}, message=f"does not fit: {line.strip()}")
  (need, unit), (have, unit2) = figures[0], figures[-1]
  message = f"does not fit: needs {need} {unit}iB of {have} {unit2}iB ({line.strip()})"
  return AotResult(program, seconds, False, {}, message=message,
                   needs_gib=float(need) * _GIB_UNIT[unit], has_gib=float(have) * _GIB_UNIT[unit2])


def compile_program(program: str, jitted, args: tuple[Any, ...]) -> AotResult:
  """Lowers and compiles `jitted` on abstract `args` (sharded over TPU devices) with
  "auto" attention chosen for TPUs; an out-of-memory is a result."""
  t0 = time.perf_counter()
  try:
    with attention.compiling_for("tpu"):
      compiled = jitted.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return _not_fit(program, time.perf_counter() - t0, e)
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  hbm = {"arguments": mem.argument_size_in_bytes / GIB,
         "outputs": mem.output_size_in_bytes / GIB,
         "temporaries": mem.temp_size_in_bytes / GIB}
  hbm["total"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                  - mem.alias_size_in_bytes + mem.temp_size_in_bytes
                  + mem.generated_code_size_in_bytes) / GIB
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return AotResult(program, seconds, True, hbm, float(cost["flops"]),
                   float(cost["bytes accessed"]),
                   traffic=traffic_breakdown(compiled.as_text(), top=None))


def _abstract_text(spec: state_lib.StateSpec, mesh, num_labels: int):
  """Replicated label embeddings [L, D] of the model's text width."""
  frozen = spec.abstract["frozen"]
  flat = names.flatten(frozen.to_pure_dict() if hasattr(frozen, "to_pure_dict") else frozen)
  dim = int(flat["clip_pretrained/text_projection"].shape[-1])
  return jax.ShapeDtypeStruct((num_labels, dim), jnp.float32, sharding=sharding.replicated(mesh))


def abstract_batch(mesh, batch: int, crop: int, num_labels: int, with_label: bool = True):
  """ShapeDtypeStructs of a global batch as the input pipeline delivers it."""
  sh = sharding.batch_sharding(mesh)
  out = {"image": jax.ShapeDtypeStruct((batch, crop, crop, 3), jnp.float32, sharding=sh),
         "label_mask": jax.ShapeDtypeStruct((batch, num_labels), jnp.bool_, sharding=sh)}
  if with_label:
    out["label"] = jax.ShapeDtypeStruct((batch, crop, crop), jnp.int32, sharding=sh)
  return out


def compile_train(config, devices, num_labels: int) -> tuple[AotResult, Any]:
  """The train step of `tools/train.py` for `config` on a mesh over `devices`."""
  mesh = sharding.make_mesh(config.mesh, devices)
  train.check_batch_config(config, mesh)
  spec = state_lib.state_spec(config, mesh)
  jitted = train.train_step_program(spec, config, mesh)
  state = {k: sharding.with_shardings(spec.abstract[k], spec.shardings[k])
           for k in spec.abstract}
  frozen = state.pop("frozen")
  text = _abstract_text(spec, mesh, num_labels)
  args = (state, frozen, abstract_batch(mesh, config.batch_size, config.data.crop_size,
                                        num_labels), text)
  return compile_program("train", jitted, args), mesh


def compile_eval(config, devices, num_labels: int) -> tuple[AotResult, Any]:
  """The forward of evaluation and inference (`apply.forward`, as `evaluate.Evaluator`
  runs it) on batches of `config.eval_batch_size` crops, on a mesh over `devices`."""
  mesh = sharding.make_mesh(config.mesh, devices)
  spec = state_lib.state_spec(config, mesh)
  state = {k: sharding.with_shardings(spec.abstract[k], spec.shardings[k])
           for k in state_lib.MODEL_KEYS}
  fn, model_state = apply_lib.model_apply(state_lib.model_from_state(state, spec.eval_graphdef))
  batch = abstract_batch(mesh, config.eval_batch_size or config.batch_size,
                         config.data.crop_size, num_labels, with_label=False)
  text = _abstract_text(spec, mesh, num_labels)
  args = (model_state, batch["image"], text, batch["label_mask"])
  return compile_program("eval", apply_lib.forward(fn, mesh), args), mesh


PROGRAMS = {"train": compile_train, "eval": compile_eval}


def _describe(topology: str, shape: dict[str, int], config, num_labels: int) -> dict[str, Any]:
  return {"topology": topology, **shape, "model": config.model.backbone,
          "dtype": config.model.dtype, "remat": config.model.remat,
          "crop": config.data.crop_size, "labels": num_labels,
          "global_batch": config.batch_size,
          "batch_per_chip": config.batch_size / shape["chips"]}


def report(topology: str, config, num_labels: int,
           programs: dict[str, Callable[..., tuple[AotResult, Any]]],
           breakdown: int = 0) -> dict[str, Any]:
  """One JSON-ready line: the slice, the mesh and each program's figures (with the
  `breakdown` source lines moving the most HBM bytes, `traffic_breakdown`)."""
  generation = topology.split(":")[0]
  devices = slice_devices(topology)
  shape = slice_shape(devices)
  out = _describe(topology, shape, config, num_labels)
  for name, fn in programs.items():
    result, mesh = fn(config, devices, num_labels)
    out["mesh"] = dict(mesh.shape)
    images = config.batch_size if name == "train" else (config.eval_batch_size
                                                        or config.batch_size)
    out[name] = result.as_dict(CHIPS[generation], shape, images)
    if breakdown and result.fits:
      out[name]["hbm_traffic_by_source"] = result.traffic["top"][:breakdown]
  return out


def largest_batch(topology: str, config, num_labels: int, start: int = 1,
                  log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
  """The most images per chip whose train step fits the chip's HBM, bracketed by two
  compiles: one that fits at n images per chip and one refused at n + 1.

  Starts at `start`; each next guess extrapolates the HBM per chip of the compiles that
  fit to the chip's capacity (XLA squeezes a program near the limit, so the guess errs
  low; without a refusal yet it grows the batch at least 1.5 times), or halves the bracket
  found so far when it falls outside or adds a single image (ViT-L/16 on v5p held
  90.3 to 95.8 GiB from 38 to 44 images per chip). A refused compile takes seconds, one that fits
  minutes for full-size models. Returns `report`'s line for the largest batch that fits
  (for `start` if none does) with "largest_images_per_chip" and every compile "tried".
  """
  if start < 1:
    raise UserError(f"--aot-fit {start}: expected at least 1 image per chip")
  chip = CHIPS[topology.split(":")[0]]
  devices = slice_devices(topology)
  shape = slice_shape(devices)
  per_chip = shape["devices"] // shape["chips"]
  tried: dict[int, tuple[AotResult, Any]] = {}
  gib = {}  # images per chip -> HBM GiB per chip, of the compiles that fit
  n = start
  while True:
    trial = config.copy_and_resolve_references()
    trial.batch_size = n * shape["chips"]
    tried[n] = compile_train(trial, devices, num_labels)
    if tried[n][0].fits:
      gib[n] = tried[n][0].hbm["total"] * per_chip
    log(f"{n} images per chip: "
        + (f"fits in {gib[n]:.2f} GiB" if n in gib else tried[n][0].message))
    lo = max(gib, default=0)
    hi = min((k for k in tried if k not in gib), default=None)
    if hi == lo + 1:
      break
    if not gib:  # scaled by what the chip has over what the refused compile needed
      refused = tried[hi][0]
      n = max(1, min(hi - 1, int(hi * (refused.has_gib / refused.needs_gib
                                       if refused.needs_gib else 0.5))))
      continue
    first = min(gib)
    per_image = (gib[lo] - gib[first]) / (lo - first) if lo > first else 0
    per_image = per_image if per_image > 0 else gib[lo] / lo
    n = lo + max(1, int((chip.hbm_gib - gib[lo]) / per_image))
    if hi is None:  # at least 1.5 times: XLA's squeezing can hold the HBM flat for a while
      n = max(n, lo + lo // 2)
    elif n >= hi or n == lo + 1:  # past the bracket, or a chip full by the extrapolation
      n = (lo + hi) // 2
  best = lo or start
  config = config.copy_and_resolve_references()
  config.batch_size = best * shape["chips"]
  out = _describe(topology, shape, config, num_labels)
  out["mesh"] = dict(tried[best][1].shape)
  out["train"] = tried[best][0].as_dict(chip, shape, config.batch_size)
  out["largest_images_per_chip"] = lo
  out["tried"] = [{"images_per_chip": k, "fits": r.fits,
                   **({"hbm_gib_per_chip": round(gib[k], 3)} if r.fits
                      else {"message": r.message})} for k, (r, _) in sorted(tried.items())]
  return out


# --- Where the HBM bytes go: the compiled program's top-level instructions (each fusion reads
# its operands from HBM and writes its result there), charged to the project source line
# that emitted them (the HLO's stack frames) and to the forward or backward pass.
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(pred|[sufb]f?\d+)\[([\d,]*)\](\{[^}]*\})?")  # type, dims, layout
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*?)\)(?:, |$)")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id"}


def _shape_bytes(shape: str) -> tuple[int, int]:
  """(bytes of the arrays of `shape` placed in HBM, bytes of all of them). Arrays whose
  layout names a memory space S(n) are not in HBM: S(1) is the TPU core's VMEM, where
  XLA prefetches operands with copy-start."""
  hbm = every = 0
  for t, dims, layout in _ARRAY.findall(shape):
    size = _BYTES.get(t, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    every += size
    hbm += 0 if re.search(r"S\(\d+\)", layout) else size
  return hbm, every


def _frames(hlo: str) -> dict[int, str]:
  """stack_frame_id -> "file:line function" of its innermost frame in lseg_jax."""
  sections: dict[str, dict[int, str]] = {}
  current = None
  for line in hlo.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = sections.setdefault(line, {})
    elif current is not None and line and line[0].isdigit():
      key, _, value = line.partition(" ")
      current[int(key)] = value.strip().strip('"')
    elif not line.strip():
      current = None

  def field(text, name):
    m = re.search(name + r"=(\d+)", text)
    return int(m.group(1)) if m else None
  files, funcs = sections.get("FileNames", {}), sections.get("FunctionNames", {})
  locs, frames = sections.get("FileLocations", {}), sections.get("StackFrames", {})

  def where(frame_id):
    seen = set()
    while frame_id in frames and frame_id not in seen:
      seen.add(frame_id)
      loc = locs.get(field(frames[frame_id], "file_location_id"), "")
      path = files.get(field(loc, "file_name_id"), "")
      if "lseg_jax/" in path and "lseg_jax/train.py" not in path:
        return (f"{path.split('lseg_jax/', 1)[1]}:{field(loc, 'line')} "
                f"{funcs.get(field(loc, 'function_name_id'), '')}")
      frame_id = field(frames[frame_id], "parent_frame_id")
    return "other"
  return {i: where(i) for i in frames}


def traffic_breakdown(hlo: str, top: int | None = 20) -> dict[str, Any]:
  """HBM bytes per device of a compiled program's text (`compiled.as_text()`), by source.

  Each top-level instruction of the entry computation is charged the bytes of its result
  and operands that live in HBM, to the innermost lseg_jax source line of its stack frame
  (train.py's step itself is not a source: its loss and optimizer lines are charged to
  their callees) and to "fwd" or "bwd" (the op name of a gradient carries "transpose(").
  XLA's own `bytes accessed` also counts arrays in VMEM (memory space S(1)): a prefetched
  operand is counted when copy-start reads it from HBM, again when copy-done writes VMEM
  and again when the fusion reads it from there. Here a copy-start moves its HBM source
  (or HBM destination, for an eviction) once, and VMEM accesses are not HBM traffic.
  Returns {"bytes": HBM bytes per device, "xla_like_bytes": every array counted as XLA
  does (within a few % of `bytes accessed`), "top": the `top` sources (None: all)}.
  """
  frames = _frames(hlo)
  entry = hlo[hlo.index("\nENTRY "):]
  sizes: dict[str, tuple[int, int]] = {}  # name -> (HBM bytes, all bytes)
  by_source: dict[str, int] = {}
  total = total_all = 0
  for line in entry.splitlines()[1:]:
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, opcode, operands = m.groups()
    sizes[name] = _shape_bytes(shape)
    if opcode in _FREE:
      continue
    inputs = [sizes.get(o.split()[-1].lstrip("%"), (0, 0))
              for o in operands.split(", ") if "%" in o]
    total_all += sizes[name][1] + sum(b for _, b in inputs)
    if opcode == "copy-done":  # the copy's bytes are counted at its copy-start
      continue
    moved = sizes[name][0] + (0 if opcode == "copy-start" else sum(h for h, _ in inputs))
    frame = re.search(r"stack_frame_id=(\d+)", line)
    source = frames.get(int(frame.group(1)), "other") if frame else "other"
    op_name = re.search(r'op_name="([^"]*)"', line)
    direction = "bwd" if op_name and "transpose(" in op_name.group(1) else "fwd"
    key = f"{direction} {source}"
    by_source[key] = by_source.get(key, 0) + moved
    total += moved
  ranked = sorted(by_source.items(), key=lambda kv: -kv[1])[:top]
  return {"bytes": total, "xla_like_bytes": total_all,
          "top": [{"source": k, "gb": round(v / 1e9, 3), "share": round(v / total, 4)}
                  for k, v in ranked]}


__all__ = ["AotResult", "CHIPS", "Chip", "PROGRAMS", "abstract_batch", "compile_eval",
           "compile_program", "compile_train", "largest_batch", "report", "slice_devices",
           "slice_shape", "traffic_breakdown"]
