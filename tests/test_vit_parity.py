"""Our ViT vs timm's `VisionTransformer` on random weights loaded with `load_timm_vit`.

The reference forward is lang-seg's `forward_flex`: position embeddings resized
bilinearly (align_corners=False) from the 384-px grid to the input grid, and the
hooked outputs taken by forward hooks after the hooked blocks. Every hooked output
must agree to a relative error (max|a - b| / max|b|) below 1e-5.
"""
from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from lseg_jax.convert import mapping, timm_vit
from lseg_jax.models import vit

import test_convert_common as common

torch = common.torch
F = torch.nn.functional
TOL = 1e-5


def make_timm_vit(variant: str, seed: int = 0, num_classes: int = 1000):
  cfg = vit.decode_variant(variant)
  model = common.timm_vision_transformer.VisionTransformer(
      img_size=384, patch_size=cfg.patch, embed_dim=cfg.width, depth=cfg.depth,
      num_heads=cfg.heads, mlp_ratio=cfg.mlp_dim / cfg.width, num_classes=num_classes)
  return common.randomize_torch_(model, seed).eval()


@torch.no_grad()
def timm_forward_flex(model, images_nhwc, hooks):
  """lang-seg's forward_flex on a timm ViT -> the hooked block outputs [B, 1 + N, C]."""
  x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
  outputs = {}
  handles = [model.blocks[i].register_forward_hook(
      lambda module, args, out, i=i: outputs.__setitem__(i, out)) for i in hooks]
  try:
    b, _, h, w = x.shape
    p = model.patch_embed.proj.kernel_size[0]
    gh, gw = h // p, w // p
    pos = model.pos_embed
    g = int(round((pos.shape[1] - 1) ** 0.5))
    grid = pos[0, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
    pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)
    tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.cls_token.expand(b, -1, -1), tokens], dim=1) + pos
    tokens = model.pos_drop(tokens)
    for block in model.blocks:
      tokens = block(tokens)
    model.norm(tokens)
  finally:
    for handle in handles:
      handle.remove()
  return [outputs[i].numpy() for i in hooks]


@nnx.jit
def _hooked(model, images):
  return model(images)


def check_vit(variant, height, width, seed=0):
  tvit = make_timm_vit(variant, seed)
  cfg = vit.decode_variant(variant)
  # Random values first, so that a parameter the loader missed shows up.
  jvit = common.build_random(lambda: vit.VisionTransformer(cfg, rngs=nnx.Rngs(0)), seed + 1)
  timm_vit.load_timm_vit(tvit.state_dict(), jvit)
  images = np.random.default_rng(seed).uniform(-1, 1, (2, height, width, 3)).astype(np.float32)
  ref = timm_forward_flex(tvit, images, cfg.hooks)
  out = _hooked(jvit, jnp.asarray(images))
  assert len(out) == len(ref) == 4
  errors = [common.rel_error(o, r) for o, r in zip(out, ref)]
  print(f"\nViT {variant} {height}x{width}: rel err per hook "
        + ", ".join(f"{e:.2e}" for e in errors))
  assert max(errors) < TOL, errors


@pytest.mark.parametrize("height,width", [(384, 384), (384, 512)])
def test_vit_b32_matches_timm(height, width):
  check_vit("B/32", height, width)


@pytest.mark.slow
@pytest.mark.parametrize("height,width", [(384, 384), (384, 512)])
def test_vit_l16_matches_timm(height, width):
  check_vit("L/16", height, width)


def test_tiny_vit16_matches_timm():
  check_vit("tiny/16", 64, 96)


# ---------------------------------------------------------------------------
# Loading paths and errors.
# ---------------------------------------------------------------------------
def _assert_same(module_a, module_b):
  a, b = mapping.flatten_params(module_a), mapping.flatten_params(module_b)
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_load_from_files_and_export(tmp_path):
  """torch file, safetensors file, and a variant name instead of a module; the
  export loads strictly into timm and reproduces the weights."""
  tvit = make_timm_vit("tiny/16", seed=2)
  state_dict = tvit.state_dict()
  torch.save(state_dict, tmp_path / "vit.pth")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  safetensors_torch.save_file({k: v.contiguous() for k, v in state_dict.items()},
                              str(tmp_path / "vit.safetensors"))
  direct = timm_vit.load_timm_vit(state_dict, "tiny/16")
  for source in (tmp_path / "vit.pth", str(tmp_path / "vit.safetensors")):
    _assert_same(direct, timm_vit.load_timm_vit(source, vit.decode_variant("tiny/16")))

  exported = timm_vit.export_timm_vit(direct)
  fresh = make_timm_vit("tiny/16", seed=5)
  fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()},
                        strict=True)
  for key, value in state_dict.items():
    assert torch.equal(fresh.state_dict()[key], value), key


def test_prefixed_keys_are_found():
  """A ViT inside a larger checkpoint (lang-seg's `pretrained.model.`)."""
  state_dict = {"pretrained.model." + k: v for k, v in make_timm_vit("tiny/32").state_dict().items()}
  state_dict["scratch.layer1_rn.weight"] = torch.zeros(16, 8, 3, 3)
  loaded = timm_vit.load_timm_vit(state_dict, "tiny/32")
  np.testing.assert_array_equal(np.asarray(loaded.cls_token[...]),
                                state_dict["pretrained.model.cls_token"].numpy())


def test_headless_model_skips_the_classifier():
  cfg = vit.decode_variant("tiny/16", num_classes=0)
  loaded = timm_vit.load_timm_vit(make_timm_vit("tiny/16").state_dict(), cfg)
  assert loaded.head is None
  assert not any(k.startswith("head") for k in timm_vit.export_timm_vit(loaded))


def test_mismatched_weights_name_the_keys():
  state_dict = make_timm_vit("tiny/16").state_dict()
  del state_dict["blocks.1.attn.qkv.weight"]
  state_dict["pre_logits.fc.weight"] = torch.zeros(4, 4)
  with pytest.raises(mapping.MappingError) as info:
    timm_vit.load_timm_vit(state_dict, "tiny/16")
  message = str(info.value)
  assert "blocks.1.attn.qkv.weight" in message and "pre_logits.fc.weight" in message

  # A patch-16 ViT loaded as patch 32: the patch embedding and grid do not fit.
  with pytest.raises(mapping.MappingError, match="patch_embed.proj.weight"):
    timm_vit.load_timm_vit(make_timm_vit("tiny/16").state_dict(), "tiny/32")
