"""Multi-head dot-product attention of the ViT, with the implementation chosen per backend.

`implementation` (`LSegConfig.attention`):
  "auto"   cuDNN's fused flash attention on NVIDIA GPUs (compute capability >= 8.0)
           when it supports the call (bfloat16 or float16, head dim a multiple of 8
           and at most 128, or 256 from Hopper on); XLA's attention everywhere else
           (CPU, TPU, other GPUs, float32). The choice is made when tracing.
  "xla"    `jax.nn.dot_product_attention(implementation="xla")`.
  "cudnn"  cuDNN flash attention, or an error where cuDNN cannot run it.
  "tpu_flash"  JAX's Pallas flash-attention kernel for TPUs ("auto" on TPUs): the
           [heads, N, N] scores never reach HBM, which XLA's attention writes and reads
           several times per block and pass (the largest HBM consumer of the ViT-L/16
           train step on TPUs: docs/scaling.md).

The platform is the one the program is compiled for: `jax.default_backend()`, or the
platform of `compiling_for(...)` (`lseg_jax.aot` compiles TPU programs on a CPU host).

cuDNN rejects token counts such as ViT-L/16's 901 at 480 px, so that path pads the
token axis to a multiple of 64 and passes the true length as the query and key/value
sequence lengths: padded keys get no weight and padded queries are dropped
(`padded_attention`, which any implementation can run). The TPU kernel wants multiples
of its 128-token blocks: it pads likewise and gives the padding a segment of its own.
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "tpu_flash")
CUDNN_TOKEN_MULTIPLE = 64
TPU_TOKEN_MULTIPLE = 128
_TARGET_PLATFORM = contextvars.ContextVar("attention_target_platform", default=None)
_KERNEL_MESH = contextvars.ContextVar("attention_kernel_mesh", default=None)


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, value):
  token = var.set(value)
  try:
    yield
  finally:
    var.reset(token)


def compiling_for(platform: str):
  """Within the block, "auto" chooses for `platform` ("tpu", "gpu", "cpu")."""
  return _setting(_TARGET_PLATFORM, platform)


def target_platform() -> str:
  """The platform programs traced now are compiled for: `compiling_for`'s, else JAX's
  default backend."""
  return _TARGET_PLATFORM.get() or jax.default_backend()


def kernel_mesh(mesh: jax.sharding.Mesh | None):
  """Within the block (entered while a jitted program traces), kernels XLA cannot
  partition run per device over `mesh`, whose every axis splits the batch."""
  return _setting(_KERNEL_MESH, mesh)


def _cuda_compute_capability() -> tuple[int, ...] | None:
  """(major, minor) of the first GPU if the default backend is CUDA, else None."""
  if jax.default_backend() != "gpu":
    return None
  device = jax.devices()[0]
  if "cuda" not in getattr(device.client, "platform_version", "").lower():
    return None
  try:
    return tuple(int(v) for v in str(device.compute_capability).split("."))
  except (AttributeError, ValueError):
    return None


def check_implementation(implementation: str) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; expected one of "
                     f"{IMPLEMENTATIONS}")


def resolve(implementation: str, dtype, head_dim: int) -> str:
  """"auto" -> "cudnn" or "xla" for this backend, dtype and head dim; others unchanged."""
  check_implementation(implementation)
  if implementation != "auto":
    return implementation
  if target_platform() == "tpu":
    return "tpu_flash"
  if _TARGET_PLATFORM.get() not in (None, "gpu"):
    return "xla"
  capability = _cuda_compute_capability()
  if capability is None or capability < (8, 0):
    return "xla"
  max_head_dim = 256 if capability >= (9, 0) else 128
  if (jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
      or head_dim % 8 or head_dim > max_head_dim):
    return "xla"
  return "cudnn"


def padded_attention(q, k, v, multiple: int, implementation: str = "cudnn"):
  """Attention of q, k, v [B, N, heads, head_dim] with the token axis padded to a multiple
  of `multiple` ("xla" or "cudnn"), equal to unpadded attention: padded keys are excluded
  through `key_value_seq_lengths`, padded queries sliced off."""
  b, n = q.shape[:2]
  pad = ((0, 0), (0, -n % multiple), (0, 0), (0, 0))
  q, k, v = (jnp.pad(t, pad) for t in (q, k, v))
  lengths = jnp.full((b,), n, jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out[:, :n]


def tpu_flash_attention(q, k, v):
  """Pallas flash attention (TPU) of [B, N, heads, head_dim] tensors, N padded to 128s.

  The padded tokens form a second segment: real queries never see padded keys, and the
  padded queries (which attend among themselves) are sliced off.
  """
  # Loaded on use: Pallas' TPU module is only needed when compiling for a TPU.
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash
  n, head_dim = q.shape[1], q.shape[-1]
  padded = n + (-n % TPU_TOKEN_MULTIPLE)

  def local(q, k, v):
    q, k, v = (jnp.pad(t, ((0, 0), (0, padded - n), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
               for t in (q, k, v))
    segment = jnp.broadcast_to((jnp.arange(padded) >= n).astype(jnp.int32), (q.shape[0], padded))
    out = pallas_flash.flash_attention(
        q, k, v, segment_ids=pallas_flash.SegmentIds(q=segment, kv=segment),
        sm_scale=head_dim ** -0.5)
    return out.transpose(0, 2, 1, 3)[:, :n]
  # A Pallas kernel is not partitioned by XLA: on the program's mesh (`kernel_mesh`),
  # each device runs it on its share of the batch.
  mesh = _KERNEL_MESH.get()
  if mesh is None or mesh.size == 1:
    return local(q, k, v)
  spec = jax.sharding.PartitionSpec(mesh.axis_names)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)


def dot_product_attention(q, k, v, implementation: str = "auto"):
  """Softmax attention of q, k, v [B, N, heads, head_dim], scale 1/sqrt(head_dim), no
  mask, by `implementation` (module docstring) -> [B, N, heads, head_dim]."""
  implementation = resolve(implementation, q.dtype, q.shape[-1])
  if implementation == "cudnn":
    return padded_attention(q, k, v, CUDNN_TOKEN_MULTIPLE, "cudnn")
  if implementation == "tpu_flash":
    return tpu_flash_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")
