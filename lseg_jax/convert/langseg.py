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

Shapes tell the backbone (ViT width and patch or ResNet depth, text width), the decoder width and
whether a spatial-regularisation head exists, but not which one (bottleneck and
depthwise blocks hold the same conv), how deep, or its activation: those come from
the checkpoint's metadata or from the caller (`infer_config`).
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import tempfile
from typing import Any, Mapping

from flax import nnx
import numpy as np

from lseg_jax.convert import clip_openai, mapping, timm_vit, torchvision_resnet
from lseg_jax.convert.mapping import CONV, TRANSPOSE, MappingTable, Rule
from lseg_jax.models import clip_text, dpt, lseg, vit

LIGHTNING_PREFIX = "net."
CLIP_PREFIX = "clip_pretrained."
VIT_PREFIX = "pretrained.model."
RESNET_PREFIX = "pretrained."  # then layer1.0 (conv1), layer1.1 (bn1), layer1.4.I, layer2.I, ...
_RESNET_STEM = RESNET_PREFIX + "layer1.0.weight"
_HEAD_BLOCK_WEIGHT = "scratch.head_block.depthwise.depthwise.weight"
_PROJECT_READOUT = "pretrained.act_postprocess1.0.project.0.weight"

# nn.ConvTranspose2d weight [Cin, Cout, k, k] <-> ConvTransposeKxK kernel [k, k, Cin, Cout].
DECONV = mapping.permute((2, 3, 0, 1), "deconv_iokk_kkio")
INT64 = mapping.INT64


def _reassemble_rules(level: int, resample: tuple) -> list[Rule]:
  t, n = f"pretrained.act_postprocess{level}.", f"pretrained/act_postprocess{level}/"
  rules = [Rule(n + "readout/project/kernel", t + "0.project.0.weight", TRANSPOSE),
           Rule(n + "readout/project/bias", t + "0.project.0.bias"),
           Rule(n + "conv/kernel", t + "3.weight", CONV),
           Rule(n + "conv/bias", t + "3.bias")]
  if resample[0] != "none":
    rules += [Rule(n + "resample/kernel", t + "4.weight",
                   DECONV if resample[0] == "deconv" else CONV),
              Rule(n + "resample/bias", t + "4.bias")]
  return rules


