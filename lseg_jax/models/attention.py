"""Multi-head dot-product attention of the ViT, with the implementation chosen per backend.

`implementation` (`LSegConfig.attention`):
  "auto"   cuDNN's fused flash attention on NVIDIA GPUs (compute capability >= 8.0)
           when it supports the call (bfloat16 or float16, head dim a multiple of 8
           and at most 128, or 256 from Hopper on); XLA's attention everywhere else
           (CPU, TPU, other GPUs, float32). The choice is made when tracing.
  "xla"    `jax.nn.dot_product_attention(implementation="xla")`.
  "cudnn"  cuDNN flash attention, or an error where cuDNN cannot run it.

On TPUs "auto" is XLA's attention: JAX's Pallas TPU kernels (flash/splash attention)
want block-aligned token counts and were not adopted without a TPU to measure them.

cuDNN rejects token counts such as ViT-L/16's 901 at 480 px, so that path pads the
token axis to a multiple of 64 and passes the true length as the query and key/value
sequence lengths: padded keys get no weight and padded queries are dropped
(`padded_attention`, which any implementation can run).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn")
CUDNN_TOKEN_MULTIPLE = 64


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
  capability = _cuda_compute_capability()
  if capability is None or capability < (8, 0):
    return "xla"
  max_head_dim = 256 if capability >= (9, 0) else 128
  if (jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
      or head_dim % 8 or head_dim > max_head_dim):
    return "xla"
  return "cudnn"


def padded_attention(q, k, v, multiple: int, implementation: str = "cudnn"):
  """Attention over the token axis padded to a multiple of `multiple`, masked back.

  Args:
    q, k, v: [B, N, heads, head_dim].
    multiple: the padded token count is the next multiple of this.
    implementation: "xla" or "cudnn" (`jax.nn.dot_product_attention`).

  Returns:
    [B, N, heads, head_dim], equal to unpadded attention: the padded keys are
    excluded through `key_value_seq_lengths`, the padded queries sliced off.
  """
  b, n = q.shape[:2]
  pad = ((0, 0), (0, -n % multiple), (0, 0), (0, 0))
  q, k, v = (jnp.pad(t, pad) for t in (q, k, v))
  lengths = jnp.full((b,), n, jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out[:, :n]


def dot_product_attention(q, k, v, implementation: str = "auto"):
  """Softmax attention with scale 1/sqrt(head_dim), no mask.

  Args:
    q, k, v: [B, N, heads, head_dim].
    implementation: "auto" | "xla" | "cudnn" (see the module docstring).

  Returns:
    [B, N, heads, head_dim].
  """
  implementation = resolve(implementation, q.dtype, q.shape[-1])
  if implementation == "cudnn":
    return padded_attention(q, k, v, CUDNN_TOKEN_MULTIPLE, "cudnn")
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")


__all__ = ["CUDNN_TOKEN_MULTIPLE", "IMPLEMENTATIONS", "check_implementation",
           "dot_product_attention", "padded_attention", "resolve"]
