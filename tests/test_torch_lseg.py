"""The self-contained PyTorch LSeg: key layout, label semantics, checkpoint loading."""
import dataclasses
import math

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from lseg_jax.torch_lseg import LSegTorch, TorchLSegConfig  # noqa: E402

TINY = ("tiny_vit16", "tiny_vit32")
VOCAB = 64  # small vocabulary keeps the tiny text tower tiny
D = 16  # tiny text embedding width


def _model(backbone="tiny_vit16", seed=0, **kw):
  """A tiny model in eval mode with non-trivial BatchNorm statistics and head block."""
  torch.manual_seed(seed)
  model = LSegTorch(backbone=backbone, vocab_size=VOCAB, context_length=16, **kw).eval()
  with torch.no_grad():
    for name, buf in model.named_buffers():
      if name.endswith("running_mean"):
        buf.normal_(0, 0.1)
      elif name.endswith("running_var"):
        buf.uniform_(0.5, 1.5)
    for name, p in model.named_parameters():
      if "head_block" in name or name.endswith(("bn1.weight", "bn2.weight")):
        p.normal_(0, 0.5)
  return model


def _inputs(b=2, h=64, w=96, labels=5, seed=1):
  g = torch.Generator().manual_seed(seed)
  return torch.randn(b, 3, h, w, generator=g), torch.randn(labels, D, generator=g)


def _tokens(n, seed=2):
  g = torch.Generator().manual_seed(seed)
  tokens = torch.zeros(n, 16, dtype=torch.long)
  tokens[:, 0] = VOCAB - 2
  tokens[:, 1:4] = torch.randint(1, VOCAB - 2, (n, 3), generator=g)
  tokens[torch.arange(n), 4 + torch.arange(n) % 3] = VOCAB - 1  # end of text: largest id
  return tokens


def _close(a, b, rel=1e-5):
  err = (a - b).abs().max() / b.abs().max()
  assert err < rel, f"relative error {err:.3g} >= {rel}"


# ---------------------------------------------------------------------------
# Shapes and label semantics.


@pytest.mark.parametrize("backbone", TINY)
@pytest.mark.parametrize("arch_option", [0, 1, 2])
def test_forward_shapes_non_square(backbone, arch_option):
  model = _model(backbone, arch_option=arch_option, block_depth=2)
  x, text = _inputs()
  with torch.no_grad():
    out = model(x, text)
    per_example = model(x, text.expand(2, -1, -1))
    pix = model.pixel_features(x)
  assert out.shape == (2, 5, 64, 96) and out.dtype == torch.float32
  assert per_example.shape == (2, 5, 64, 96)
  assert pix.shape == (2, D, 32, 48)
  assert torch.isfinite(out).all()


def test_logit_scale_and_cosine_bound():
  model = _model()
  assert model.logit_scale.item() == torch.tensor(math.log(1 / 0.07)).exp().item()
  assert "logit_scale" not in model.state_dict()
  x, text = _inputs()
  with torch.no_grad():
    out = model(x, text)
  # Cosine logits times 1/0.07; bilinear resizing stays within the range.
  assert out.abs().max() <= model.logit_scale * (1 + 1e-6)


@pytest.mark.parametrize("arch_option", [0, 1, 2])
def test_label_permutation_equivariance(arch_option):
  model = _model(arch_option=arch_option, block_depth=3, activation="tanh")
  x, text = _inputs(labels=6)
  perm = torch.tensor([3, 0, 5, 1, 4, 2])
  with torch.no_grad():
    out = model(x, text)
    out_perm = model(x, text[perm])
  _close(out_perm, out[:, perm])


@pytest.mark.parametrize("arch_option", [0, 1, 2])
def test_masked_labels_change_nothing(arch_option):
  model = _model(arch_option=arch_option, block_depth=2)
  x, text = _inputs(labels=6)
  mask = torch.tensor([[True, False, True, True, False, True],
                       [False, True, True, False, False, True]])
  garbage = text.clone()
  garbage[~mask.any(0)] = 100.0  # label 4: masked everywhere
  with torch.no_grad():
    out = model(x, text, mask)
    out_garbage = model(x, garbage, mask)
    for i in range(2):
      keep = mask[i]
      alone = model(x[i:i + 1], text[keep])
      _close(out[i, keep], alone[0])
      assert torch.isneginf(out[i, ~keep]).all()
  torch.testing.assert_close(out, out_garbage, rtol=0, atol=0)


