"""Config pieces shared by every training config: plain data, no library imports.

A config holds only what its experiment sets; the library lays it over its defaults
(`lseg_jax.config.complete`, which documents every field) and refuses unknown fields.
This module imports nothing but ml_collections, so loading a config never imports
JAX or TensorFlow.
"""
from __future__ import annotations

import ast

import ml_collections

# Copies of the library's `lseg_jax.text.DEFAULT_TOKENIZER` and `BYTE_LEVEL_TOKENIZER`
# (the offline tokenizer of the tiny test models; the library sizes the text tower's
# vocabulary for it): configs import no library code. tests/test_configs.py keeps them,
# and `parse_value`, equal to the library's.
CLIP_TOKENIZER = "openai/clip-vit-base-patch32"
BYTE_LEVEL_TOKENIZER = "byte-level"
# The official ADE20K recipe: crop 480 from base size 520, 240 epochs of 20,210 images.
ADE20K_TRAIN_IMAGES = 20_210
PAPER_EPOCHS = 240
GROUPS = ("model", "data", "optim", "mesh", "sharding", "init", "text")
# The weights the official code starts each backbone from, as `config.init` names that
# `lseg_jax.weights` downloads and verifies (timm 0.4.12's `pretrained=True`, OpenAI's
# `clip.load`, torchvision's `resnet101(pretrained=True)`; evidence in docs/interop.md).
PAPER_WEIGHTS = {
    "clip_vitl16_384": {"timm_vit": "vit_large_patch16_384", "clip": "ViT-B/32"},
    "clip_vitb32_384": {"timm_vit": "vit_base_patch32_384", "clip": "ViT-B/32"},
    "clipRN50x16_vitl16_384": {"timm_vit": "vit_large_patch16_384", "clip": "RN50x16"},
    "clip_resnet101": {"torchvision_resnet": "resnet101", "clip": "ViT-B/32"},
}

# Named TPU slices, `tpu=NAME` of ade20k.py, fewshot.py and mix7.py: the global batch
# (chips x images per chip) and remat of a run on that slice, data-parallel (the
# parameters and optimizer state, 2.6 GiB per chip for ViT-L/16, fit every generation).
# Each entry's ViT-L/16 train step was compiled for its slice with `tools/benchmark.py
# --aot` and fits its HBM (docs/scaling.md, "Which slice, which batch"). The learning
# rate follows the batch (x batch/16).
TPU_SLICES = {
    "v4-8": (16, "none"),  # 4 chips, 4 images each: the paper's batch
    "v5e-16": (16, "none"),  # 16 chips, 1 image each: the paper's batch
    "v5e-64": (256, "none"),  # 64 chips, 4 images each
    "v5p-128": (256, "none"),  # 64 chips, 4 images each
    "v6e-64": (256, "none"),  # 64 chips, 4 images each
}


def base_config() -> ml_collections.ConfigDict:
  """An empty config with the field groups a config file fills in (see
  `lseg_jax.config` for every field and its default)."""
  c = ml_collections.ConfigDict()
  for group in GROUPS:
    c[group] = ml_collections.ConfigDict()
  return c


def parse_value(raw: str, current=None):
  """A command-line string as the type of the field it replaces (a Python literal,
  else the string): the same rules as `lseg_jax.config.parse_value`."""
  if isinstance(current, str):
    return raw
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  if raw in ("None", "none", "null"):
    return None
  if isinstance(current, bool) and isinstance(value, str):
    if value.lower() in ("true", "false"):
      return value.lower() == "true"
  return value


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """"variant=vitb32,runlocal,fold=1" -> ConfigDict; a bare word means True.

  Values are parsed by `parse_value` in the type of their default; keys must be among
  `defaults`, so a typo fails loudly.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; expected some of {sorted(defaults)}")
    if not sep:
      out[key] = True
      continue
    value = parse_value(value, defaults[key])
    expected = type(defaults[key])
    if defaults[key] is not None and not isinstance(value, expected):
      if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
      else:
        raise ValueError(f"config argument {key}={value!r}; expected {expected.__name__}")
    out[key] = value
  return out


def set_paper_weights(c: ml_collections.ConfigDict, backbone: str) -> None:
  """`config.init.*` = the official code's pretrained weights of `backbone` (none for
  a backbone without official weights, such as the tiny test ones)."""
  for field, name in PAPER_WEIGHTS.get(backbone, {}).items():
    c.init[field] = name


def set_tpu_slice(c: ml_collections.ConfigDict, name: str) -> None:
  """`tpu=NAME`: the batch size, remat and mesh of `TPU_SLICES[NAME]` ("" keeps the
  config's own)."""
  if not name:
    return
  if name not in TPU_SLICES:
    raise ValueError(f"unknown TPU slice tpu={name!r}; expected one of {sorted(TPU_SLICES)}")
  c.batch_size, c.model.remat = TPU_SLICES[name]
  c.mesh.data, c.mesh.fsdp = -1, 1


def ade20k_steps(epochs: int = PAPER_EPOCHS, batch_size: int = 16) -> int:
  return epochs * ADE20K_TRAIN_IMAGES // batch_size


def shrink_for_local_run(c: ml_collections.ConfigDict) -> None:
  """`runlocal`: a few tiny CPU steps, float32, to check a config end to end."""
  c.batch_size = 2
  c.eval_batch_size = 2
  c.total_steps = 4
  c.log_every_steps = 1
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 2
  c.eval_num_batches = 2
  c.model.dtype = "float32"
  c.model.attention = "xla"
  c.data.crop_size = 128
  c.data.base_size = 144
  c.data.eval_resize = "center_crop"
  c.data.num_parallel_calls = 2
  c.data.shuffle_buffer = 16
