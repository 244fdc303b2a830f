"""timm `VisionTransformer` state dict <-> our `models.vit.VisionTransformer`.

Our ViT names its modules as timm does (`patch_embed.proj`, `blocks.N.attn.qkv`,
`blocks.N.mlp.fc1`, `norm`, `head`), so the table is the identity up to layouts:
Linear weights [out, in] <-> kernels [in, out], the patch-embedding Conv2d
[O, I, kH, kW] <-> [kH, kW, I, O], and LayerNorm `weight` <-> `scale`.

The same table, prefixed with `pretrained.model.`, is the ViT part of lang-seg's
`LSegNet` checkpoints (`lseg_jax.convert.langseg`).
"""
from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

from lseg_jax.convert import mapping
from lseg_jax.convert.mapping import MappingTable, Rule, conv, layer_norm, linear
from lseg_jax.models import vit

_BLOCK = "blocks.{i}."
_NNX_BLOCK = "blocks/{i}/"


TABLE = MappingTable(rules=(
    Rule("cls_token", "cls_token"),
    Rule("pos_embed", "pos_embed"),
    *conv("patch_embed/proj", "patch_embed.proj"),
    *mapping.block_rules(_NNX_BLOCK, _BLOCK, ("norm1", "norm2"),
                         ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2")),
    *layer_norm("norm", "norm"),
    *linear("head", "head"),
))


def table(torch_prefix: str = "", nnx_prefix: str = "", *, head: bool = True) -> MappingTable:
  """The timm ViT table, e.g. `table("pretrained.model.", "pretrained/model/")` for
  lang-seg's LSegNet keys and our LSeg model.

  head=False is for a ViT built with `num_classes=0`: a checkpoint's classifier
  (`head.*`) is then skipped on import.
  """
  base = TABLE
  if not head:
    base = MappingTable(tuple(r for r in TABLE.rules if not r.nnx.startswith("head/")),
                        ignore_torch=(r"head\..*",))
  return base.prefixed(torch_prefix, nnx_prefix)


def find_prefix(state_dict: Mapping[str, Any]) -> str:
  """The key prefix of the timm ViT in `state_dict` ("" for a bare timm model,
  "pretrained.model." for lang-seg, "net.pretrained.model." for its Lightning
  checkpoints, "model." for some training wrappers)."""
  return mapping.find_prefix(state_dict, "cls_token", "pos_embed", "timm ViT")


def load_timm_vit(path_or_state_dict, vit_module: vit.VisionTransformer | vit.ViTConfig | str,
                  *, prefix: str | None = None) -> vit.VisionTransformer:
  """Loads timm ViT weights (a state dict or any file `langseg_layout.read_state_dict`
  reads; lang-seg checkpoints too: prefix None finds the ViT) into `vit_module`, our ViT
  updated in place, or one built from a `vit.ViTConfig` or variant name ("L/16") without
  initialising it. MappingError lists every missing, unknown and mis-shaped key."""
  state_dict, prefix = mapping.read_under_prefix(path_or_state_dict, prefix, find_prefix)
  if isinstance(vit_module, vit.VisionTransformer):
    return mapping.load_module(state_dict, table(prefix, head=vit_module.head is not None),
                               vit_module)
  cfg = vit.decode_variant(vit_module) if isinstance(vit_module, str) else vit_module
  if not isinstance(cfg, vit.ViTConfig):
    raise TypeError(f"vit_module must be a VisionTransformer, ViTConfig or variant name, "
                    f"got {type(vit_module).__name__}")
  return mapping.load_module(state_dict, table(prefix, head=bool(cfg.num_classes)),
                             lambda: vit.VisionTransformer(cfg, rngs=nnx.Rngs(0)))


def export_timm_vit(vit_module: vit.VisionTransformer, prefix: str = "") -> dict[str, Any]:
  """Our ViT -> timm keys {prefix + key: np.ndarray float32}."""
  return mapping.nnx_to_torch(vit_module, table(prefix, head=vit_module.head is not None))
