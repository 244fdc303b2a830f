"""PyTorch checkpoint files and lang-seg's `LSegNet` key layout (numpy only, no JAX).

The one owner of what a lang-seg checkpoint looks like on disk, shared by the
converter (`lseg_jax.convert.langseg`, JAX) and the PyTorch LSeg
(`lseg_jax.torch_lseg`, which imports nothing from the JAX side):

  reading files   `load_state_dict_file` (any state dict; safetensors need no torch), `torch_load`,
                  `read_checkpoint` / `split_checkpoint` (an LSegNet checkpoint and its metadata);
  key layout      the prefixes below (Lightning `.ckpt` files put every key under
                  `net.`), `check_layout`; the zero-shot `LSegRNNetZS` (`is_resnet`) has
                  lang-seg's regrouped torchvision ResNet (`RESNET_LAYOUT`) under
                  `pretrained.` instead of the ViT and its reassemble stages;
  settings        `infer_settings`: the hyper-parameters (`SETTINGS`, the names of our
                  exporter's `lseg_config` metadata) from the caller, the metadata and the shapes.
"""
from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from typing import Any, Mapping, Sequence

import numpy as np

LIGHTNING_PREFIX = "net."
CLIP_PREFIX = "clip_pretrained."
VIT_PREFIX = "pretrained.model."
RESNET_PREFIX = "pretrained."
# lang-seg's `_make_resnet_backbone` regroups a torchvision ResNet: `layer1` is nn.Sequential(conv1,
# bn1, relu, maxpool, layer1), `layer2..4` are torchvision's. Torch names (under RESNET_PREFIX) of
# the stem conv, the stem BatchNorm and the four stages of Bottleneck blocks; no classifier `fc`.
RESNET_LAYOUT = ("layer1.0", "layer1.1", ("layer1.4", "layer2", "layer3", "layer4"))
RESNET_STEM = f"{RESNET_PREFIX}{RESNET_LAYOUT[0]}.weight"  # identifies an LSegRNNetZS
# CLIP's image side, which `clip.load` puts under `clip_pretrained` but LSeg never runs.
CLIP_IMAGE_PREFIXES = (CLIP_PREFIX + "visual.", CLIP_PREFIX + "logit_scale")
HEAD_BLOCK_WEIGHT = "scratch.head_block.depthwise.depthwise.weight"
PROJECT_READOUT = "pretrained.act_postprocess1.0.project.0.weight"

SETTINGS = ("backbone", "features", "readout", "arch_option", "block_depth", "activation",
            "vocab_size", "context_length")
# lang-seg's Lightning hyper-parameter names -> settings.
HPARAMS = {"backbone": "backbone", "num_features": "features", "readout": "readout",
           "arch_option": "arch_option", "block_depth": "block_depth",
           "activation": "activation"}
ACTIVATIONS = ("relu", "lrelu", "tanh")
# What identifies a backbone in the weights (see `backbone_shapes`): the image
# encoder's shapes (a ViT's or a ResNet's) and the CLIP text tower's.
VIT_SHAPES = ("vit_width", "patch", "depth")
RESNET_SHAPES = ("resnet_blocks",)
TEXT_SHAPES = ("text_width", "text_dim")
BACKBONE_SHAPES = VIT_SHAPES + RESNET_SHAPES + TEXT_SHAPES


# --- Reading files ---
def numpy_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """torch tensors (any device, bf16 included) or arrays -> {key: np.ndarray}.

  Duck-typed so that this module never imports torch.
  """
  out = {}
  for key, value in state_dict.items():
    if hasattr(value, "detach"):  # a torch.Tensor
      value = value.detach().cpu()
      if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
        value = value.float()
      value = value.numpy()
    out[key] = np.asarray(value)
  return out


def _check_file(path) -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
  return path