def test_all_true_mask_is_no_mask():
  model = _model(arch_option=1, block_depth=2)
  x, text = _inputs()
  with torch.no_grad():
    torch.testing.assert_close(model(x, text, torch.ones(2, 5, dtype=torch.bool)),
                               model(x, text), rtol=0, atol=0)


def test_per_example_text_matches_shared():
  model = _model(arch_option=1, block_depth=2)
  x, text = _inputs(labels=4)
  other = torch.randn(4, D, generator=torch.Generator().manual_seed(5))
  with torch.no_grad():
    both = model(x, torch.stack([text, other]))
    _close(both[:1], model(x[:1], text))
    _close(both[1:], model(x[1:], other))


def test_head_block_runs_block_depth_times_with_shared_weights():
  """Official semantics: act(block(x)) block_depth-1 times, then block(x)."""
  model = _model(arch_option=1, block_depth=3, activation="tanh")
  x, text = _inputs()
  conv = model.scratch.head_block.depthwise.depthwise
  with torch.no_grad():
    y = model.cosine_logits(x, text)
    for i in range(3):
      b, l, h, w = y.shape
      y = conv(y.reshape(b * l, 1, h, w)).reshape(b, l, h, w) + y.amax(1, keepdim=True)
      y = torch.tanh(y) if i < 2 else y
    expected = torch.nn.functional.interpolate(y, scale_factor=2, mode="bilinear",
                                               align_corners=True)
    _close(model(x, text), expected)
    # As in the official loop, depth 0 runs the block once, like depth 1.
    model.config = dataclasses.replace(model.config, block_depth=0)
    depth0 = model(x, text)
    model.config = dataclasses.replace(model.config, block_depth=1)
    torch.testing.assert_close(depth0, model(x, text), rtol=0, atol=0)


def test_forward_labels_runs_the_text_tower():
  model = _model()
  x, _ = _inputs()
  tokens = _tokens(3)
  with torch.no_grad():
    text = model.encode_text(tokens)
    assert text.shape == (3, D)
    torch.testing.assert_close(model.forward_labels(x, tokens), model(x, text))


@pytest.mark.parametrize("readout", ["ignore", "add", "project"])
def test_readouts(readout):
  model = _model(readout=readout)
  has_project = any(".0.project." in k for k in model.state_dict())
  assert has_project == (readout == "project")
  with torch.no_grad():
    assert model(*_inputs()).shape == (2, 5, 64, 96)


def test_bad_inputs_raise():
  model = _model()
  x, text = _inputs()
  with pytest.raises(ValueError, match="multiples of 32"):
    model(torch.zeros(1, 3, 48, 64), text)
  with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
    model(torch.zeros(1, 64, 64, 3), text)
  with pytest.raises(ValueError, match="text_features"):
    model(x, torch.zeros(5, D + 1))
  with pytest.raises(ValueError, match="text_features"):
    model(x, torch.zeros(3, 5, D))
  with pytest.raises(ValueError, match="empty label set"):
    model(x, torch.zeros(0, D))
  with pytest.raises(ValueError, match="label_mask"):
    model(x, text, torch.ones(2, 4, dtype=torch.bool))
  with pytest.raises(ValueError, match="label_mask"):
    model(x, text, torch.ones(2, 5))
  with pytest.raises(ValueError, match="backbone"):
    TorchLSegConfig(backbone="vit_huge")
  with pytest.raises(ValueError, match="readout"):
    TorchLSegConfig(readout="concat")
  with pytest.raises(ValueError, match="activation"):
    TorchLSegConfig(activation="gelu")


# ---------------------------------------------------------------------------
# Checkpoints.


def _assert_same_model(a, b):
  sa, sb = a.state_dict(), b.state_dict()
  assert sa.keys() == sb.keys()
  for k in sa:
    torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
  assert a.config == b.config
  x, text = _inputs()
  with torch.no_grad():
    torch.testing.assert_close(a(x, text), b(x, text), rtol=0, atol=0)


@pytest.mark.parametrize("backbone,arch_option", [("tiny_vit16", 2), ("tiny_vit32", 1)])
def test_checkpoint_round_trip_with_metadata(tmp_path, backbone, arch_option):
  model = _model(backbone, arch_option=arch_option, block_depth=3, activation="relu")
  model.save_checkpoint(tmp_path / "m.pt")
  loaded = LSegTorch.from_checkpoint(tmp_path / "m.pt")
  assert not loaded.training
  _assert_same_model(model, loaded)


