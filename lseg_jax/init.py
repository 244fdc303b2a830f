"""Initialisation from pretrained weights, by config.

`config.init` fields (each None, a path, or a name that `lseg_jax.weights.resolve`
downloads and verifies: an official name such as `vit_large_patch16_384`, `ViT-B/32`,
`resnet101`, a Hugging Face Hub id or a URL; applied in this order, later ones win):
  checkpoint  an Orbax directory (`tools/convert.py import`, or an earlier training
              run): every parameter and BatchNorm statistic of the model;
  timm_vit    a timm ViT state dict (`.safetensors`, `.pth`, ...; lang-seg checkpoints
              work too): `pretrained/model/*` of the ViT backbones;
  torchvision_resnet
              a torchvision ResNet state dict (ImageNet weights as torchvision downloads
              them, e.g. `resnet101-63fe2227.pth`; `fc.*` is skipped):
              `pretrained/model/*` of the ResNet backbones (`clip_resnet101`);
  clip        CLIP text weights for `clip_pretrained/*`: an OpenAI file (`ViT-B-32.pt`,
              a state dict, or a lang-seg checkpoint), or a Hugging Face folder
              (`config.json` + `model.safetensors`).
The loaders are those of `lseg_jax.convert`; here they only fill host arrays, which the
training loop then places into the parameters' shardings.
"""
from __future__ import annotations

import os

from flax import nnx
import numpy as np

from lseg_jax import checkpoint
from lseg_jax import weights as weights_lib
from lseg_jax.convert import clip_hf, clip_openai, mapping, timm_vit, torchvision_resnet
from lseg_jax.models import lseg

INIT_FIELDS = ("checkpoint", "timm_vit", "torchvision_resnet", "clip")
_IMAGE_ENCODER = {"timm_vit": "vit", "torchvision_resnet": "resnet"}


def _prefixed(prefix: str, state: nnx.State) -> dict[str, np.ndarray]:
  return {prefix + k: np.asarray(v) for k, v in mapping.flatten_params(state).items()}


def _from_checkpoint(directory: str, model_config: lseg.LSegConfig) -> dict[str, np.ndarray]:
  model, meta = checkpoint.load_model(directory)
  theirs = lseg.LSegConfig.from_dict(meta["model_config"])
  diff = {k: (v, getattr(model_config, k)) for k, v in theirs.to_dict().items()
          if k not in lseg.COMPUTE_ONLY_FIELDS and getattr(model_config, k) != v}
  if diff:
    raise ValueError(f"init.checkpoint {directory!r} holds a different model: " + ", ".join(
        f"{k}={a!r} there, {b!r} in config.model" for k, (a, b) in diff.items()))
  return _prefixed("", nnx.state(model))


def _from_timm_vit(path: str, abstract: lseg.LSeg) -> dict[str, np.ndarray]:
  state_dict, prefix = mapping.read_under_prefix(path, None, timm_vit.find_prefix)
  vit = abstract.pretrained.model
  table = timm_vit.table(prefix, head=vit.head is not None)
  return _prefixed("pretrained/model/", mapping.torch_to_nnx(state_dict, table, vit))


def _from_torchvision_resnet(path: str, abstract: lseg.LSeg) -> dict[str, np.ndarray]:
  state_dict, prefix = mapping.read_under_prefix(path, None, torchvision_resnet.find_prefix)
  return _prefixed("pretrained/model/", mapping.torch_to_nnx(
      state_dict, torchvision_resnet.table(prefix), abstract.pretrained.model))


def _is_hf_clip(path: str) -> bool:
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  return os.path.isfile(os.path.join(folder, "config.json")) and (
      os.path.isdir(path) or path.endswith(".safetensors"))


def _from_clip(path: str, abstract: lseg.LSeg) -> dict[str, np.ndarray]:
  text = abstract.clip_pretrained
  if _is_hf_clip(path):
    _, state_dict = clip_hf.read_hf_checkpoint(path)
    table = clip_hf.table()
  else:
    state_dict, prefix = mapping.read_under_prefix(path, None, clip_openai.find_prefix)
    table = clip_openai.table(prefix)
  return _prefixed("clip_pretrained/", mapping.torch_to_nnx(state_dict, table, text))


def pretrained_weights(init_cfg, abstract: lseg.LSeg) -> dict[str, np.ndarray]:
  """{flat name: host array} of every weight `init_cfg` (`INIT_FIELDS`) provides for the
  abstract model `abstract` (`nnx.eval_shape` of it); empty for none."""
  init_cfg = dict(init_cfg or {})
  unknown = sorted(set(init_cfg) - set(INIT_FIELDS))
  if unknown:
    raise ValueError(f"config.init has unknown fields {unknown}; expected {list(INIT_FIELDS)}")
  weights: dict[str, np.ndarray] = {}
  for field in INIT_FIELDS:
    path = init_cfg.get(field)
    if not path:
      continue
    path = os.fspath(path)
    if field == "checkpoint" and not os.path.exists(path):
      raise FileNotFoundError(f"config.init.{field}={path!r} does not exist")
    encoder = _IMAGE_ENCODER.get(field)
    if encoder is not None and abstract.cfg.image_encoder != encoder:
      raise ValueError(
          f"config.init.{field}={path!r} gives {encoder} weights, but backbone "
          f"{abstract.cfg.backbone!r} has a {abstract.cfg.image_encoder} image encoder; use "
          f"config.init.{'timm_vit' if encoder == 'resnet' else 'torchvision_resnet'}")
    if field == "checkpoint":
      weights.update(_from_checkpoint(path, abstract.cfg))
      continue
    path = weights_lib.resolve(path, kind=field, what=f"config.init.{field}")
    load = {"timm_vit": _from_timm_vit, "torchvision_resnet": _from_torchvision_resnet,
            "clip": _from_clip}[field]
    weights.update(load(path, abstract))
  return weights