def torch_load(path, *, weights_only: bool = True) -> Any:
  """`torch.load(path)` on the CPU; ValueError saying what to do for a damaged file or
  one that pickles objects other than tensors while `weights_only` (`weights_only=False`
  unpickles arbitrary objects: only for files you trust)."""
  path = _check_file(path)
  if os.path.getsize(path) == 0:
    raise ValueError(f"{path!r} is empty; expected a PyTorch checkpoint file")
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      head = f.read(2)
    if head == b"PK":
      raise ValueError(f"{path!r} is a damaged or truncated zip archive; expected a "
                       "complete PyTorch checkpoint file")
    # torch.save's legacy (pre-zip) format starts with a pickle's PROTO opcode, 0x80.
    if head[:1] != b"\x80":
      raise ValueError(f"{path!r} is not a PyTorch checkpoint file (neither a zip "
                       "archive nor a pickle)")
  import torch  # pylint: disable=g-import-not-at-top
  try:
    return torch.load(path, map_location="cpu", weights_only=weights_only)
  except pickle.UnpicklingError as e:
    if not weights_only:
      raise ValueError(f"could not unpickle {path!r} ({_first_line(e)}); is the file "
                       "complete?") from e
    raise ValueError(
        f"torch.load(weights_only=True) refused {path!r}: it pickles objects other than "
        f"tensors ({_first_line(e)}). If you trust the file, allow arbitrary pickles "
        "(weights_only=False; tools/convert.py: --trust-pickle)") from e
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"could not read {path!r} with torch.load ({type(e).__name__}: "
                     f"{_first_line(e)}); is it a complete PyTorch checkpoint file?") from e


def _first_line(e: BaseException) -> str:
  return str(e).strip().splitlines()[0] if str(e).strip() else ""


def _is_torchscript(path: str) -> bool:
  # Both formats are zip archives; only TorchScript ones hold code and constants.pkl.
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(n.endswith("/constants.pkl") for n in z.namelist())


def load_state_dict_file(path, *, weights_only: bool = True) -> dict[str, np.ndarray]:
  """A checkpoint file -> {key: np.ndarray}: `.safetensors` (no torch needed), a
  TorchScript archive (OpenAI CLIP's `.pt`), or a pickled state dict, bare or under
  "state_dict" (Lightning `.ckpt`) or "model"."""
  path = _check_file(path)
  if path.endswith(".safetensors"):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    with safe_open(path, framework="np") as f:
      return {k: f.get_tensor(k) for k in f.keys()}
  if _is_torchscript(path):
    import torch  # pylint: disable=g-import-not-at-top
    with warnings.catch_warnings():  # torch.jit.load is deprecated, but CLIP ships such files
      warnings.simplefilter("ignore", FutureWarning)
      obj = torch.jit.load(path, map_location="cpu").state_dict()
  else:
    obj = torch_load(path, weights_only=weights_only)
  if isinstance(obj, Mapping):
    for key in ("state_dict", "model"):
      if isinstance(obj.get(key), Mapping):
        obj = obj[key]
        break
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
  return numpy_state_dict(obj)


def read_state_dict(path_or_state_dict) -> dict[str, np.ndarray]:
  """`load_state_dict_file` of a path, or `numpy_state_dict` of a state dict."""
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    return load_state_dict_file(path_or_state_dict)
  return numpy_state_dict(path_or_state_dict)


def split_checkpoint(obj: Any, where: str = "checkpoint") -> tuple[dict[str, Any], dict[str, Any]]:
  """A loaded checkpoint object (a bare state dict, or one under "state_dict": Lightning
  `.ckpt` with `net.` keys, our exporters' wrapper) -> (its arrays as they are, metadata:
  the wrapper's "lseg_config", "hyper_parameters", "epoch", "global_step"). Keys outside
  `net.` of a Lightning checkpoint and entries that are not arrays are dropped."""
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
                     f"(keys like '{VIT_PREFIX}cls_token' or '{RESNET_STEM}'), got keys "
                     f"{sorted(state_dict)[:10]}")
  return arrays, meta


def read_checkpoint(path, *, weights_only: bool = True
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """An LSegNet checkpoint file (`.safetensors`, or anything `torch_load` reads) ->
  (state dict of numpy arrays, metadata), by `split_checkpoint`."""
  path = _check_file(path)
  if path.endswith(".safetensors"):
    try:
      obj = load_state_dict_file(path)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"could not read {path!r} as safetensors ({type(e).__name__}: {e}); "
                       "is the file complete?") from e
  else:
    obj = torch_load(path, weights_only=weights_only)
  state_dict, meta = split_checkpoint(obj, path)
  return numpy_state_dict(state_dict), meta


# --- Key layout and settings ---
def is_resnet(state_dict: Mapping[str, Any]) -> bool:
  """Whether an LSegNet-like state dict has lang-seg's ResNet encoder (`LSegRNNetZS`)."""
  return RESNET_STEM in state_dict