def _scratch_rules() -> list[Rule]:
  unit = "scratch/refinenet{i}/resConfUnit{u}/"
  torch_unit = "scratch.refinenet{i}.resConfUnit{u}."
  rules = [Rule("scratch/layer{i}_rn/kernel", "scratch.layer{i}_rn.weight", CONV)]
  for c in (1, 2):
    bn, torch_bn = f"{unit}bn{c}/", f"{torch_unit}bn{c}."
    rules += [Rule(f"{unit}conv{c}/kernel", f"{torch_unit}conv{c}.weight", CONV),
              Rule(bn + "scale", torch_bn + "weight"),
              Rule(bn + "bias", torch_bn + "bias"),
              Rule(bn + "mean", torch_bn + "running_mean"),
              Rule(bn + "var", torch_bn + "running_var"),
              Rule(bn + "num_batches_tracked", torch_bn + "num_batches_tracked", INT64)]
  rules += [Rule("scratch/refinenet{i}/out_conv/kernel", "scratch.refinenet{i}.out_conv.weight",
                 CONV),
            Rule("scratch/refinenet{i}/out_conv/bias", "scratch.refinenet{i}.out_conv.bias"),
            Rule("scratch/head1/kernel", "scratch.head1.weight", CONV),
            Rule("scratch/head1/bias", "scratch.head1.bias"),
            Rule("scratch/head_block/kernel", _HEAD_BLOCK_WEIGHT,
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
# Reading checkpoints.
# ---------------------------------------------------------------------------
def split_checkpoint(obj: Any, where: str = "checkpoint") -> tuple[dict[str, Any], dict[str, Any]]:
  """A loaded checkpoint object -> (LSegNet state dict, metadata).

  Accepts a bare state dict, or a dict holding it under "state_dict" (Lightning
  `.ckpt` files, with `net.`-prefixed keys, and our exporter's wrapper). Metadata
  are the wrapper's other JSON-like entries: "lseg_config", "hyper_parameters",
  "epoch", "global_step". Keys outside `net.` of a Lightning checkpoint (losses,
  metrics) are dropped.
  """
  if not isinstance(obj, Mapping):
    raise ValueError(f"{where}: expected a state dict or a dict with a 'state_dict' entry, "
                     f"got a {type(obj).__name__}")
  meta = {}
  state_dict = obj
  if isinstance(obj.get("state_dict"), Mapping):
    state_dict = obj["state_dict"]
    for key in ("lseg_config", "hyper_parameters"):
      if isinstance(obj.get(key), Mapping):
        meta[key] = dict(obj[key])
    for key in ("epoch", "global_step"):
      if isinstance(obj.get(key), (int, np.integer)):
        meta[key] = int(obj[key])
  if any(k.startswith(LIGHTNING_PREFIX) for k in state_dict):
    state_dict = {k[len(LIGHTNING_PREFIX):]: v for k, v in state_dict.items()
                  if k.startswith(LIGHTNING_PREFIX)}
  arrays = {k: v for k, v in state_dict.items() if hasattr(v, "shape")}
  if not arrays:
    raise ValueError(f"{where}: holds no arrays; expected an LSegNet state dict "
                     f"(keys like '{VIT_PREFIX}cls_token' or '{_RESNET_STEM}'), got keys "
                     f"{sorted(state_dict)[:10]}")
  return mapping.numpy_state_dict(arrays), meta


def read_checkpoint(path, *, weights_only: bool = True
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads an LSegNet checkpoint file -> (state dict of numpy arrays, metadata).

  `.safetensors` files hold a bare state dict and need no torch. Anything else is
  read with `torch.load`: a Lightning `.ckpt`, a pickled state dict, or our
  exporter's wrapper (see `split_checkpoint`). `weights_only=False` unpickles
  arbitrary objects: only for files you trust.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
  if path.endswith(".safetensors"):
    try:
      return split_checkpoint(mapping.load_state_dict_file(path), path)
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, ValueError) and "holds no arrays" in str(e):
        raise
      raise ValueError(f"could not read {path!r} as safetensors ({type(e).__name__}: {e}); "
                       "is the file complete?") from e
  import torch  # pylint: disable=g-import-not-at-top
  try:
    obj = torch.load(path, map_location="cpu", weights_only=weights_only)
  except pickle.UnpicklingError as e:
    if not weights_only:
      raise ValueError(f"could not unpickle {path!r} ({e}); is the file complete?") from e
    raise ValueError(
        f"torch.load(weights_only=True) refused {path!r}: it pickles objects other than "
        f"tensors ({e}). If you trust the file, allow arbitrary pickles (weights_only=False; "
        "tools/convert.py: --trust-pickle)") from e
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"could not read {path!r} with torch.load ({type(e).__name__}: {e}); "
                     "is it a complete PyTorch checkpoint file?") from e
  return split_checkpoint(obj, path)


# ---------------------------------------------------------------------------
# Config inference.
# ---------------------------------------------------------------------------
# lang-seg's hyper-parameter names -> LSegConfig fields.
_HPARAMS = {"backbone": "backbone", "num_features": "features", "readout": "readout",
            "arch_option": "arch_option", "block_depth": "block_depth",
            "activation": "activation"}
# `lseg_config` metadata (`torch_lseg.TorchLSegConfig` names) -> LSegConfig fields.
_TORCH_CONFIG = {"backbone": "backbone", "features": "features", "readout": "readout",
                 "arch_option": "arch_option", "block_depth": "block_depth",
                 "activation": "activation"}


def is_resnet(state_dict: Mapping[str, Any]) -> bool:
  """Whether an LSegNet-like state dict has lang-seg's ResNet encoder (`LSegRNNetZS`)."""
  return _RESNET_STEM in state_dict


def check_layout(state_dict: Mapping[str, Any], where: str = "checkpoint") -> None:
  """Raises a ValueError unless `state_dict` looks like an LSegNet (keys under both
  `pretrained.model.` and `scratch.`) or an LSegRNNetZS (`pretrained.layer1.0.weight`
  and `scratch.`)."""
  image_prefix = RESNET_PREFIX + "layer1." if is_resnet(state_dict) else VIT_PREFIX
  groups = {p: any(k.startswith(p) for k in state_dict) for p in (image_prefix, "scratch.")}
  if not all(groups.values()):
    if "cls_token" in state_dict and "pos_embed" in state_dict:
      hint = " (it looks like a bare timm ViT: load it with convert.timm_vit.load_timm_vit)"
    elif "conv1.weight" in state_dict and "layer1.0.conv1.weight" in state_dict:
      hint = (" (it looks like a bare torchvision ResNet: load it with "
              "convert.torchvision_resnet.load_torchvision_resnet)")
    else:
      hint = ""
    raise ValueError(
        f"{where} is not an LSegNet state dict: it has no keys under "
        f"{[p for p, ok in groups.items() if not ok]}{hint}; first keys: "
        f"{sorted(state_dict)[:10]}")


def _infer_backbone(state_dict: Mapping[str, Any]) -> str:
  if is_resnet(state_dict):
    resnet_variant = torchvision_resnet.infer_variant(state_dict, RESNET_PREFIX, "langseg")
    image = f"a ResNet of {resnet_variant}'s depth"
    matches = lambda variant: variant == resnet_variant
  else:
    shapes = timm_vit.infer_variant(state_dict, VIT_PREFIX)
    image = (f"a ViT of width {shapes['width']}, patch {shapes['patch']}, depth "
             f"{shapes['depth']}")

    def matches(variant):
      v = vit.VIT_VARIANTS.get(variant)
      return v is not None and (v["width"], v["patch"], v["depth"]) == (
          shapes["width"], shapes["patch"], shapes["depth"])
  if CLIP_PREFIX + "text_projection" not in state_dict:
    raise mapping.MappingError(missing=[CLIP_PREFIX + "text_projection"])
  text_width, text_dim = state_dict[CLIP_PREFIX + "text_projection"].shape
  found = []
  for name, (image_variant, text_variant) in lseg.BACKBONES.items():
    t = clip_text.TEXT_VARIANTS[text_variant]
    if matches(image_variant) and (t["width"], t["embed_dim"]) == (text_width, text_dim):
      found.append(name)
  if len(found) != 1:
    raise ValueError(
        f"no known LSeg backbone has {image} with a CLIP text tower of width {text_width} "
        f"and output {text_dim}; known backbones: {sorted(lseg.BACKBONES)}")
  return found[0]


def infer_config(state_dict: Mapping[str, Any], metadata: Mapping[str, Any] | None = None,
                 **overrides) -> lseg.LSegConfig:
  """The LSegConfig of an LSegNet state dict.

  Precedence: `overrides` (LSegConfig fields, None values ignored), then
  `metadata["lseg_config"]` (written by our exporter), then
  `metadata["hyper_parameters"]` (Lightning), then the shapes:
    backbone     ViT width/patch/depth (or ResNet blocks per stage) and the CLIP text
                 width;
    features     the output width of `scratch.layer1_rn`;
    readout      "project" if its Linear exists ("ignore" and "add" have no weights:
                 then it must be given); "project" (unused) for a ResNet;
    arch_option  0 without head-block keys (every released lang-seg model); with
                 them it must be given (1 bottleneck or 2 depthwise: same weights),
                 and so must block_depth, and the activation when block_depth >= 2.

  Raises:
    ValueError naming what cannot be told and how to pass it.
  """
  check_layout(state_dict)
  metadata = metadata or {}
  settings: dict[str, Any] = {}
  if _PROJECT_READOUT in state_dict or is_resnet(state_dict):
    settings["readout"] = "project"  # a ResNet has no readout: the default, unused
  if _HEAD_BLOCK_WEIGHT not in state_dict:
    settings["arch_option"] = 0
  if "scratch.layer1_rn.weight" in state_dict:
    settings["features"] = int(state_dict["scratch.layer1_rn.weight"].shape[0])
  hparams = metadata.get("hyper_parameters") or {}
  settings.update({_HPARAMS[k]: v for k, v in hparams.items() if k in _HPARAMS})
  torch_cfg = metadata.get("lseg_config") or {}
  settings.update({_TORCH_CONFIG[k]: v for k, v in torch_cfg.items() if k in _TORCH_CONFIG})
  settings.update({k: v for k, v in overrides.items() if v is not None})
  if settings.get("backbone") is None:
    settings["backbone"] = _infer_backbone(state_dict)

  if settings.get("readout") is None:
    raise ValueError("the checkpoint has no readout projection, so its readout is 'ignore' or "
                     "'add' (they have no weights); pass readout=... (--readout)")
  if settings.get("arch_option") is None:
    raise ValueError(
        f"the checkpoint has a spatial-regularisation head ({_HEAD_BLOCK_WEIGHT}) but its "
        "kind is not recorded: pass arch_option=1 (bottleneck) or 2 (depthwise) "
        "(--arch-option), and block_depth (--block-depth)")
  if settings["arch_option"] in (1, 2):
    if settings.get("block_depth") is None:
      raise ValueError(f"arch_option {settings['arch_option']} needs block_depth (how many "
                       "times the head block runs; --block-depth), which the weights "
                       "do not tell")
    if settings["block_depth"] >= 2 and settings.get("activation") is None:
      raise ValueError(f"block_depth {settings['block_depth']} needs the head-block "
                       "activation ('lrelu', 'relu' or 'tanh'; --activation), which the "
                       "weights do not tell")

  # Values equal to the backbone's defaults are stored as None, as a freshly
  # built config has them, so that a round trip reproduces the config exactly.
  default = lseg.LSegConfig(backbone=settings["backbone"])
  if settings.get("features") == default.num_features:
    settings["features"] = None
  token_key = CLIP_PREFIX + "token_embedding.weight"
  if "text_vocab_size" not in settings and token_key in state_dict:
    vocab = int(state_dict[token_key].shape[0])
    text_variant = lseg.BACKBONES[settings["backbone"]][1]
    if vocab != clip_text.decode_variant(text_variant).vocab_size:
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
    state_dict, _ = split_checkpoint(path_or_state_dict)
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
  clip_sd = mapping.numpy_state_dict(clip_state_dict)
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
