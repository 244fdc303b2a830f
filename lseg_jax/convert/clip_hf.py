"""Hugging Face CLIP text tower <-> `CLIPTextTransformer`.

Reads the `model.safetensors` + `config.json` of a `CLIPModel` or `CLIPTextModelWithProjection` with
safetensors' numpy API (no torch). Hugging Face keeps q, k and v as separate Linears; our tower
fuses them into `in_proj`, so those three keys map to one parameter (and split again on export).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from flax import nnx
import jax.numpy as jnp

from lseg_jax import langseg_layout as layout
from lseg_jax.convert import mapping
from lseg_jax.convert.mapping import TRANSPOSE, MappingTable, Rule, concat, layer_norm
from lseg_jax.models import clip_text

_LAYER = "text_model.encoder.layers.{i}."
_NNX_BLOCK = "transformer/resblocks/{i}/"


def _layer_rules():
  attn = _LAYER + "self_attn."
  rules = [
      Rule(_NNX_BLOCK + "attn/in_proj/kernel",
           tuple(f"{attn}{p}_proj.weight" for p in "qkv"), concat(3, 0, then=TRANSPOSE)),
      Rule(_NNX_BLOCK + "attn/in_proj/bias",
           tuple(f"{attn}{p}_proj.bias" for p in "qkv"), concat(3, 0)),
  ]
  return rules + mapping.block_rules(
      _NNX_BLOCK, _LAYER, (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")),
      (("attn/out_proj", "self_attn.out_proj"), ("mlp/c_fc", "mlp.fc1"),
       ("mlp/c_proj", "mlp.fc2")))


TABLE = MappingTable(
    rules=(
        Rule("token_embedding/embedding", "text_model.embeddings.token_embedding.weight"),
        Rule("positional_embedding", "text_model.embeddings.position_embedding.weight"),
        *_layer_rules(),
        *layer_norm("ln_final", "text_model.final_layer_norm"),
        # nn.Linear(width, embed, bias=False) [D, W] <-> text_projection [W, D].
        Rule("text_projection", "text_projection.weight", TRANSPOSE),
    ),
    ignore_torch=(r"vision_model\..*", r"visual_projection\..*", "logit_scale",
                  r"text_model\.embeddings\.position_ids"),
)


def table(torch_prefix: str = "", nnx_prefix: str = "") -> MappingTable:
  return TABLE.prefixed(torch_prefix, nnx_prefix)


def text_config_from_hf(config: Mapping[str, Any], **overrides) -> clip_text.TextConfig:
  """TextConfig from a `CLIPModel` / `CLIPTextConfig` config.json dict.

  Raises ValueError for text towers this layout cannot express (another
  activation, MLP ratio or LayerNorm epsilon).
  """
  # Missing fields take the transformers defaults (the ViT-B/32 text tower). A CLIPModel
  # nests the text fields under "text_config"; its own projection_dim sizes text_projection.
  text, projection_dim = config.get("text_config", config), config.get("projection_dim", 512)
  width = text.get("hidden_size", 512)
  checks = {"hidden_act": (text.get("hidden_act", "quick_gelu"), "quick_gelu"),
            "intermediate_size": (text.get("intermediate_size", 2048), 4 * width),
            "layer_norm_eps": (text.get("layer_norm_eps", 1e-5), 1e-5)}
  for name, (value, expected) in checks.items():
    if value != expected:
      raise ValueError(f"CLIP text config has {name}={value!r}; the OpenAI-layout tower "
                       f"supports only {expected!r}")
  fields = dict(width=width, layers=text.get("num_hidden_layers", 12),
                heads=text.get("num_attention_heads", 8), embed_dim=projection_dim,
                vocab_size=text.get("vocab_size", 49408),
                context_length=text.get("max_position_embeddings", 77))
  return clip_text.TextConfig(**{**fields, **overrides})


def read_hf_checkpoint(path) -> tuple[dict[str, Any], dict[str, Any]]:
  """A Hugging Face model folder (or its `.safetensors` file, config.json beside it)
  -> (config dict, {key: np.ndarray}). Sharded checkpoints (`*.index.json`) work too."""
  path = os.fspath(path)
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  config_file = os.path.join(folder, "config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"no config.json in {folder!r} (expected a Hugging Face CLIP folder)")
  with open(config_file) as f:
    config = json.load(f)
  if not os.path.isdir(path):
    files = [path]
  elif os.path.isfile(index := os.path.join(path, "model.safetensors.index.json")):
    with open(index) as f:
      files = [os.path.join(path, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
  else:
    files = [os.path.join(path, "model.safetensors")]
  state_dict = {}
  for file in files:
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{file!r} does not exist (only safetensors checkpoints are read)")
    state_dict.update(layout.load_state_dict_file(file))
  return config, state_dict


def load_hf_clip_text(path_or_state_dict, model: clip_text.CLIPTextTransformer | None = None,
                      *, config: Mapping[str, Any] | None = None, prefix: str = "",
                      dtype: Any = jnp.float32) -> clip_text.CLIPTextTransformer:
  """Loads Hugging Face CLIP text weights (a model folder, or a state dict with its
  config.json dict `config`; keys under `prefix`) into `model` in place, or into one
  built from the config. Our tower pools at the largest token id, which equals Hugging
  Face's pooling at the first end-of-text token whenever end-of-text is the largest id (CLIP's
  49407) or the config keeps the legacy `eos_token_id=2` (argmax) behaviour.
  """
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    file_config, state_dict = read_hf_checkpoint(path_or_state_dict)
    config = config or file_config
  else:
    state_dict = layout.numpy_state_dict(path_or_state_dict)
  state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
  if model is None:
    if config is None:
      raise ValueError("building the tower from a state dict needs `config` (config.json dict)")
    cfg = text_config_from_hf(config, dtype=dtype)
    model = lambda: clip_text.CLIPTextTransformer(cfg, rngs=nnx.Rngs(0))
  return mapping.load_module(state_dict, table(prefix), model)


def export_hf_clip_text(model: clip_text.CLIPTextTransformer, prefix: str = "") -> dict[str, Any]:
  """Our tower -> Hugging Face `CLIPTextModelWithProjection` keys {key: np.ndarray}."""
  return mapping.nnx_to_torch(model, table(prefix))
