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

from lseg_jax.convert import mapping
from lseg_jax.convert.mapping import IDENTITY, TRANSPOSE, MappingTable, Rule, layer_norm
from lseg_jax.models import clip_text

_BLOCK = "transformer.resblocks.{i}."
_NNX_BLOCK = "transformer/resblocks/{i}/"


def _block_rules():
  return [Rule(f"{_NNX_BLOCK}attn/in_proj/kernel", f"{_BLOCK}attn.in_proj_weight", TRANSPOSE),
          Rule(f"{_NNX_BLOCK}attn/in_proj/bias", f"{_BLOCK}attn.in_proj_bias"),
          *mapping.block_rules(_NNX_BLOCK, _BLOCK, ("ln_1", "ln_2"),
                               ("attn/out_proj", "mlp/c_fc", "mlp/c_proj"))]


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
  """The key prefix of the OpenAI CLIP text tower in `state_dict` ("" for a bare CLIP model,
  "clip_pretrained." for lang-seg, "net.clip_pretrained." for its Lightning checkpoints)."""
  return mapping.find_prefix(state_dict, "token_embedding.weight", "positional_embedding",
                             "OpenAI CLIP text tower")


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
  """Loads OpenAI-layout CLIP text weights (a state dict or any file
  `langseg_layout.read_state_dict` reads: `clip.load`'s TorchScript archives, lang-seg
  checkpoints; prefix None: found) into `model` in place, or into one built from the
  shapes (`infer_config`; `dtype`, `heads`). Image-tower keys and `logit_scale` are
  ignored; MappingError lists every other key that does not fit."""
  state_dict, prefix = mapping.read_under_prefix(path_or_state_dict, prefix, find_prefix)
  if model is None:
    cfg = infer_config(state_dict, prefix, dtype=dtype, **({"heads": heads} if heads else {}))
    model = lambda: clip_text.CLIPTextTransformer(cfg, rngs=nnx.Rngs(0))
  return mapping.load_module(state_dict, table(prefix), model)


def export_openai_clip_text(model: clip_text.CLIPTextTransformer, prefix: str = ""
                            ) -> dict[str, Any]:
  """Our tower -> OpenAI CLIP text keys {prefix + key: np.ndarray float32}."""
  return mapping.nnx_to_torch(model, table(prefix))