@pytest.mark.parametrize("backbone", TINY)
def test_bare_state_dict_config_inferred(tmp_path, backbone):
  model = _model(backbone, features=24)
  torch.save(model.state_dict(), tmp_path / "bare.pt")
  _assert_same_model(model, LSegTorch.from_checkpoint(tmp_path / "bare.pt"))


def test_lightning_checkpoint_with_image_tower_keys(tmp_path):
  model = _model("tiny_vit32", arch_option=1, block_depth=2, activation="tanh")
  sd = {"net." + k: v for k, v in model.state_dict().items()}
  sd["net.clip_pretrained.visual.conv1.weight"] = torch.zeros(4, 3, 2, 2)
  sd["net.clip_pretrained.logit_scale"] = torch.tensor(4.6)
  hparams = dict(backbone="tiny_vit32", num_features=16, arch_option=1, block_depth=2,
                 activation="tanh", base_lr=0.004)
  torch.save({"state_dict": sd, "hyper_parameters": hparams, "epoch": 3},
             tmp_path / "m.ckpt")
  _assert_same_model(model, LSegTorch.from_checkpoint(tmp_path / "m.ckpt"))


def test_checkpoint_errors(tmp_path):
  model = _model(arch_option=2, block_depth=2, readout="add")
  torch.save(model.state_dict(), tmp_path / "bare.pt")
  with pytest.raises(ValueError, match="readout"):
    LSegTorch.from_checkpoint(tmp_path / "bare.pt")
  with pytest.raises(ValueError, match="arch_option"):
    LSegTorch.from_checkpoint(tmp_path / "bare.pt", readout="add")
  with pytest.raises(ValueError, match="block_depth"):
    LSegTorch.from_checkpoint(tmp_path / "bare.pt", readout="add", arch_option=2)
  with pytest.raises(ValueError, match="activation"):
    LSegTorch.from_checkpoint(tmp_path / "bare.pt", readout="add", arch_option=2,
                              block_depth=2)
  _assert_same_model(model, LSegTorch.from_checkpoint(
      tmp_path / "bare.pt", readout="add", arch_option=2, block_depth=2,
      activation="lrelu"))
  with pytest.raises(ValueError, match="unknown config overrides"):
    LSegTorch.from_checkpoint(tmp_path / "bare.pt", depth=3)
  torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
  with pytest.raises(ValueError, match="not an LSeg state dict"):
    LSegTorch.from_checkpoint(tmp_path / "other.pt")
  # A wrong config (here: the other tiny structure) fails the strict load.
  with pytest.raises(RuntimeError):
    LSegTorch.from_checkpoint(tmp_path / "bare.pt", backbone="tiny_vit32", readout="add",
                              arch_option=2, block_depth=2, activation="lrelu")


# ---------------------------------------------------------------------------
# Full-size key layout (built on the meta device: no memory, no initialisation).


def official_batch_norm(layout, name, c):
  """Adds the keys of an nn.BatchNorm2d(c) called `name` to `layout`."""
  layout.update({f"{name}.{s}": (c,) for s in ("weight", "bias", "running_mean",
                                               "running_var")})
  layout[f"{name}.num_batches_tracked"] = ()


def official_clip_text_layout(tw, te, layers):
  """{key: shape} of `clip_pretrained`: OpenAI CLIP's text tower (width tw, output te)."""
  clip = {"token_embedding.weight": (49408, tw), "positional_embedding": (77, tw),
          "ln_final.weight": (tw,), "ln_final.bias": (tw,), "text_projection": (tw, te)}
  for i in range(layers):
    p = f"transformer.resblocks.{i}."
    clip.update({p + "attn.in_proj_weight": (3 * tw, tw), p + "attn.in_proj_bias": (3 * tw,),
                 p + "attn.out_proj.weight": (tw, tw), p + "attn.out_proj.bias": (tw,),
                 p + "mlp.c_fc.weight": (4 * tw, tw), p + "mlp.c_fc.bias": (4 * tw,),
                 p + "mlp.c_proj.weight": (tw, 4 * tw), p + "mlp.c_proj.bias": (tw,)})
    for ln in ("ln_1", "ln_2"):
      clip.update({p + ln + ".weight": (tw,), p + ln + ".bias": (tw,)})
  return {"clip_pretrained." + k: s for k, s in clip.items()}


