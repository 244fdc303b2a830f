"""LSeg: ViT-DPT pixel embeddings scored against frozen CLIP label embeddings.

    images [B, H, W, 3] --ViT--> 4 hooked token maps --DPT--> [B, H/2, W/2, D]
      (or --ResNet--> 4 stage outputs, for lang-seg's zero-shot `LSegRNNetZS`)
    pixel embeddings (L2-normalised) . label embeddings [L, D] or [B, L, D] (L2-normalised)
    * 1/0.07 -> spatial regularisation (optional) -> bilinear x2 -> logits [B, H, W, L]

Module names follow lang-seg's `LSegNet` (`pretrained.model`, `pretrained.act_postprocessN`,
`scratch.*`, `clip_pretrained`), so its checkpoints map onto this model key by key. The ResNet
backbones keep the torchvision ResNet at `pretrained/model` too (lang-seg regroups it as
`pretrained.layer1..4`: `convert.torchvision_resnet`). The text tower lives in the model (for
checkpoint interop) but the forward pass takes label embeddings: they are computed once per label
set (`lseg_jax.text.LabelEmbedder`) and a training step never runs the text tower.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from lseg_jax import fields
from lseg_jax.errors import UserError
from lseg_jax.models import attention, clip_text, conv, dpt, resize, resnet, spatial_reg, vit

# lang-seg backbone name -> (image variant: ViT or ResNet, CLIP text variant).
BACKBONES = {
    "clip_vitl16_384": ("L/16", "B/32"),
    "clip_vitb32_384": ("B/32", "B/32"),
    "clipRN50x16_vitl16_384": ("L/16", "RN50x16"),
    # The zero-shot models' ResNet-101 (`LSegRNNetZS`, PASCAL-5i / COCO-20i / FSS-1000).
    "clip_resnet101": ("resnet101", "B/32"),
    # Same structure, tiny dimensions: for tests and the CPU default config.
    "tiny_vit16": ("tiny/16", "tiny"),
    "tiny_vit32": ("tiny/32", "tiny"),
    "tiny_resnet": ("resnet_tiny", "tiny"),
}
# Channels of the four maps the decoder's `scratch.layerN_rn` take.
DPT_WIDTHS = {
    "L/16": (256, 512, 1024, 1024),
    "B/32": (96, 192, 384, 768),
    "tiny/16": (8, 16, 32, 32),
    "tiny/32": (8, 16, 32, 32),
    **{name: resnet.STAGE_WIDTHS for name in resnet.RESNET_VARIANTS},
}
# lang-seg feeds its ResNet models ImageNet-normalised images (`FSSDataset.initialize(
# imagenet_norm=True)` for clip_resnet101); our models all take mean 0.5 / std 0.5.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# LSegConfig fields that change how the model computes, not its parameters: a checkpoint
# resumes or initialises a model that differs from it only in these.
COMPUTE_ONLY_FIELDS = ("dtype", "attention", "remat")
# CLIP's initial temperature, exp(log(1/0.07)) in float32 as lang-seg computes it.
LOGIT_SCALE = float(np.exp(np.float32(np.log(1 / 0.07)), dtype=np.float32))


@dataclasses.dataclass(frozen=True)
class LSegConfig:
  """Everything that defines an LSeg model; stored beside every checkpoint. Each field is
  declared once (`lseg_jax.fields`): the run config's checks and the tools' choices
  (`FIELD_CHOICES`) derive from it."""
  backbone: str = fields.one_of("clip_vitb32_384", BACKBONES).dataclass_field()
  # DPT width; None: 256, or 16 for the tiny backbones
  features: int | None = fields.integer(None, 1).dataclass_field()
  readout: str = fields.one_of("project", dpt.READOUTS).dataclass_field()
  # 0: none, 1: BottleneckBlock, 2: DepthwiseBlock
  arch_option: int = fields.one_of(0, spatial_reg.ARCH_OPTIONS).dataclass_field()
  block_depth: int = fields.integer(0, 0).dataclass_field()
  activation: str = fields.one_of("lrelu", spatial_reg.ACTIVATIONS).dataclass_field()
  # compute dtype ("bfloat16" on accelerators); params stay float32
  dtype: str = fields.one_of("float32", ("float32", "bfloat16")).dataclass_field()
  # `models.attention`
  attention: str = fields.one_of("auto", attention.IMPLEMENTATIONS).dataclass_field()
  # per ViT block, see `vit.REMAT_POLICIES`
  remat: str = fields.one_of("none", vit.REMAT_POLICIES).dataclass_field()
  # None: the variant's (49408); smaller in tiny tests
  text_vocab_size: int | None = fields.integer(None, 1).dataclass_field()

  def __post_init__(self):
    for name, spec in FIELDS.items():
      value = getattr(self, name)
      if not spec.allows(value):
        raise UserError(f"unknown {name} {value!r}; expected {spec.expected}"
                        if spec.choices else f"LSegConfig {name}={value!r}; expected "
                        f"{spec.expected}")

  @property
  def image_variant(self) -> str:
    """The image encoder's variant: a `vit.VIT_VARIANTS` or `resnet.RESNET_VARIANTS` name."""
    return BACKBONES[self.backbone][0]

  @property
  def image_encoder(self) -> str:
    """"vit" or "resnet"."""
    return "resnet" if self.image_variant in resnet.RESNET_VARIANTS else "vit"

  @property
  def vit_variant(self) -> str:
    if self.image_encoder != "vit":
      raise ValueError(f"backbone {self.backbone!r} has a ResNet image encoder, not a ViT")
    return self.image_variant

  @property
  def text_variant(self) -> str:
    return BACKBONES[self.backbone][1]

  @property
  def num_features(self) -> int:
    if self.features is not None:
      return self.features
    return 16 if self.backbone.startswith("tiny") else 256

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "LSegConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise UserError(f"unknown LSegConfig fields {unknown}; expected a subset of {sorted(known)}")
    return cls(**d)


