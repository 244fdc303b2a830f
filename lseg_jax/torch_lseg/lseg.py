"""A self-contained PyTorch LSeg with the official `LSegNet` state-dict layout.

This is the reference the JAX model is tested against and the target of the
exporter: a state dict in the lang-seg layout loads here with `strict=True`
without the (unmaintained) official repository or the `clip` package.

Key layout: the official `LSegNet`'s minus CLIP's image side (`clip_pretrained.visual.*`,
`clip_pretrained.logit_scale`), as `lseg_jax.langseg_layout` describes it;
`pretrained.act_postprocessN.{0,3,4}` keep the indices of the official nn.Sequential
(0 readout, 1 transpose, 2 unflatten, 3 1x1 conv, 4 resampling conv).

Images are NCHW here (PyTorch convention), normalised as (x/255 - 0.5)/0.5 for every
backbone (the ResNet backbones convert to ImageNet's normalisation themselves).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lseg_jax import langseg_layout as layout
from lseg_jax.torch_lseg.clip_text import CLIPTextTorch
from lseg_jax.torch_lseg.resnet import STAGE_WIDTHS, ResNetBackbone

READOUTS = ("ignore", "add", "project")
ACTIVATIONS = layout.ACTIVATIONS
ARCH_OPTIONS = (0, 1, 2)

# The ViT position embeddings are learned on this input size; every forward
# resizes them from this grid to the input's grid.
_PRETRAIN_SIZE = 384

_CLIP_B32_TEXT = dict(width=512, layers=12, heads=8, embed_dim=512)
_CLIP_RN50X16_TEXT = dict(width=768, layers=12, heads=12, embed_dim=768)
_TINY_TEXT = dict(width=32, layers=2, heads=2, embed_dim=16)

_VIT_L16 = dict(patch=16, width=1024, depth=24, heads=16, mlp=4096)
_VIT_B32 = dict(patch=32, width=768, depth=12, heads=12, mlp=3072)
_VIT_TINY = dict(width=32, depth=4, heads=2, mlp=64)

# Resampling factor of each reassemble level (index 4 of act_postprocessN):
# f > 1: ConvTranspose2d(kernel=stride=f); 1: none; 0.5: Conv2d(3x3, stride 2).
_RESAMPLE_VIT16 = (4, 2, 1, 0.5)
_RESAMPLE_VIT32 = (8, 4, 2, 1)

_LSEG_L16 = dict(vit=_VIT_L16, hooks=(5, 11, 17, 23), widths=(256, 512, 1024, 1024),
                 resample=_RESAMPLE_VIT16)
_LSEG_TINY = dict(hooks=(0, 1, 2, 3), widths=(8, 16, 32, 32), text=_TINY_TEXT)

# backbone -> structure. The official backbones pair a ViT image encoder with
# the text tower of a CLIP model (ViT-B/32's for both ViT-based names).
VARIANTS: dict[str, dict[str, Any]] = {
    "clip_vitl16_384": dict(_LSEG_L16, text=_CLIP_B32_TEXT),
    "clipRN50x16_vitl16_384": dict(_LSEG_L16, text=_CLIP_RN50X16_TEXT),
    "clip_vitb32_384": dict(
        vit=_VIT_B32, hooks=(2, 5, 8, 11), widths=(96, 192, 384, 768),
        resample=_RESAMPLE_VIT32, text=_CLIP_B32_TEXT),
    # Tiny test variants: the same structure with small widths.
    "tiny_vit16": dict(_LSEG_TINY, vit=dict(patch=16, **_VIT_TINY), resample=_RESAMPLE_VIT16),
    "tiny_vit32": dict(_LSEG_TINY, vit=dict(patch=32, **_VIT_TINY), resample=_RESAMPLE_VIT32),
    # ResNet image encoders (`resnet`: Bottleneck blocks per stage), `LSegRNNetZS`.
    "clip_resnet101": dict(resnet=(3, 4, 23, 3), widths=STAGE_WIDTHS, text=_CLIP_B32_TEXT),
    "tiny_resnet": dict(resnet=(1, 1, 1, 1), widths=STAGE_WIDTHS, text=_TINY_TEXT),
}


@dataclasses.dataclass(frozen=True)
class TorchLSegConfig:
  """Hyper-parameters of `LSegTorch`, named as the official CLI flags (`features` is
  `--num_features`; None: 256, or 16 for the tiny backbones). The head block runs
  max(block_depth, 1) times when arch_option is 1 or 2, as in the official code."""
  backbone: str = "clip_vitl16_384"
  features: Optional[int] = None
  readout: str = "project"
  arch_option: int = 0
  block_depth: int = 0
  activation: str = "lrelu"
  vocab_size: int = 49408
  context_length: int = 77

  def __post_init__(self):
    _check_choice("backbone", self.backbone, tuple(VARIANTS))
    _check_choice("readout", self.readout, READOUTS)
    _check_choice("arch_option", self.arch_option, ARCH_OPTIONS)
    _check_choice("activation", self.activation, ACTIVATIONS)
    if self.features is None:
      object.__setattr__(self, "features", 16 if self.backbone.startswith("tiny") else 256)
    for name in ("features", "vocab_size", "context_length"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(self.block_depth, int) or self.block_depth < 0:
      raise ValueError(f"block_depth must be an int >= 0, got {self.block_depth!r}")


# Checkpoint metadata ("lseg_config") and settings inference use these names.
assert tuple(f.name for f in dataclasses.fields(TorchLSegConfig)) == layout.SETTINGS


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


# --- Image encoder: timm ViT + reassemble blocks ---
class _Fn(nn.Module):
  """A parameter-free step of the official nn.Sequential."""

  def __init__(self, fn):
    super().__init__()
    self.fn = fn

  def forward(self, x):
    return self.fn(x)


class _ProjectReadout(nn.Module):
  """readout='project': GELU(Linear(concat(token, cls))). [B, 1+N, C] -> [B, N, C]."""

  def __init__(self, width: int):
    super().__init__()
    self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())

  def forward(self, tokens):
    patches = tokens[:, 1:]
    cls = tokens[:, :1].expand_as(patches)
    return self.project(torch.cat([patches, cls], dim=-1))


class Reassemble(nn.Sequential):
  """One DPT reassemble level: tokens of a ViT block -> feature map. Index 2 (the
  official fixed-size Unflatten) is a placeholder: the token grid is passed to `forward`."""

  def __init__(self, readout: str, vit_width: int, width: int, resample: float):
    if readout == "project":
      readout_op = _ProjectReadout(vit_width)
    elif readout == "add":  # the class token added to every patch token
      readout_op = _Fn(lambda t: t[:, 1:] + t[:, :1])
    else:  # "ignore": the class token dropped
      readout_op = _Fn(lambda t: t[:, 1:])
    layers = [readout_op, _Fn(lambda t: t.transpose(1, 2)), nn.Identity(),
              nn.Conv2d(vit_width, width, kernel_size=1)]
    if resample > 1:
      layers.append(nn.ConvTranspose2d(width, width, kernel_size=int(resample),
                                       stride=int(resample)))
    elif resample < 1:
      layers.append(nn.Conv2d(width, width, kernel_size=3, stride=2, padding=1))
    super().__init__(*layers)

  def forward(self, tokens, grid_hw):
    """[B, 1+h*w, C] tokens, grid (h, w) -> [B, width, h*f, w*f]."""
    x = self[1](self[0](tokens)).unflatten(2, grid_hw)
    for layer in list(self)[3:]:
      x = layer(x)
    return x


class ViTBackbone(nn.Module):
  """timm ViT run on any input size, with four reassembled hook outputs."""

  def __init__(self, vit: Mapping[str, int], hooks: Sequence[int],
               widths: Sequence[int], resample: Sequence[float], readout: str):
    super().__init__()
    # num_classes=1000 keeps `head.*` so the keys match timm's pretrained model.
    self.model = VisionTransformer(
        img_size=_PRETRAIN_SIZE, patch_size=vit["patch"], embed_dim=vit["width"],
        depth=vit["depth"], num_heads=vit["heads"],
        mlp_ratio=vit["mlp"] / vit["width"], num_classes=1000)
    self.patch_size = vit["patch"]
    self.hooks = tuple(hooks)
    assert list(self.hooks) == sorted(set(self.hooks)), self.hooks
    for i, (width, factor) in enumerate(zip(widths, resample)):
      self.add_module(f"act_postprocess{i + 1}", Reassemble(readout, vit["width"], width, factor))

  def _pos_embed(self, grid_hw):
    """Position embeddings [1, 1+h*w, C], the grid part resized bilinearly."""
    pos = self.model.pos_embed
    cls_pos, grid_pos = pos[:, :1], pos[0, 1:]
    side = int(math.isqrt(grid_pos.shape[0]))
    grid_pos = grid_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos, size=grid_hw, mode="bilinear", align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, grid_hw[0] * grid_hw[1], -1)
    return torch.cat([cls_pos, grid_pos], dim=1)

  def forward(self, x):
    """[B, 3, H, W] -> four feature maps [B, widths[i], ., .] (strides 4..32)."""
    vit = self.model
    grid_hw = (x.shape[2] // self.patch_size, x.shape[3] // self.patch_size)
    tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    cls = vit.cls_token.expand(x.shape[0], -1, -1)
    tokens = vit.pos_drop(torch.cat([cls, tokens], dim=1) + self._pos_embed(grid_hw))
    # Blocks after the last hook and the final norm do not reach the output.
    hooked = []
    for i, block in enumerate(vit.blocks[:self.hooks[-1] + 1]):
      tokens = block(tokens)
      if i in self.hooks:
        hooked.append(tokens)
    return [getattr(self, f"act_postprocess{i + 1}")(t, grid_hw) for i, t in enumerate(hooked)]


# --- Decoder: DPT fusion blocks ---
class ResidualConvUnit(nn.Module):
  """x + BN(conv(ReLU(BN(conv(ReLU(x)))))), convs 3x3 without bias."""

  def __init__(self, features: int):
    super().__init__()
    self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(features)
    self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(features)

  def forward(self, x):
    out = self.bn1(self.conv1(F.relu(x)))
    out = self.bn2(self.conv2(F.relu(out)))
    return out + x


class FusionBlock(nn.Module):
  """[B, F, h, w] (+ skip [B, F, h, w]) -> [B, F, 2h, 2w]."""

  def __init__(self, features: int):
    super().__init__()
    self.resConfUnit1 = ResidualConvUnit(features)
    self.resConfUnit2 = ResidualConvUnit(features)
    self.out_conv = nn.Conv2d(features, features, kernel_size=1)

  def forward(self, x, skip=None):
    if skip is not None:
      x = x + self.resConfUnit1(skip)
    x = self.resConfUnit2(x)
    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    return self.out_conv(x)


# --- Spatial regularisation on the logits ---
class _LabelwiseConv(nn.Module):
  """ONE 3x3 single-channel conv applied to every label map independently."""

  def __init__(self):
    super().__init__()
    self.depthwise = nn.Conv2d(1, 1, kernel_size=3, padding=1)

  def forward(self, x):
    """[B, L, H, W] -> [B, L, H, W]."""
    b, l, h, w = x.shape
    return self.depthwise(x.reshape(b * l, 1, h, w)).reshape(b, l, h, w)


class DepthwiseBlock(nn.Module):
  """arch_option 2: act(conv(x)) per label map."""

  def __init__(self, activation: str):
    super().__init__()
    self.depthwise = _LabelwiseConv()
    self.activation = {"relu": nn.ReLU(), "lrelu": nn.LeakyReLU(), "tanh": nn.Tanh()}[activation]

  def _combine(self, x, conv_x, label_mask):
    del x, label_mask
    return conv_x

  def forward(self, x, label_mask=None, act=True):
    """x [B, L, H, W] logits, label_mask [B, L] bool or None -> [B, L, H, W]."""
    out = self._combine(x, self.depthwise(x), label_mask)
    return self.activation(out) if act else out


class BottleneckBlock(DepthwiseBlock):
  """arch_option 1: act(conv(x) + max over (unmasked) labels of x)."""

  def _combine(self, x, conv_x, label_mask):
    if label_mask is not None:
      x = x.masked_fill(~label_mask[:, :, None, None], -math.inf)
    return conv_x + x.amax(dim=1, keepdim=True)


# --- LSeg ---
class LSegTorch(nn.Module):
  """LSeg as the official `LSegNet.forward` computes it, except that everything stays
  float32 (the official casts pixel features to half before the dot product), text
  embeddings are an input (`encode_text` / `forward_labels` run the text tower), and an
  optional `label_mask` gives masked labels -inf logits and leaves them out of the
  bottleneck max (without a mask the result is the official one)."""

  def __init__(self, config: Optional[TorchLSegConfig] = None, **kwargs):
    super().__init__()
    if config is None:
      config = TorchLSegConfig(**kwargs)
    elif kwargs:
      config = dataclasses.replace(config, **kwargs)
    self.config = config
    variant = VARIANTS[config.backbone]
    text = variant["text"]
    self.embed_dim = text["embed_dim"]

    self.clip_pretrained = CLIPTextTorch(
        text["width"], text["layers"], text["heads"], text["embed_dim"],
        vocab_size=config.vocab_size, context_length=config.context_length)
    if "resnet" in variant:
      self.pretrained = ResNetBackbone(variant["resnet"])
    else:
      self.pretrained = ViTBackbone(variant["vit"], variant["hooks"], variant["widths"],
                                    variant["resample"], config.readout)
    self.scratch = nn.Module()
    for i, width in enumerate(variant["widths"]):
      self.scratch.add_module(
          f"layer{i + 1}_rn", nn.Conv2d(width, config.features, 3, padding=1, bias=False))
    for i in range(4):
      self.scratch.add_module(f"refinenet{i + 1}", FusionBlock(config.features))
    self.scratch.head1 = nn.Conv2d(config.features, self.embed_dim, kernel_size=1)
    if config.arch_option == 1:
      self.scratch.head_block = BottleneckBlock(config.activation)
    elif config.arch_option == 2:
      self.scratch.head_block = DepthwiseBlock(config.activation)
    # exp(log(1/0.07)) in float32, as the official computes it; not a parameter.
    self.register_buffer(
        "logit_scale", torch.tensor(math.log(1 / 0.07), dtype=torch.float32).exp(),
        persistent=False)

  # -- text -------------------------------------------------------------------
  def encode_text(self, tokens):
    """Token ids [L, context_length] int -> unnormalised embeddings [L, D]."""
    return self.clip_pretrained.encode_text(tokens)

  def forward_labels(self, x, tokens, label_mask=None):
    """`forward` with the label embeddings computed from tokens [L, context_length]."""
    return self(x, self.encode_text(tokens), label_mask)

  # -- image ------------------------------------------------------------------
  def pixel_features(self, x):
    """Images [B, 3, H, W] -> unnormalised pixel embeddings [B, D, H/2, W/2]."""
    self._check_image(x)
    l1, l2, l3, l4 = self.pretrained(x)
    s = self.scratch
    path = s.refinenet4(s.layer4_rn(l4))
    path = s.refinenet3(path, s.layer3_rn(l3))
    path = s.refinenet2(path, s.layer2_rn(l2))
    path = s.refinenet1(path, s.layer1_rn(l1))
    return s.head1(path)

  def cosine_logits(self, x, text_features):
    """Images x [B, 3, H, W], label embeddings [L, D] or [B, L, D] -> logits
    [B, L, H/2, W/2] = exp(log(1/0.07)) * <pixel, text>, both L2-normalised (no epsilon,
    as the official), before regularisation and upsampling."""
    text_features, _ = self._check_labels(x, text_features, None)
    pix = self.pixel_features(x)
    b, d, h, w = pix.shape
    pix = pix.permute(0, 2, 3, 1).reshape(b, h * w, d)
    pix = pix / pix.norm(dim=-1, keepdim=True)
    text = text_features / text_features.norm(dim=-1, keepdim=True)
    # [B, h*w, D] @ [(B,) D, L] -> [B, h*w, L]
    logits = (self.logit_scale * pix) @ text.transpose(-1, -2)
    return logits.reshape(b, h, w, -1).permute(0, 3, 1, 2)

  def forward(self, x, text_features, label_mask=None):
    """Images x [B, 3, H, W] (sides multiples of 32), unnormalised label embeddings
    [L, D] or [B, L, D], optional bool label_mask [B, L] (False: not a candidate) ->
    float32 logits [B, L, H, W], -inf where `label_mask` is False."""
    text_features, label_mask = self._check_labels(x, text_features, label_mask)
    logits = self.cosine_logits(x, text_features)

    if self.config.arch_option in (1, 2):
      block = self.scratch.head_block
      for _ in range(self.config.block_depth - 1):
        logits = block(logits, label_mask)
      logits = block(logits, label_mask, act=False)

    logits = F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=True)
    if label_mask is not None:
      # After the resize: 0 * -inf would turn neighbours into NaN.
      logits = logits.masked_fill(~label_mask[:, :, None, None], -math.inf)
    return logits.float()

  def _check_image(self, x):
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != 3:
      raise ValueError(f"images must be a [B, 3, H, W] tensor, got shape "
                       f"{tuple(getattr(x, 'shape', ()))}")
    if not x.is_floating_point():
      raise ValueError(f"images must be floating point, got {x.dtype}")
    h, w = x.shape[2:]
    if h % 32 or w % 32 or h == 0 or w == 0:
      raise ValueError(f"image height and width must be positive multiples of 32, got {h}x{w}")

  def _check_labels(self, x, text_features, label_mask):
    self._check_image(x)
    b = x.shape[0]
    if (not torch.is_tensor(text_features) or text_features.ndim not in (2, 3)
        or text_features.shape[-1] != self.embed_dim
        or (text_features.ndim == 3 and text_features.shape[0] != b)):
      raise ValueError(
          f"text_features must be [L, {self.embed_dim}] or [{b}, L, {self.embed_dim}], "
          f"got shape {tuple(getattr(text_features, 'shape', ()))}")
    num_labels = text_features.shape[-2]
    if num_labels == 0:
      raise ValueError("empty label set: text_features has 0 labels")
    if label_mask is not None:
      if (not torch.is_tensor(label_mask) or label_mask.dtype != torch.bool
          or tuple(label_mask.shape) != (b, num_labels)):
        raise ValueError(f"label_mask must be a bool tensor [{b}, {num_labels}], got "
                         f"{getattr(label_mask, 'dtype', type(label_mask))} "
                         f"{tuple(getattr(label_mask, 'shape', ()))}")
      label_mask = label_mask.to(x.device)
    return text_features, label_mask

  # -- checkpoints --------------------------------------------------------------
  def save_checkpoint(self, path):
    """Writes {"state_dict": ..., "lseg_config": {...}} for `from_checkpoint`."""
    torch.save({"state_dict": self.state_dict(),
                "lseg_config": dataclasses.asdict(self.config)}, path)

  @classmethod
  def from_checkpoint(cls, path, *, weights_only: bool = True, **overrides):
    """An LSegTorch from a file in the lang-seg layout (`langseg_layout.split_checkpoint`;
    the config from `overrides`, the file's metadata and its shapes, by
    `langseg_layout.infer_settings`). CLIP's image side is ignored; all other keys load
    strictly. `weights_only=False` (official Lightning checkpoints) unpickles arbitrary
    objects: only for files you trust."""
    fields = {f.name for f in dataclasses.fields(TorchLSegConfig)}
    unknown = set(overrides) - fields
    if unknown:
      raise ValueError(f"unknown config overrides {sorted(unknown)}; expected "
                       f"fields of TorchLSegConfig: {sorted(fields)}")
    where = str(path)
    state_dict, meta = layout.split_checkpoint(
        layout.torch_load(path, weights_only=weights_only), where)
    state_dict = {k: v for k, v in state_dict.items()
                  if not k.startswith(layout.CLIP_IMAGE_PREFIXES)}
    layout.check_layout(state_dict, where, "LSeg")
    settings = layout.infer_settings(state_dict, meta, _BACKBONE_SHAPES, **overrides)
    model = cls(TorchLSegConfig(**settings))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


# What identifies each backbone in its weights (`langseg_layout.find_backbone`).
_BACKBONE_SHAPES = {name: layout.variant_shapes(v.get("vit"), v.get("resnet"), v["text"])
                    for name, v in VARIANTS.items()}
