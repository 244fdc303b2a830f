"""`tools/convert.py` with lang-seg's zero-shot checkpoints, on tiny random weights.

The released zero-shot models are Lightning `.ckpt` files of `LSegModuleZS`: the
ResNet-101 ones (`pascal_fold{0..3}.ckpt`, `coco_fold{0..3}.ckpt`, `fss_rn101.ckpt`) hold
an `LSegRNNetZS` (keys `pretrained.layer1..4.*`), the ViT one (`fss_l16.ckpt`) an
`LSegNetZS`, whose layout is `LSegNet`'s with arch_option 0. The tests write such files
from random weights (`tiny_resnet`, `tiny_vit16`), import, export and import again.
"""
import numpy as np
import pytest

from lseg_jax import checkpoint
from lseg_jax.convert import langseg, mapping

import test_convert_common as common
from test_convert_roundtrip import check_round_trip
from test_convert_tool import (_official_lsegnet, assert_nothing_written, assert_same_tensors,
                               lightning_checkpoint, run)

torch = common.torch
torch_lseg = common.torch_lseg
# What `test_lseg_zs.py` passes to `LSegModuleZS.load_from_checkpoint` (Lightning saves
# the module's hyper-parameters in the file).
ZS_HPARAMS = dict(num_features=16, arch_option=0, block_depth=0, activation="relu",
                  fold=0, nshot=0, widehead=True, base_lr=0.004, use_pretrained="True")


def zero_shot_checkpoint(backbone, path, seed=0, **kw):
  tmodel = common.make_torch_lseg(backbone, seed=seed)
  written = lightning_checkpoint(tmodel, path, **kw)
  obj = torch.load(path, weights_only=False)
  obj["hyper_parameters"] = {**ZS_HPARAMS, "backbone": backbone}
  torch.save(obj, path)
  return tmodel, written


def test_import_export_resnet_lightning_checkpoint(tmp_path, capsys):
  _, written = zero_shot_checkpoint("tiny_resnet", tmp_path / "pascal_fold0.ckpt")
  rc, log = run(capsys, "import", tmp_path / "pascal_fold0.ckpt", tmp_path / "imported",
                "--trust-pickle")
  assert rc == 0, log
  model, meta = checkpoint.load_model(str(tmp_path / "imported"))
  assert model.cfg == common.jax_config("tiny_resnet", activation="relu")
  assert meta["source"]["format"] == "lang-seg LSegRNNetZS"
  assert meta["source"]["hyper_parameters"]["fold"] == 0
  assert_same_tensors(langseg.export_langseg(model), written)

  # Export: the official layout, loadable by the official model (stand-in: ours plus
  # CLIP's image side) with only that image side missing; import again: bit-identical.
  rc, log = run(capsys, "export", tmp_path / "imported", tmp_path / "exported.pt")
  assert rc == 0, log
  obj = torch.load(tmp_path / "exported.pt", weights_only=True)
  tcfg = torch_lseg.TorchLSegConfig(**obj["lseg_config"])
  assert tcfg.backbone == "tiny_resnet"
  result = _official_lsegnet(tcfg).load_state_dict(obj["state_dict"], strict=False)
  assert not result.unexpected_keys
  assert all(k.startswith("clip_pretrained.visual.") or k == "clip_pretrained.logit_scale"
             for k in result.missing_keys)
  for key, value in obj["state_dict"].items():
    assert torch.equal(value, written[key].to(value.dtype)), key
  rc, log = run(capsys, "import", tmp_path / "exported.pt", tmp_path / "again")
  assert rc == 0, log
  again, _ = checkpoint.load_model(str(tmp_path / "again"))
  assert again.cfg == model.cfg
  a, b = mapping.flatten_params(model), mapping.flatten_params(again)
  assert set(a) == set(b)
  assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


@pytest.mark.parametrize("fmt", ["bare.pt", "safetensors"])
def test_import_bare_resnet_state_dicts(tmp_path, capsys, fmt):
  tmodel = common.make_torch_lseg("tiny_resnet", seed=1)
  state_dict = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  if fmt == "safetensors":
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    src = tmp_path / "fss_rn101.safetensors"
    safetensors_numpy.save_file(state_dict, str(src))
  else:
    src = tmp_path / "fss_rn101.pt"
    torch.save(tmodel.state_dict(), src)
  rc, log = run(capsys, "import", src, tmp_path / "out")
  assert rc == 0 and "tiny_resnet" in log, log
  model, _ = checkpoint.load_model(str(tmp_path / "out"))
  exported = langseg.export_langseg(model)
  assert set(exported) == set(state_dict)
  assert all(np.array_equal(exported[k], v) for k, v in state_dict.items())


@pytest.mark.slow
def test_full_resnet101_round_trip(tmp_path):
  check_round_trip("clip_resnet101", 0, 0, tmp_path, 128, 96)


def _write_missing_keys(path):
  zero_shot_checkpoint("tiny_resnet", path, drop=(
      "pretrained.layer3.0.downsample.1.running_var", "pretrained.layer1.4.0.conv2.weight"))
  return ["pretrained.layer3.0.downsample.1.running_var", "pretrained.layer1.4.0.conv2.weight",
          "missing torch keys"]


