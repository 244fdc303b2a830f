"""lang-seg `LSegNet` state dict <-> our `LSeg`, both directions with one table.

Key layout of the official checkpoints (Lightning `.ckpt` files prefix every key
with `net.`):

  clip_pretrained.*                 OpenAI CLIP; the text tower maps onto our
                                    `clip_pretrained` (`convert.clip_openai`), the
                                    image tower (`visual.*`) and `logit_scale` are
                                    not part of LSeg's forward pass and are skipped
  pretrained.model.*                timm ViT (`convert.timm_vit`)
  pretrained.act_postprocessN.0.project.0.*   readout Linear    -> readout/project
  pretrained.act_postprocessN.3.*   1x1 Conv2d                  -> conv
  pretrained.act_postprocessN.4.*   ConvTranspose2d [I, O, k, k] or strided 3x3
                                    Conv2d                      -> resample
  scratch.layerN_rn.weight          3x3 Conv2d, no bias
  scratch.refinenetN.resConfUnitU.{conv1,conv2,bn1,bn2}.*, .out_conv.*
                                    BatchNorm running_mean/var/num_batches_tracked
                                    <-> our BatchStats mean/var/num_batches_tracked
  scratch.head1.*                   1x1 Conv2d to the text width
  scratch.head_block.depthwise.depthwise.{weight [1,1,3,3], bias [1]}
                                    <-> SpatialRegularization kernel [3,3], bias []

The zero-shot ResNet model (`LSegRNNetZS`, backbone `clip_resnet101`) has the same
`clip_pretrained.*` and `scratch.*`, and instead of the ViT and its reassemble stages
  pretrained.layer1.{0,1}.*         torchvision ResNet's conv1, bn1
  pretrained.layer1.4.I.*, pretrained.layer{2,3,4}.I.*
                                    its Bottleneck blocks (`convert.torchvision_resnet`,
                                    "langseg" layout) -> pretrained/model/*
The zero-shot ViT model (`LSegNetZS`) has exactly `LSegNet`'s layout (arch_option 0).

Reading checkpoint files, the key prefixes (the ResNet's included) and what the shapes
tell about the model are `lseg_jax.langseg_layout`'s, shared with the PyTorch LSeg;
shapes do not tell which spatial-regularisation head a checkpoint has, how deep, or
its activation: those come from its metadata or from the caller (`infer_config`).
"""
from __future__ import annotations

import dataclasses
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


# ---------------------------------------------------------------------------
# Config inference.
# ---------------------------------------------------------------------------
def _image_shapes(image_variant: str) -> dict[str, Any]:
  """The `langseg_layout.VIT_SHAPES` or `RESNET_SHAPES` of an image encoder variant."""
  if image_variant in resnet.RESNET_VARIANTS:
    return dict(resnet_blocks=tuple(resnet.RESNET_VARIANTS[image_variant]))
  v = vit.VIT_VARIANTS[image_variant]
  return dict(vit_width=v["width"], patch=v["patch"], depth=v["depth"])


# What identifies each backbone in its weights (`langseg_layout.find_backbone`).
_BACKBONE_SHAPES = {
    name: dict(_image_shapes(image), text_width=clip_text.TEXT_VARIANTS[t]["width"],
               text_dim=clip_text.TEXT_VARIANTS[t]["embed_dim"])
    for name, (image, t) in lseg.BACKBONES.items()}
# LSegConfig fields that are checkpoint settings under the same name.
_MODEL_SETTINGS = tuple(layout.HPARAMS.values())


def infer_config(state_dict: Mapping[str, Any], metadata: Mapping[str, Any] | None = None,
                 **overrides) -> lseg.LSegConfig:
  """The LSegConfig of an LSegNet state dict.

  `overrides` are LSegConfig fields (None values ignored); the model's settings come
  from them, the metadata and the shapes as `langseg_layout.infer_settings` says.

  Raises:
    ValueError naming what cannot be told and how to pass it.
  """
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
  fields = {f.name for f in dataclasses.fields(lseg.LSegConfig)}
  return lseg.LSegConfig(**{k: v for k, v in settings.items() if k in fields and v is not None})


# ---------------------------------------------------------------------------
# Import / export.
# ---------------------------------------------------------------------------
def load_langseg(path_or_state_dict, config: lseg.LSegConfig | None = None, *,
                 metadata: Mapping[str, Any] | None = None, weights_only: bool = True,
                 **overrides) -> lseg.LSeg:
  """Builds our LSeg from an LSegNet checkpoint (in eval mode).

  Args:
    path_or_state_dict: a checkpoint file (see `read_checkpoint`), or a state dict of
      numpy arrays / torch tensors in the LSegNet layout (with or without `net.`).
    config: the model config; None infers it (`infer_config`) from `metadata`, the
      file's own metadata, `overrides` and the shapes.
    weights_only: passed to `torch.load` for files.

  Raises:
    mapping.MappingError listing every unknown, missing and mis-shaped key.
  """
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
              arch_option=cfg.arch_option, block_depth=cfg.block_depth,
              activation=cfg.activation, vocab_size=cfg.text_vocab_size or text.vocab_size,
              context_length=text.context_length)


def export_langseg(model: lseg.LSeg) -> dict[str, np.ndarray]:
  """Our LSeg -> {LSegNet key: np.ndarray} (float32; BatchNorm counters int64).

  Has every key of the official LSegNet except `clip_pretrained.visual.*` and
  `clip_pretrained.logit_scale` (CLIP's image side; see `add_clip_image_tower`).
  """
  return mapping.nnx_to_torch(model, table_for(model.cfg))


def add_clip_image_tower(state_dict: Mapping[str, np.ndarray],
                         clip_state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Adds `clip_pretrained.visual.*` and `clip_pretrained.logit_scale` from an OpenAI
  CLIP state dict, so that the official LSegNet loads the result strictly.

  The CLIP model must be the one whose text tower LSeg uses (ViT-B/32, or RN50x16
  for clipRN50x16_vitl16_384): its text projection must have our shape.
  """
  clip_sd = layout.numpy_state_dict(clip_state_dict)
  prefix = clip_openai.find_prefix(clip_sd)
  ours, theirs = (state_dict[CLIP_PREFIX + "text_projection"],
                  clip_sd[prefix + "text_projection"])
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
  """Writes `state_dict` as torch tensors with `torch.save`, atomically.

  The file is {"state_dict": ..., "lseg_config": {...}} (Lightning's wrapper layout,
  keys without `net.`) unless `bare`, then the state dict alone. Floating arrays whose
  key starts with one of `half_prefixes` are stored as float16.
  """
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
