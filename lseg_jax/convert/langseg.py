"""lang-seg `LSegNet` state dict <-> our `LSeg`, both directions with one table.

The official key layout is `lseg_jax.langseg_layout`'s (shared with the PyTorch LSeg,
with reading files and inferring settings from shapes); this module holds the table,
made of the CLIP text tower's (`convert.clip_openai`), the timm ViT's (`convert.timm_vit`)
or lang-seg's ResNet's (`convert.torchvision_resnet`, "langseg" layout) and the decoder's
rules below. Key by key: docs/interop.md, "Key layout".
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

from flax import nnx
import numpy as np

from lseg_jax import langseg_layout as layout
from lseg_jax.convert import clip_openai, mapping, timm_vit, torchvision_resnet
from lseg_jax.convert.mapping import CONV, MappingTable, Rule
from lseg_jax.langseg_layout import (CLIP_PREFIX, RESNET_PREFIX, VIT_PREFIX, check_layout,
                                     read_checkpoint)
from lseg_jax.models import clip_text, dpt, lseg, resnet, vit

# nn.ConvTranspose2d weight [Cin, Cout, k, k] <-> ConvTransposeKxK kernel [k, k, Cin, Cout].
DECONV = mapping.permute((2, 3, 0, 1), "deconv_iokk_kkio")


def _reassemble_rules(level: int, resample: tuple) -> list[Rule]:
  t, n = f"pretrained.act_postprocess{level}.", f"pretrained/act_postprocess{level}/"
  rules = mapping.linear(n + "readout/project", t + "0.project.0")
  rules += mapping.conv(n + "conv", t + "3")
  if resample[0] != "none":
    rules += mapping.conv(n + "resample", t + "4", DECONV if resample[0] == "deconv" else CONV)
  return rules


def _scratch_rules() -> list[Rule]:
  unit = "scratch/refinenet{i}/resConfUnit{u}/"
  torch_unit = "scratch.refinenet{i}.resConfUnit{u}."
  rules = [Rule("scratch/layer{i}_rn/kernel", "scratch.layer{i}_rn.weight", CONV)]
  for c in (1, 2):
    rules.append(Rule(f"{unit}conv{c}/kernel", f"{torch_unit}conv{c}.weight", CONV))
    rules += mapping.batch_norm(f"{unit}bn{c}", f"{torch_unit}bn{c}")
  rules += mapping.conv("scratch/refinenet{i}/out_conv", "scratch.refinenet{i}.out_conv")
  rules += mapping.conv("scratch/head1", "scratch.head1")
  rules += [Rule("scratch/head_block/kernel", layout.HEAD_BLOCK_WEIGHT,
                 mapping.reshape((1, 1, 3, 3), (3, 3))),
            Rule("scratch/head_block/bias", "scratch.head_block.depthwise.depthwise.bias",
                 mapping.reshape((1,), ()))]
  return rules


def table(patch: int) -> MappingTable:
  """The LSegNet table for a ViT with patch size 16 or 32 (they differ in how the
  reassemble levels resample: `dpt.REASSEMBLE`)."""
  if patch not in dpt.REASSEMBLE:
    raise ValueError(f"no lang-seg decoder for ViT patch size {patch}; expected one of "
                     f"{sorted(dpt.REASSEMBLE)}")
  rules = [r for level, style in enumerate(dpt.REASSEMBLE[patch], 1)
           for r in _reassemble_rules(level, style)]
  return (clip_openai.table(CLIP_PREFIX, "clip_pretrained/")
          + timm_vit.table(VIT_PREFIX, "pretrained/model/")
          + MappingTable(tuple(rules + _scratch_rules())))


def resnet_table() -> MappingTable:
  """The `LSegRNNetZS` table (ResNet image encoder; any depth)."""
  return (clip_openai.table(CLIP_PREFIX, "clip_pretrained/")
          + torchvision_resnet.table(RESNET_PREFIX, "pretrained/model/", layout="langseg")
          + MappingTable(tuple(_scratch_rules())))


def table_for(cfg: lseg.LSegConfig) -> MappingTable:
  if cfg.image_encoder == "resnet":
    return resnet_table()
  return table(vit.VIT_VARIANTS[cfg.vit_variant]["patch"])


# --- Config inference ---
# What identifies each backbone in its weights (`langseg_layout.find_backbone`).
_BACKBONE_SHAPES = {
    name: layout.variant_shapes(vit.VIT_VARIANTS.get(image), resnet.RESNET_VARIANTS.get(image),
                                clip_text.TEXT_VARIANTS[t])
    for name, (image, t) in lseg.BACKBONES.items()}
# LSegConfig fields that are checkpoint settings under the same name.
_MODEL_SETTINGS = tuple(layout.HPARAMS.values())


def infer_config(state_dict: Mapping[str, Any], metadata: Mapping[str, Any] | None = None,
                 **overrides) -> lseg.LSegConfig:
  """The LSegConfig of an LSegNet state dict, from `overrides` (LSegConfig fields, None
  ignored), the metadata and the shapes (`langseg_layout.infer_settings`)."""
  check_layout(state_dict)
  settings = layout.infer_settings(
      state_dict, metadata, _BACKBONE_SHAPES,
      **{k: v for k, v in overrides.items() if k in _MODEL_SETTINGS})
  vocab = settings.pop("vocab_size", None)
  settings.update({k: v for k, v in overrides.items()
                   if k not in _MODEL_SETTINGS and v is not None})
  # Values equal to the backbone's defaults are stored as None, as a freshly
  # built config has them, so that a round trip reproduces the config exactly.
  default = lseg.LSegConfig(backbone=settings["backbone"])
  if settings.get("features") == default.num_features:
    settings["features"] = None
  text_variant = lseg.BACKBONES[settings["backbone"]][1]
  if ("text_vocab_size" not in settings and vocab is not None
      and vocab != clip_text.decode_variant(text_variant).vocab_size):
    settings["text_vocab_size"] = vocab
  return lseg.LSegConfig(**{k: v for k, v in settings.items()
                            if k in lseg.FIELDS and v is not None})


# --- Import / export ---
def load_langseg(path_or_state_dict, config: lseg.LSegConfig | None = None, *,
                 metadata: Mapping[str, Any] | None = None, weights_only: bool = True,
                 **overrides) -> lseg.LSeg:
  """Our LSeg (in eval mode) from an LSegNet checkpoint file (`read_checkpoint`) or state
  dict; `config` None: `infer_config` of the metadata, `overrides` and the shapes."""
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    state_dict, file_meta = read_checkpoint(path_or_state_dict, weights_only=weights_only)
    metadata = {**file_meta, **(metadata or {})}
  else:
    state_dict, _ = layout.split_checkpoint(path_or_state_dict)
    state_dict = layout.numpy_state_dict(state_dict)
  check_layout(state_dict, os.fspath(path_or_state_dict)
               if isinstance(path_or_state_dict, (str, os.PathLike)) else "state dict")
  if config is None:
    config = infer_config(state_dict, metadata, **overrides)
  model = mapping.load_module(state_dict, table_for(config),
                              lambda: lseg.LSeg(config, rngs=nnx.Rngs(0)))
  model.eval()
  return model


def torch_config(cfg: lseg.LSegConfig) -> dict[str, Any]:
  """The `lseg_config` metadata our exporter writes (`TorchLSegConfig` fields)."""
  text = clip_text.decode_variant(cfg.text_variant)
  return dict(backbone=cfg.backbone, features=cfg.num_features, readout=cfg.readout,
              arch_option=cfg.arch_option, block_depth=cfg.block_depth, activation=cfg.activation,
              vocab_size=cfg.text_vocab_size or text.vocab_size, context_length=text.context_length)


def export_langseg(model: lseg.LSeg) -> dict[str, np.ndarray]:
  """Our LSeg -> {LSegNet key: np.ndarray}: every key but CLIP's image side
  (`add_clip_image_tower`)."""
  return mapping.nnx_to_torch(model, table_for(model.cfg))


def add_clip_image_tower(state_dict: Mapping[str, np.ndarray],
                         clip_state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Adds CLIP's image side (`clip_pretrained.visual.*`, `.logit_scale`) from the OpenAI
  CLIP model whose text tower LSeg uses, so that the official LSegNet loads strictly."""
  clip_sd = layout.numpy_state_dict(clip_state_dict)
  prefix = clip_openai.find_prefix(clip_sd)
  ours, theirs = state_dict[CLIP_PREFIX + "text_projection"], clip_sd[prefix + "text_projection"]
  if ours.shape != theirs.shape:
    raise ValueError(
        f"the CLIP checkpoint's text projection is {tuple(theirs.shape)} but the LSeg model's "
        f"is {tuple(ours.shape)}: it is not the CLIP model LSeg's text tower comes from")
  image = {CLIP_PREFIX + k[len(prefix):]: np.asarray(v, np.float32) for k, v in clip_sd.items()
           if k.startswith(prefix + "visual.") or k == prefix + "logit_scale"}
  if not any(k.startswith(CLIP_PREFIX + "visual.") for k in image):
    raise ValueError("the CLIP checkpoint has no image tower (keys 'visual.*')")
  return {**state_dict, **image}


def write_torch_checkpoint(path, state_dict: Mapping[str, np.ndarray], *,
                           lseg_config: Mapping[str, Any] | None = None,
                           half_prefixes: tuple[str, ...] = (), bare: bool = False) -> None:
  """`torch.save` of {"state_dict": tensors, "lseg_config": {...}} (or the tensors alone
  if `bare`), atomically; floats under `half_prefixes` as float16, others float32."""
  import torch  # pylint: disable=g-import-not-at-top
  tensors = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.floating):
      value = value.astype(np.float16 if key.startswith(half_prefixes) else np.float32)
    # Not np.ascontiguousarray: it turns 0-d arrays (BatchNorm counters) into 1-d.
    # torch.from_numpy wants writable arrays (views of jax arrays are read-only).
    if not (value.flags.c_contiguous and value.flags.writeable):
      value = value.copy()
    tensors[key] = torch.from_numpy(value)
  obj = tensors if bare else {"state_dict": tensors, "lseg_config": dict(lseg_config or {})}
  path = os.path.abspath(os.fspath(path))
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.",
                             suffix=".tmp")
  os.close(fd)
  try:
    torch.save(obj, tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
