"""Helpers shared by the conversion and parity tests, and table-coverage checks.

The coverage checks run on shapes only (PyTorch modules on the `meta` device and
abstract JAX models), so they cover the full-size backbones at no cost.
"""
from __future__ import annotations

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax import langseg_layout
from lseg_jax.convert import langseg, mapping, timm_vit
from lseg_jax.models import lseg, vit

torch = pytest.importorskip("torch")
timm_vision_transformer = pytest.importorskip("timm.models.vision_transformer")
from lseg_jax.torch_lseg import lseg as torch_lseg  # noqa: E402  pylint: disable=g-import-not-at-top

TINY_VOCAB = 100
TINY = ("tiny_vit16", "tiny_vit32", "tiny_resnet")
FULL = ("clip_vitl16_384", "clip_vitb32_384", "clipRN50x16_vitl16_384", "clip_resnet101")
# (arch_option, block_depth) pairs the parity tests run.
HEADS = ((0, 0), (1, 1), (1, 2), (2, 1), (2, 2))


def rel_error(a, b) -> float:
  """max|a - b| / max|b| over finite entries; -inf positions must agree."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  finite = np.isfinite(b)
  np.testing.assert_array_equal(np.isfinite(a), finite)
  np.testing.assert_array_equal(a[~finite], b[~finite])
  return float(np.max(np.abs(a[finite] - b[finite])) / np.max(np.abs(b[finite])))


def jax_config(backbone, arch_option=0, block_depth=0, activation="lrelu"):
  tiny = backbone.startswith("tiny")
  return lseg.LSegConfig(backbone=backbone, arch_option=arch_option, block_depth=block_depth,
                         activation=activation, text_vocab_size=TINY_VOCAB if tiny else None)


def torch_config(backbone, arch_option=0, block_depth=0, activation="lrelu"):
  return torch_lseg.TorchLSegConfig(**langseg.torch_config(
      jax_config(backbone, arch_option, block_depth, activation)))


def _is_scale(name: str) -> bool:
  """LayerNorm / BatchNorm weights: randomised around 1."""
  parts = name.split(".")
  return parts[-1] == "weight" and (any(
      p.startswith(("norm", "ln_", "bn")) for p in parts[-2:])
      or name.endswith("downsample.1.weight"))  # torchvision ResNet's projection BN


@torch.no_grad()
def randomize_torch_(module, seed: int = 0):
  """Every parameter and BatchNorm statistic random (deterministic in `seed`);
  weights scaled by 1/sqrt(fan_in) so activations stay O(1) through deep stacks."""
  gen = torch.Generator().manual_seed(seed)
  for name, p in module.named_parameters():
    noise = torch.randn(p.shape, generator=gen)
    if name.endswith("bn3.weight"):
      # The last BatchNorm of a ResNet Bottleneck: small, as trained ResNets have it.
      # With scales near 1 the residual stream of ResNet-101 in train mode is so badly
      # conditioned that torch's own float32 result is 6e-4 (relative) from float64.
      p.copy_(0.1 * (1 + 0.2 * noise))
    elif _is_scale(name):
      p.copy_(1 + 0.2 * noise)
    elif name.endswith(("cls_token", "pos_embed", "positional_embedding")):
      p.copy_(0.5 * noise)
    elif p.ndim >= 2:
      p.copy_(noise / p[0].numel()**0.5)
    else:
      p.copy_(0.2 * noise)
  for name, b in module.named_buffers():
    if name.endswith("running_mean"):
      b.copy_(0.2 * torch.randn(b.shape, generator=gen))
    elif name.endswith("running_var"):
      b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    elif name.endswith("num_batches_tracked"):
      b.fill_(int(torch.randint(0, 1000, (), generator=gen)))
  return module


def random_like(abstract_flat, seed: int = 0) -> dict[str, np.ndarray]:
  """Random values for flat NNX params {path: array or ShapeDtypeStruct}: every
  parameter and BatchStat, deterministic in `seed`."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, value in sorted(abstract_flat.items()):
    shape = tuple(value.shape)
    if path.endswith("num_batches_tracked"):
      flat[path] = rng.integers(0, 1000, shape).astype(np.int32)
    elif path.endswith("/var"):
      flat[path] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif path.endswith("/scale"):
      flat[path] = (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    elif path.endswith(("cls_token", "pos_embed", "positional_embedding")):
      flat[path] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
    elif len(shape) >= 2:
      fan_in = int(np.prod(shape[:-1])) if path.endswith("kernel") else shape[-1]
      flat[path] = (rng.standard_normal(shape, np.float32) / np.float32(fan_in**0.5))
    else:
      flat[path] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
  return flat


def build_random(factory, seed: int = 0):
  """An NNX module from `factory` with every parameter and BatchStat random, built
  without running its initialisers."""
  abstract = nnx.eval_shape(factory)
  graphdef, _ = nnx.split(abstract)
  flat = random_like(mapping.flatten_params(abstract), seed)
  return nnx.merge(graphdef, mapping.unflatten({k: jnp.asarray(v) for k, v in flat.items()}))


def make_torch_lseg(backbone, arch_option=0, block_depth=0, activation="lrelu", seed=0):
  model = torch_lseg.LSegTorch(torch_config(backbone, arch_option, block_depth, activation))
  return randomize_torch_(model, seed).eval()


def make_jax_lseg(backbone, arch_option=0, block_depth=0, activation="lrelu", seed=0):
  cfg = jax_config(backbone, arch_option, block_depth, activation)
  model = build_random(lambda: lseg.LSeg(cfg, rngs=nnx.Rngs(0)), seed)
  model.eval()
  return model


def inputs(text_dim, batch=2, height=64, width=96, labels=5, seed=0):
  """(images [B, H, W, 3], text [L, D], per-example text [B, L, D], mask [B, L])."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (batch, height, width, 3)).astype(np.float32)
  text = rng.standard_normal((labels, text_dim)).astype(np.float32)
  text_b = rng.standard_normal((batch, labels, text_dim)).astype(np.float32)
  mask = rng.uniform(size=(batch, labels)) < 0.6
  mask[:, 0] = True
  return images, text, text_b, mask


@nnx.jit
def jax_logits(model, images, text, text_b, mask):
  """(logits with shared labels, logits with per-example labels and a mask)."""
  return model(images, text), model(images, text_b, mask)


@torch.no_grad()
def torch_logits(model, images, text, text_b, mask):
  x = torch.from_numpy(images).permute(0, 3, 1, 2)
  shared = model(x, torch.from_numpy(text))
  per_example = model(x, torch.from_numpy(text_b), torch.from_numpy(mask))
  return tuple(y.permute(0, 2, 3, 1).numpy() for y in (shared, per_example))


def meta_state_dict(module) -> dict[str, np.ndarray]:
  """A meta-device module's state dict as zero-strided numpy arrays (no memory)."""
  return {k: np.broadcast_to(np.zeros((), np.float32 if v.is_floating_point() else np.int64),
                             tuple(v.shape))
          for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------
# Table coverage on shapes: every key maps, nothing left over, shapes agree.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("backbone,arch_option", [
    *[(b, a) for b in TINY for a in (0, 1, 2)],
    ("clip_vitl16_384", 1),
    # The abstract full-size models take a while to trace: the others run with the
    # slow tests.
    *[pytest.param(b, a, marks=pytest.mark.slow) for b in FULL for a in (0, 1, 2)
      if (b, a) != ("clip_vitl16_384", 1)],
])
def test_langseg_table_covers_torch_lseg(backbone, arch_option):
  with torch.device("meta"):
    tmodel = torch_lseg.LSegTorch(torch_config(backbone, arch_option, 2))
  sd = meta_state_dict(tmodel)
  cfg = jax_config(backbone, arch_option, 2)
  abstract = nnx.eval_shape(lambda: lseg.LSeg(cfg, rngs=nnx.Rngs(0)))
  params = mapping.flatten_params(
      mapping.torch_to_nnx(sd, langseg.table_for(cfg), abstract))
  assert set(params) == set(mapping.flatten_params(abstract))
  # The shapes alone tell everything but the head-block kind, depth and activation.
  inferred = langseg.infer_config(sd, arch_option=arch_option, block_depth=2,
                                  activation="lrelu")
  assert inferred == cfg


@pytest.mark.parametrize("variant,patch,width,depth,heads", [
    ("B/32", 32, 768, 12, 12), ("L/16", 16, 1024, 24, 16), ("tiny/16", 16, 32, 4, 2)])
def test_timm_table_covers_timm_vit(variant, patch, width, depth, heads):
  cfg = vit.decode_variant(variant)
  with torch.device("meta"):
    tvit = timm_vision_transformer.VisionTransformer(
        img_size=384, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
        mlp_ratio=cfg.mlp_dim / width, num_classes=1000)
  sd = meta_state_dict(tvit)
  abstract = nnx.eval_shape(lambda: vit.VisionTransformer(cfg, rngs=nnx.Rngs(0)))
  params = mapping.torch_to_nnx(sd, timm_vit.table(), abstract)
  assert set(mapping.flatten_params(params)) == set(mapping.flatten_params(abstract))
  assert langseg_layout.vit_shapes(sd) == dict(width=width, patch=patch, depth=depth,
                                               grid=384 // patch)