def official_scratch_layout(widths, te, feats=256):
  """{key: shape} of `scratch` without a head block: layerN_rn from the encoder's
  `widths`, fusion blocks with BatchNorm, head1 to the text width te."""
  layout = {}
  for n, f in enumerate(widths, start=1):
    layout[f"scratch.layer{n}_rn.weight"] = (feats, f, 3, 3)
    p = f"scratch.refinenet{n}."
    layout.update({p + "out_conv.weight": (feats, feats, 1, 1), p + "out_conv.bias": (feats,)})
    for unit in ("resConfUnit1", "resConfUnit2"):
      for j in (1, 2):
        layout[f"{p}{unit}.conv{j}.weight"] = (feats, feats, 3, 3)
        official_batch_norm(layout, f"{p}{unit}.bn{j}", feats)
  layout.update({"scratch.head1.weight": (te, feats, 1, 1), "scratch.head1.bias": (te,)})
  return layout


def _official_layout(backbone):
  """{key: shape} of the official LSegNet minus CLIP's image side, written from the
  official construction code (`lseg_vit.py`, `lseg_blocks.py`, `lseg_net.py`)."""
  timm_name, vit_width, widths, resample, (tw, te, layers) = {
      "clip_vitl16_384": ("vit_large_patch16_384", 1024, (256, 512, 1024, 1024),
                          ("deconv4", "deconv2", None, "conv3s2"), (512, 512, 12)),
      "clipRN50x16_vitl16_384": ("vit_large_patch16_384", 1024, (256, 512, 1024, 1024),
                                 ("deconv4", "deconv2", None, "conv3s2"), (768, 768, 12)),
      "clip_vitb32_384": ("vit_base_patch32_384", 768, (96, 192, 384, 768),
                          ("deconv8", "deconv4", "deconv2", None), (512, 512, 12)),
  }[backbone]
  # clip_pretrained: OpenAI CLIP's text tower.
  layout = official_clip_text_layout(tw, te, layers)
  # pretrained.model: the timm ViT, as timm builds it.
  with torch.device("meta"):
    vit = timm.create_model(timm_name, pretrained=False)
  layout.update({"pretrained.model." + k: tuple(v.shape) for k, v in vit.state_dict().items()})
  # pretrained.act_postprocessN: readout project, 1x1 conv, resampling conv.
  for n, (f, r) in enumerate(zip(widths, resample), start=1):
    p = f"pretrained.act_postprocess{n}."
    layout.update({p + "0.project.0.weight": (vit_width, 2 * vit_width),
                   p + "0.project.0.bias": (vit_width,),
                   p + "3.weight": (f, vit_width, 1, 1), p + "3.bias": (f,)})
    if r is not None:
      k = 3 if r == "conv3s2" else int(r[len("deconv"):])
      layout.update({p + "4.weight": (f, f, k, k), p + "4.bias": (f,)})
  # scratch: layerN_rn, fusion blocks with BatchNorm, head1, head block.
  layout.update(official_scratch_layout(widths, te))
  layout.update({"scratch.head_block.depthwise.depthwise.weight": (1, 1, 3, 3),
                 "scratch.head_block.depthwise.depthwise.bias": (1,)})
  return layout


@pytest.mark.slow
@pytest.mark.parametrize("backbone",
                         ["clip_vitl16_384", "clip_vitb32_384", "clipRN50x16_vitl16_384"])
def test_full_size_key_layout_is_official(backbone):
  with torch.device("meta"):
    model = LSegTorch(backbone=backbone, arch_option=1, block_depth=2)
  ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  expected = _official_layout(backbone)
  assert sorted(set(ours) ^ set(expected)) == []
  assert {k: s for k, s in ours.items() if expected[k] != s} == {}
  with torch.device("meta"):
    plain = LSegTorch(backbone=backbone)
  assert set(plain.state_dict()) == {k for k in expected if "head_block" not in k}


@pytest.mark.slow
def test_full_size_b32_forward():
  """One real full-size forward (B/32 is the cheap one): shapes and finiteness."""
  torch.manual_seed(0)
  model = LSegTorch(backbone="clip_vitb32_384").eval()
  with torch.no_grad():
    out = model(torch.randn(1, 3, 256, 320), torch.randn(3, 512))
  assert out.shape == (1, 3, 256, 320) and torch.isfinite(out).all()