def check_layout(state_dict: Mapping[str, Any], where: str = "checkpoint",
                 what: str = "LSegNet") -> None:
  """Raises a ValueError unless `state_dict` has keys under both `pretrained.model.`
  and `scratch.` (`LSegNet`), or `RESNET_STEM`, keys under `pretrained.layer1.` and
  `scratch.` (`LSegRNNetZS`); `what` names the model in the message."""
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
        f"{where} is not an {what} state dict: it has no keys under "
        f"{[p for p, ok in groups.items() if not ok]}{hint}; first keys: {sorted(state_dict)[:10]}")


def vit_shapes(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, int]:
  """{"width", "patch", "depth", "grid"} from the shapes of a timm ViT state dict
  whose keys start with `prefix`."""
  patch_key = prefix + "patch_embed.proj.weight"
  missing = [k for k in (prefix + "cls_token", prefix + "pos_embed", patch_key)
             if k not in state_dict]
  if missing:
    raise ValueError(f"no timm ViT under {prefix!r}: the state dict lacks {missing}")
  depth = len({k[len(prefix):].split(".")[1] for k in state_dict
               if k.startswith(prefix + "blocks.")})
  num_tokens = state_dict[prefix + "pos_embed"].shape[1]
  return dict(width=int(state_dict[prefix + "cls_token"].shape[-1]),
              patch=int(state_dict[patch_key].shape[-1]), depth=depth,
              grid=int(round((num_tokens - 1) ** 0.5)))


def resnet_blocks(state_dict: Mapping[str, Any], stages: Sequence[str]) -> tuple[int, ...]:
  """Bottleneck blocks per stage of a ResNet state dict: for each stage prefix
  (e.g. "pretrained.layer1.4."), how many `<prefix>I.conv1.weight` keys it has."""
  counts = []
  for stage in stages:
    rests = (k[len(stage):].split(".") for k in state_dict if k.startswith(stage))
    counts.append(len({r[0] for r in rests if r[0].isdigit() and r[1:] == ["conv1", "weight"]}))
  return tuple(counts)


