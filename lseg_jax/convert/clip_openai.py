"""OpenAI CLIP text tower <-> `CLIPTextTransformer`.

OpenAI's keys (`clip.load(...)` models, `.pt` TorchScript archives, and lang-seg's
`clip_pretrained.*`) name the same modules as ours, so the table is the identity
except for Linear weights, which are transposed.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from flax import nnx
import jax.numpy as jnp

from lseg_jax import langseg_layout as layout
from lseg_jax.convert import mapping
from lseg_jax.convert.mapping import (IDENTITY, TRANSPOSE, MappingTable, Rule, layer_norm,
                                      linear)
from lseg_jax.models import clip_text

_BLOCK = "transformer.resblocks.{i}."
_NNX_BLOCK = "transformer/resblocks/{i}/"


def _block_rules():
  rules = layer_norm(_NNX_BLOCK + "ln_1", _BLOCK + "ln_1")
  rules += layer_norm(_NNX_BLOCK + "ln_2", _BLOCK + "ln_2")
  rules += [Rule(f"{_NNX_BLOCK}attn/in_proj/kernel", f"{_BLOCK}attn.in_proj_weight", TRANSPOSE),
            Rule(f"{_NNX_BLOCK}attn/in_proj/bias", f"{_BLOCK}attn.in_proj_bias")]
  for name in ("attn/out_proj", "mlp/c_fc", "mlp/c_proj"):
    rules += linear(_NNX_BLOCK + name, _BLOCK + name.replace("/", "."))
  return rules


TABLE = MappingTable(
    rules=(
        Rule("token_embedding/embedding", "token_embedding.weight"),
        Rule("positional_embedding", "positional_embedding"),
        *_block_rules(),
        *layer_norm("ln_final", "ln_final"),
        Rule("text_projection", "text_projection", IDENTITY),
    ),
    # The image tower, the temperature, the scalars of OpenAI's TorchScript archives,
    # and the (constant) causal mask that traced towers store.
    ignore_torch=(r"visual\..*", "logit_scale", "input_resolution", "context_length",
                  "vocab_size", "attn_mask"),
)


def table(torch_prefix: str = "", nnx_prefix: str = "") -> MappingTable:
  """The OpenAI CLIP text table, e.g. `table("clip_pretrained.", "clip_pretrained/")`
  for lang-seg's LSegNet keys and our LSeg model."""
  return TABLE.prefixed(torch_prefix, nnx_prefix)


def find_prefix(state_dict: Mapping[str, Any]) -> str:
  """The key prefix of the OpenAI CLIP text tower in `state_dict` ("" for a bare
  CLIP model, "clip_pretrained." for lang-seg, "net.clip_pretrained." for its
  Lightning checkpoints)."""
  found = [k[:-len("token_embedding.weight")] for k in state_dict
           if k.endswith("token_embedding.weight")
           and k[:-len("token_embedding.weight")] + "positional_embedding" in state_dict]
  if len(found) != 1:
    sample = sorted(state_dict)[:10]
    raise ValueError(
        "expected exactly one OpenAI CLIP text tower (keys '<prefix>token_embedding.weight' "
        f"and '<prefix>positional_embedding'), found prefixes {found}; first keys: {sample}")
  return found[0]


def infer_config(state_dict: Mapping[str, Any], prefix: str = "", **overrides
                 ) -> clip_text.TextConfig:
  """TextConfig from the shapes of an OpenAI-layout state dict.

  Shapes do not tell the number of heads: it is width // 64, as in every OpenAI
  CLIP model, unless `heads=` is given in `overrides`.
  """
  required = [prefix + k for k in ("ln_final.weight", "text_projection",
                                   "token_embedding.weight", "positional_embedding")]
  if any(k not in state_dict for k in required):
    raise mapping.MappingError(missing=[k for k in required if k not in state_dict])
  layer_ids = {int(m.group(1)) for k in state_dict
               if (m := re.fullmatch(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\..*", k))}
  width = state_dict[prefix + "ln_final.weight"].shape[0]
  fields = dict(
      width=width,
      layers=len(layer_ids),
      heads=width // 64,
      embed_dim=state_dict[prefix + "text_projection"].shape[1],
      vocab_size=state_dict[prefix + "token_embedding.weight"].shape[0],
      context_length=state_dict[prefix + "positional_embedding"].shape[0],
  )
  return clip_text.TextConfig(**{**fields, **overrides})


def load_openai_clip_text(path_or_state_dict, model: clip_text.CLIPTextTransformer | None = None,
                          *, prefix: str | None = None, dtype: Any = jnp.float32,
                          heads: int | None = None) -> clip_text.CLIPTextTransformer:
  """Loads OpenAI-layout CLIP text weights.

  Args:
    path_or_state_dict: a `.pt` file (TorchScript archive from `clip.load`'s
      downloads, or a pickled state dict / Lightning checkpoint), a `.safetensors`
      file, or a state dict of numpy arrays or torch tensors.
    model: the tower to load into (in place); None builds one whose variant is
      inferred from the shapes (see `infer_config`).
    prefix: key prefix of the text tower; None finds it (see `find_prefix`).
    dtype: compute dtype of a built model (ignored when `model` is given).
    heads: attention heads of a built model; None: width // 64.

  Returns:
    the loaded model. Image-tower keys and `logit_scale` are ignored; any other
    key that does not fit raises a `mapping.MappingError` listing them all.
  """
  state_dict = layout.read_state_dict(path_or_state_dict)
  if prefix is None:
    prefix = find_prefix(state_dict)
  # Keys outside the text tower's prefix (the rest of an LSeg checkpoint) are not ours.
  state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
  if model is None:
    cfg = infer_config(state_dict, prefix, dtype=dtype, **({"heads": heads} if heads else {}))
    model = lambda: clip_text.CLIPTextTransformer(cfg, rngs=nnx.Rngs(0))
  return mapping.load_module(state_dict, table(prefix), model)


def export_openai_clip_text(model: clip_text.CLIPTextTransformer, prefix: str = ""
                            ) -> dict[str, Any]:
  """Our tower -> OpenAI CLIP text keys {prefix + key: np.ndarray float32}."""
  return mapping.nnx_to_torch(model, table(prefix))