def _write_mis_shaped(path):
  zero_shot_checkpoint("tiny_resnet", path,
                       extra={"pretrained.layer2.0.conv2.weight": torch.zeros(128, 128, 1, 1),
                              "scratch.layer4_rn.weight": torch.zeros(16, 1024, 3, 3)})
  return ["mis-shaped keys", "pretrained.layer2.0.conv2.weight", "scratch.layer4_rn.weight"]


def _write_torchvision_resnet(path):
  tv_resnet = pytest.importorskip("torchvision.models.resnet")
  torch.save(tv_resnet.ResNet(tv_resnet.Bottleneck, [1, 1, 1, 1]).state_dict(), path)
  return ["not an LSegNet state dict", "load_torchvision_resnet"]


def _write_unknown_depth(path):
  tmodel = common.make_torch_lseg("tiny_resnet")
  extra = {"pretrained.layer2.1." + k[len("pretrained.layer2.0."):]: v
           for k, v in tmodel.state_dict().items()
           if k.startswith("pretrained.layer2.0.") and "downsample" not in k}
  zero_shot_checkpoint("tiny_resnet", path, extra=extra)
  return ["unknown torch keys", "pretrained.layer2.1.conv1.weight"]


@pytest.mark.parametrize("write", [_write_missing_keys, _write_mis_shaped,
                                   _write_torchvision_resnet, _write_unknown_depth])
def test_bad_resnet_checkpoint_is_reported_and_nothing_is_written(write, tmp_path, capsys):
  src = tmp_path / "bad.ckpt"
  expected = write(src)
  rc, log = run(capsys, "import", src, tmp_path / "out", "--trust-pickle")
  assert rc == 2 and "error: cannot import" in log, log
  for text in expected:
    assert text in log, (text, log)
  assert_nothing_written(tmp_path, tmp_path / "out", ["bad.ckpt"])


def test_resnet_depth_without_backbone_hint_is_named(tmp_path, capsys):
  """Without hyper-parameters, a ResNet of unknown depth is refused by name."""
  tmodel = common.make_torch_lseg("tiny_resnet")
  sd = dict(tmodel.state_dict())
  sd.update({"pretrained.layer2.1." + k[len("pretrained.layer2.0."):]: v
             for k, v in tmodel.state_dict().items()
             if k.startswith("pretrained.layer2.0.") and "downsample" not in k})
  torch.save(sd, tmp_path / "bad.pt")
  rc, log = run(capsys, "import", tmp_path / "bad.pt", tmp_path / "out")
  assert rc == 2 and "(1, 2, 1, 1) Bottleneck blocks" in log, log
  assert_nothing_written(tmp_path, tmp_path / "out", ["bad.pt"])


def _tokens(n, vocab=common.TINY_VOCAB, seed=2):
  rng = np.random.default_rng(seed)
  tokens = np.zeros((n, 77), np.int64)
  tokens[:, 0] = vocab - 2
  tokens[:, 1:4] = rng.integers(1, vocab - 2, (n, 3))
  tokens[np.arange(n), 4 + np.arange(n) % 3] = vocab - 1  # end of text: the largest id
  return tokens


@pytest.mark.parametrize("backbone,name", [("tiny_vit16", "fss_l16.ckpt"),
                                           ("tiny_resnet", "fss_rn101.ckpt")])
def test_zero_shot_checkpoint_imports_and_predicts(backbone, name, tmp_path, capsys):
  """The zero-shot models (LSegNetZS ViT, LSegRNNetZS ResNet) import and compute the
  PyTorch model's logits for an ['others', class] label pair, text tower included."""
  zero_shot_checkpoint(backbone, tmp_path / name, seed=5)
  # The reference reads the same file (its CLIP weights are float16, as released).
  tmodel = torch_lseg.LSegTorch.from_checkpoint(tmp_path / name, weights_only=False)
  rc, log = run(capsys, "import", tmp_path / name, tmp_path / "out", "--trust-pickle")
  assert rc == 0, log
  model, meta = checkpoint.load_model(str(tmp_path / "out"))
  assert model.cfg == common.jax_config(backbone, activation="relu")
  layout = "LSegRNNetZS" if backbone == "tiny_resnet" else "LSegNet"
  assert meta["source"]["format"] == f"lang-seg {layout}"

  tokens = _tokens(2)
  images = np.random.default_rng(5).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    ref = tmodel.forward_labels(torch.from_numpy(images).permute(0, 3, 1, 2),
                                torch.from_numpy(tokens)).permute(0, 2, 3, 1).numpy()
  text = model.encode_text(np.asarray(tokens, np.int32))
  out = np.asarray(common.jax_logits(model, images, text, text[None].repeat(2, 0),
                                     np.ones((2, 2), bool))[0])
  err = common.rel_error(out, ref)
  print(f"\n{backbone} zero-shot checkpoint: imported vs PyTorch rel err {err:.2e}")
  assert err < 1e-5
  assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.99