def backbone_shapes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The `BACKBONE_SHAPES` of an LSegNet state dict: `VIT_SHAPES`, or `RESNET_SHAPES`
  for an `LSegRNNetZS` (`is_resnet`), and `TEXT_SHAPES` (CLIP text tower)."""
  if is_resnet(state_dict):
    image = dict(resnet_blocks=resnet_blocks(
        state_dict, [f"{RESNET_PREFIX}{stage}." for stage in RESNET_LAYOUT[2]]))
  else:
    vit = vit_shapes(state_dict, VIT_PREFIX)
    image = dict(vit_width=vit["width"], patch=vit["patch"], depth=vit["depth"])
  projection = CLIP_PREFIX + "text_projection"
  if projection not in state_dict:
    raise ValueError(f"cannot tell the backbone: the state dict has no {projection!r}; "
                     "pass backbone=...")
  text_width, text_dim = state_dict[projection].shape
  return dict(image, text_width=int(text_width), text_dim=int(text_dim))


def variant_shapes(vit: Mapping[str, Any] | None, resnet_blocks: Sequence[int] | None,
                   text: Mapping[str, Any]) -> dict[str, Any]:
  """The `BACKBONE_SHAPES` of a ViT ({width, patch, depth}) or ResNet (Bottleneck blocks
  per stage) image encoder with a CLIP text tower ({width, embed_dim})."""
  image = (dict(resnet_blocks=tuple(resnet_blocks)) if resnet_blocks is not None else
           dict(vit_width=vit["width"], patch=vit["patch"], depth=vit["depth"]))
  return dict(image, text_width=text["width"], text_dim=text["embed_dim"])


def find_backbone(state_dict: Mapping[str, Any], backbones: Mapping[str, Mapping[str, Any]]) -> str:
  """The one name in `backbones` ({name: `backbone_shapes`-like dict}) the weights fit."""
  shapes = backbone_shapes(state_dict)
  found = [name for name, known in backbones.items()
           if all(known.get(k) == shapes.get(k) for k in BACKBONE_SHAPES)]
  if len(found) != 1:
    if "resnet_blocks" in shapes:
      image = f"a ResNet with {shapes['resnet_blocks']} Bottleneck blocks per stage"
    else:
      image = (f"a ViT of width {shapes['vit_width']}, patch {shapes['patch']}, depth "
               f"{shapes['depth']}")
    raise ValueError(f"no known LSeg backbone has {image} with a CLIP text tower of width "
                     f"{shapes['text_width']} and output {shapes['text_dim']}; known backbones: "
                     f"{sorted(backbones)}; pass backbone=...")
  return found[0]


def _shape_settings(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """What the keys and shapes tell, except the backbone."""
  settings: dict[str, Any] = {}
  # 'ignore' and 'add' have no weights; a ResNet has no readout (the default, unused).
  if PROJECT_READOUT in state_dict or is_resnet(state_dict):
    settings["readout"] = "project"
  if HEAD_BLOCK_WEIGHT not in state_dict:
    settings["arch_option"] = 0
  for name, key in (("features", "scratch.layer1_rn.weight"),
                    ("vocab_size", CLIP_PREFIX + "token_embedding.weight"),
                    ("context_length", CLIP_PREFIX + "positional_embedding")):
    if key in state_dict:
      settings[name] = int(state_dict[key].shape[0])
  return settings


def infer_settings(state_dict: Mapping[str, Any], metadata: Mapping[str, Any] | None = None,
                   backbones: Mapping[str, Mapping[str, int]] | None = None,
                   **overrides) -> dict[str, Any]:
  """The settings of an LSegNet state dict ({name: value}, None values left out).

  Precedence: `overrides` (`SETTINGS` names; None values ignored), then `metadata["lseg_config"]`
  (written by our exporters), then `metadata["hyper_parameters"]` (Lightning), then the shapes
  (`_shape_settings`; the backbone: the one of `backbones` whose `BACKBONE_SHAPES` the weights
  have). What the weights cannot tell must be given (docs/interop.md: "What the weights tell").

  Raises:
    ValueError naming what cannot be told and how to pass it.
  """
  unknown = sorted(set(overrides) - set(SETTINGS))
  assert not unknown, f"not settings: {unknown}"
  metadata = metadata or {}
  settings = _shape_settings(state_dict)
  hparams = metadata.get("hyper_parameters") or {}
  for source in ({HPARAMS[k]: v for k, v in hparams.items() if k in HPARAMS},
                 {k: v for k, v in (metadata.get("lseg_config") or {}).items() if k in SETTINGS},
                 overrides):
    settings.update({k: v for k, v in source.items() if v is not None})
  if settings.get("backbone") is None:
    settings["backbone"] = find_backbone(state_dict, backbones or {})

  if settings.get("readout") is None:
    raise ValueError("the checkpoint has no readout projection, so its readout is 'ignore' or "
                     "'add' (they have no weights); pass readout=... (--readout)")
  if settings.get("arch_option") is None:
    raise ValueError(
        f"the checkpoint has a spatial-regularisation head ({HEAD_BLOCK_WEIGHT}) but its "
        "kind is not recorded: pass arch_option=1 (bottleneck) or 2 (depthwise) "
        "(--arch-option), and block_depth (--block-depth)")
  if settings["arch_option"] in (1, 2):
    if settings.get("block_depth") is None:
      raise ValueError(f"arch_option {settings['arch_option']} needs block_depth (how many times "
                       "the head block runs; --block-depth), which the weights do not tell")
    # The activation only runs between head-block applications.
    if settings["block_depth"] >= 2 and settings.get("activation") is None:
      raise ValueError(f"block_depth {settings['block_depth']} needs the head-block activation "
                       f"(one of {list(ACTIVATIONS)}; --activation), which the weights do not tell")
  return settings


def json_safe(value):
  """The JSON-representable part of a checkpoint's metadata (Lightning hparams)."""
  if isinstance(value, dict):
    return {str(k): v for k, v in ((k, json_safe(v)) for k, v in value.items()) if v is not None}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (np.integer, np.floating)):
    return value.item()
  return None


def tensor_warnings(state_dict: Mapping[str, Any]) -> list[str]:
  """Warnings for tensors that cannot be right: NaN/Inf values, or integers where the
  model expects floats (BatchNorm's num_batches_tracked counters aside)."""
  out = []
  for key, value in state_dict.items():
    value = np.asarray(value)
    if key.endswith("num_batches_tracked"):
      continue
    if not np.issubdtype(value.dtype, np.floating):
      out.append(f"tensor {key!r} is {value.dtype}; the model expects floating point "
                 "values (converted)")
    elif not np.isfinite(value).all():
      bad = int(value.size - np.count_nonzero(np.isfinite(value)))
      out.append(f"tensor {key!r} has {bad} NaN/Inf values; the imported model's "
                 "predictions will not be finite")
  return out