FIELDS = {f.name: f.metadata["spec"] for f in dataclasses.fields(LSegConfig)}
FIELD_CHOICES = {name: f.choices for name, f in FIELDS.items() if f.choices}


class Pretrained(nnx.Module):
  """lang-seg's `pretrained`: the ViT (`model`) and the four reassemble stages."""

  def __init__(self, cfg: LSegConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.model = vit.VisionTransformer(
        vit.decode_variant(cfg.vit_variant, dtype=dtype, attention=cfg.attention,
                           remat=cfg.remat), rngs=rngs)
    vcfg = self.model.cfg
    styles = dpt.REASSEMBLE[vcfg.patch]
    widths = DPT_WIDTHS[cfg.vit_variant]
    for i in range(4):
      setattr(self, f"act_postprocess{i + 1}", dpt.Reassemble(
          cfg.readout, vcfg.width, widths[i], styles[i], dtype=dtype, rngs=rngs))

  def __call__(self, images):
    """images [B, H, W, 3] -> 4 feature maps at strides p/4, p/2, p, 2p (p=16) or
    p/8, p/4, p/2, p (p=32)."""
    grid = self.model.grid_size(images.shape[1], images.shape[2])
    tokens = self.model(images)
    stages = (self.act_postprocess1, self.act_postprocess2, self.act_postprocess3,
              self.act_postprocess4)
    return [stage(t, grid) for stage, t in zip(stages, tokens)]


class PretrainedResNet(nnx.Module):
  """lang-seg's `pretrained` of `LSegRNNetZS`: the torchvision ResNet (`model`)."""

  def __init__(self, cfg: LSegConfig, *, rngs: nnx.Rngs):
    self.model = resnet.ResNet(
        resnet.decode_variant(cfg.image_variant, dtype=jnp.dtype(cfg.dtype)), rngs=rngs)

  def __call__(self, images):
    """images [B, H, W, 3] (mean 0.5, std 0.5) -> the 4 stage outputs at strides 4..32,
    re-normalised with ImageNet's mean and std first, as lang-seg's ResNet sees them."""
    x = images.astype(jnp.float32) * 0.5 + 0.5
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    return self.model(x)


class Scratch(nnx.Module):
  """lang-seg's `scratch`: 3x3 projections, fusion blocks, `head1`, `head_block`."""

  def __init__(self, cfg: LSegConfig, text_dim: int, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    f = cfg.num_features
    for i, w in enumerate(DPT_WIDTHS[cfg.image_variant]):
      setattr(self, f"layer{i + 1}_rn", conv.Conv(
          w, f, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dtype, rngs=rngs))
    for i in range(4):
      setattr(self, f"refinenet{i + 1}", dpt.FusionBlock(f, dtype=dtype, rngs=rngs))
    self.head1 = conv.Conv(f, text_dim, (1, 1), dtype=dtype, rngs=rngs)
    self.head_block = (spatial_reg.SpatialRegularization(
        cfg.arch_option, cfg.block_depth, cfg.activation, rngs=rngs) if cfg.arch_option else None)

  def __call__(self, layers):
    """4 reassembled maps -> pixel features [B, H/4, W/4, D] (not normalised), before
    the x2 upsampling that ends lang-seg's refinenet1 (the caller upsamples)."""
    l1, l2, l3, l4 = (getattr(self, f"layer{i + 1}_rn")(x) for i, x in enumerate(layers))
    path = self.refinenet4(l4)
    path = self.refinenet3(path, l3)
    path = self.refinenet2(path, l2)
    # head1 (1x1) commutes with refinenet1's x2 upsampling as out_conv does: it runs
    # on the H/4 x W/4 map.
    return self.head1(self.refinenet1(path, l1, upsample=False))


class LSeg(nnx.Module):
  """The LSeg model (`LSegNet` of lang-seg) as a Flax NNX module."""

  def __init__(self, cfg: LSegConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    text_cfg = clip_text.decode_variant(
        cfg.text_variant, **({"vocab_size": cfg.text_vocab_size} if cfg.text_vocab_size else {}))
    self.clip_pretrained = clip_text.CLIPTextTransformer(text_cfg, rngs=rngs)
    self.text_dim = text_cfg.embed_dim
    self.pretrained = (PretrainedResNet(cfg, rngs=rngs) if cfg.image_encoder == "resnet"
                       else Pretrained(cfg, rngs=rngs))
    self.scratch = Scratch(cfg, self.text_dim, rngs=rngs)

  @property
  def patch_size(self) -> int | None:
    """The ViT's patch size; None for a ResNet backbone."""
    return None if self.cfg.image_encoder == "resnet" else self.pretrained.model.cfg.patch

  @property
  def size_multiple(self) -> int:
    """Input sides must be multiples of this: the patch size, or twice it for the patch-16 decoder,
    whose coarsest level halves the token grid; the output stride (32) of a ResNet."""
    if self.patch_size is None:
      return resnet.OUTPUT_STRIDE
    return 32 if self.patch_size == 16 else self.patch_size

  def check_images(self, images):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(
          f"expected images [B, H, W, 3] (NHWC, RGB, normalised with mean 0.5, std 0.5), "
          f"got shape {tuple(images.shape)}")
    h, w = images.shape[1:3]
    m = self.size_multiple
    if h % m or w % m:
      raise ValueError(
          f"image size {h}x{w} is not a multiple of {m} (backbone {self.cfg.backbone}); "
          f"resize or pad to a multiple of {m} pixels")

  def encode_text(self, tokens):
    """tokens [L, 77] int32 -> label embeddings [L, D] float32 (not normalised)."""
    return self.clip_pretrained(tokens)

  def _features(self, images):
    """images [B, H, W, 3] -> pixel features [B, H/4, W/4, D] float32, not normalised
    and not yet upsampled."""
    self.check_images(images)
    return self.scratch(self.pretrained(images)).astype(jnp.float32)

  def embed_pixels(self, images):
    """images [B, H, W, 3] -> L2-normalised pixel embeddings [B, H/2, W/2, D] float32."""
    x = resize.upsample2x_align_corners(self._features(images))
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

  def __call__(self, images, text_emb, label_mask=None):
    """images [B, H, W, 3] (mean 0.5, std 0.5; sides multiples of `size_multiple`), label embeddings
    [L, D] or [B, L, D] (any norm), optional bool label_mask [B, L] (False: not a candidate, logit
    -inf and out of the bottleneck max; every row needs a True) -> float32 logits [B, H, W, L]."""
    logits = resize.upsample2x_align_corners(self.half_logits(images, text_emb, label_mask))
    if label_mask is not None:
      logits = jnp.where(label_mask[:, None, None, :], logits, -jnp.inf)
    return logits

  def half_logits(self, images, text_emb, label_mask=None):
    """As `__call__`, before its last step (the bilinear x2 upsampling, then -inf for the
    labels `label_mask` rules out): float32 logits [B, H/2, W/2, L], 0 for ruled-out
    labels. The training loss runs on the upsampling's phases of these
    (`losses.upsampled_loss_and_accuracy`) instead of a full-size copy."""
    b = images.shape[0]
    if text_emb.ndim not in (2, 3) or text_emb.shape[-1] != self.text_dim:
      raise ValueError(f"expected text_emb [L, {self.text_dim}] or [B, L, {self.text_dim}], "
                       f"got shape {tuple(text_emb.shape)}")
    if text_emb.ndim == 3 and text_emb.shape[0] != b:
      raise ValueError(f"text_emb has batch {text_emb.shape[0]} but images have batch {b}")
    num_labels = text_emb.shape[-2]
    if num_labels == 0:
      raise ValueError("empty label set: text_emb has 0 labels")
    if label_mask is not None and tuple(label_mask.shape) != (b, num_labels):
      raise ValueError(f"expected label_mask [{b}, {num_labels}], got shape "
                       f"{tuple(label_mask.shape)}")

    x = self._features(images)
    text = text_emb.astype(jnp.float32)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    eq = "bhwd,ld->bhwl" if text.ndim == 2 else "bhwd,bld->bhwl"
    # The pixel embeddings are U x / |U x| (`embed_pixels`; U: the x2 upsampling). U is
    # linear, so their scores U x . t are U (x . t): L channels are upsampled instead
    # of D, and U x only enters through its norms (computed without making U x).
    scores = resize.upsample2x_align_corners(
        jnp.einsum(eq, x, text, precision=jax.lax.Precision.HIGHEST))
    norms = jnp.sqrt(resize.upsampled_squared_norms(x))[..., None]
    logits = LOGIT_SCALE * (scores / norms)
    if self.scratch.head_block is not None:
      logits = self.scratch.head_block(logits, label_mask)
    if label_mask is not None:
      # Zero (not -inf) through the resize: -inf * 0 weights would give NaN.
      logits = jnp.where(label_mask[:, None, None, :], logits, 0.0)
    return logits
