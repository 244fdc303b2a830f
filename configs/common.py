"""Config pieces shared by every training config (`lseg_jax.train` reads these fields).

  seed, batch_size (global, per optimizer step), eval_batch_size (None: batch_size),
  total_steps, log_every_steps, eval_every_steps, checkpoint_every_steps (0: only at
  the end), keep_checkpoints, stop_at_step (None; stop there with a checkpoint, as on
  SIGTERM), eval_num_batches (None: the whole eval split), eval_at_end, progress_bar,
  prefetch_to_device;
  model     `lseg_jax.models.lseg.LSegConfig` fields;
  data      `lseg_jax.data.input_pipeline.default_data_config()` fields;
  optim     `lseg_jax.optim.default_optim_config()` fields (the paper's recipe);
  mesh      {"data": -1, "fsdp": 1}: device mesh sizes (-1: the remaining devices);
  sharding  rules [(regex, "fsdp" | "replicate" | spec)] and min_size, see
            `lseg_jax.sharding`;
  init      checkpoint / timm_vit / torchvision_resnet / clip paths, see `lseg_jax.init`;
  text      tokenizer (a CLIP tokenizer folder, a Hugging Face name, or "byte-level")
            and template (None: bare label names, as LSeg).
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from lseg_jax import optim
from lseg_jax import sharding
from lseg_jax.data import input_pipeline
from lseg_jax.models import lseg

CLIP_TOKENIZER = "openai/clip-vit-base-patch32"
# The official ADE20K recipe: crop 480 from base size 520, 240 epochs of 20,210 images.
ADE20K_TRAIN_IMAGES = 20_210
PAPER_EPOCHS = 240


def base_config() -> ml_collections.ConfigDict:
  """Every field `lseg_jax.train` reads, at the paper's values where it has them."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 16
  c.eval_batch_size = config_dict.placeholder(int)
  c.total_steps = 1000
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.stop_at_step = config_dict.placeholder(int)
  c.eval_num_batches = config_dict.placeholder(int)
  c.eval_at_end = True
  c.progress_bar = True
  c.prefetch_to_device = 2

  c.model = ml_collections.ConfigDict(lseg.LSegConfig().to_dict())
  c.model.features = config_dict.placeholder(int)
  c.model.text_vocab_size = config_dict.placeholder(int)
  c.data = input_pipeline.default_data_config()
  c.data.data_dir = config_dict.placeholder(str)
  c.data.fold = config_dict.placeholder(int)
  c.data.eval_pad_to = config_dict.placeholder(tuple)
  c.optim = optim.default_optim_config()
  c.optim.grad_clip_norm = config_dict.placeholder(float)
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  c.sharding = ml_collections.ConfigDict(dict(
      rules=sharding.DEFAULT_RULES, min_size=sharding.DEFAULT_MIN_SIZE))
  c.init = ml_collections.ConfigDict(dict(
      checkpoint=config_dict.placeholder(str), timm_vit=config_dict.placeholder(str),
      torchvision_resnet=config_dict.placeholder(str), clip=config_dict.placeholder(str)))
  c.text = ml_collections.ConfigDict(dict(
      tokenizer=CLIP_TOKENIZER, template=config_dict.placeholder(str)))
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """"variant=vitb32,runlocal,fold=1" -> ConfigDict; a bare word means True.

  Values are parsed as int, then float, else kept as strings; keys must be among
  `defaults` (with their types), so a typo fails loudly.
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
    for cast in (int, float):
      try:
        value = cast(value)
        break
      except ValueError:
        pass
    expected = type(defaults[key])
    if defaults[key] is not None and not isinstance(value, expected):
      if expected is float and isinstance(value, int):
        value = float(value)
      elif expected is bool and value in ("True", "False", "true", "false"):
        value = value in ("True", "true")
      else:
        raise ValueError(f"config argument {key}={value!r}; expected {expected.__name__}")
    out[key] = value
  return out


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
