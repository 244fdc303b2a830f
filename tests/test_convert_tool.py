"""`tools/convert.py import|export` end to end on tiny random checkpoints.

Official lang-seg checkpoints are Lightning `.ckpt` files: {"state_dict": {"net." +
LSegNet key: tensor}, "epoch": ..., ...}, with CLIP's image tower and logit_scale
inside and the CLIP weights in float16. The tests write such files from random
weights, plus broken ones, and check that nothing is left behind on failure.
"""
import os
import sys

import numpy as np
import pytest

from lseg_jax import checkpoint
from lseg_jax.cli import common as cli_common
from lseg_jax.cli import convert
from lseg_jax.convert import langseg

import test_convert_common as common

torch = common.torch
torch_lseg = common.torch_lseg



def lightning_checkpoint(tmodel, path, drop=(), extra=None):
  """Writes `tmodel` as an official lang-seg Lightning checkpoint; returns the
  state dict (LSegNet keys) as it was written."""
  state_dict = dict(tmodel.state_dict())
  for key in list(state_dict):
    if key.startswith("clip_pretrained.") and state_dict[key].is_floating_point():
      state_dict[key] = state_dict[key].half()  # clip.load on CUDA gives float16 weights
  state_dict["clip_pretrained.visual.conv1.weight"] = torch.randn(8, 3, 4, 4).half()
  state_dict["clip_pretrained.visual.class_embedding"] = torch.randn(8).half()
  state_dict["clip_pretrained.logit_scale"] = torch.tensor(4.6052)
  state_dict.update(extra or {})
  for key in drop:
    del state_dict[key]
  torch.save({"epoch": 199, "global_step": 12345, "pytorch-lightning_version": "1.3.5",
              "state_dict": {"net." + k: v for k, v in state_dict.items()},
              "optimizer_states": [], "lr_schedulers": []}, path)
  return state_dict


def run(capsys, *argv):
  rc = cli_common.run(convert.main, [str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out + err


def assert_nothing_written(parent, out_dir, inputs):
  assert not os.path.exists(out_dir)
  assert sorted(os.listdir(parent)) == sorted(inputs)


def assert_same_tensors(exported, written):
  """`exported` (numpy) holds every tensor of `written` (torch) exactly, but CLIP's
  image tower and logit_scale."""
  skipped = {k for k in written if k.startswith("clip_pretrained.visual.")
             or k == "clip_pretrained.logit_scale"}
  assert set(exported) == set(written) - skipped
  for key, value in exported.items():
    expected = written[key].numpy()
    assert np.array_equal(value, expected.astype(value.dtype)), key


def test_import_official_lightning_checkpoint(tmp_path, capsys):
  tmodel = common.make_torch_lseg("tiny_vit16")
  written = lightning_checkpoint(tmodel, tmp_path / "demo_e200.ckpt")
  out_dir = tmp_path / "imported"
  rc, log = run(capsys, "import", tmp_path / "demo_e200.ckpt", out_dir)
  assert rc == 0, log

  model, meta = checkpoint.load_model(str(out_dir))
  assert model.cfg == common.jax_config("tiny_vit16")
  assert meta["source"]["file"] == "demo_e200.ckpt"
  assert meta["source"]["epoch"] == 199 and meta["source"]["global_step"] == 12345
  # Every tensor arrives exactly (the float16 CLIP weights as their float32 values);
  # CLIP's image tower and logit_scale are skipped.
  assert_same_tensors(langseg.export_langseg(model), written)


def test_import_head_block_needs_its_settings(tmp_path, capsys):
  tmodel = common.make_torch_lseg("tiny_vit32", 1, 2, "relu")
  lightning_checkpoint(tmodel, tmp_path / "lseg.ckpt")
  out_dir = tmp_path / "out"
  rc, log = run(capsys, "import", tmp_path / "lseg.ckpt", out_dir)
  assert rc == 2 and "--arch-option" in log and "--block-depth" in log
  assert_nothing_written(tmp_path, out_dir, ["lseg.ckpt"])

  rc, log = run(capsys, "import", tmp_path / "lseg.ckpt", out_dir, "--arch-option", 1,
                "--block-depth", 2)
  assert rc == 2 and "--activation" in log

  rc, log = run(capsys, "import", tmp_path / "lseg.ckpt", out_dir, "--arch-option", 1,
                "--block-depth", 2, "--activation", "relu")
  assert rc == 0, log
  model, _ = checkpoint.load_model(str(out_dir))
  assert model.cfg == common.jax_config("tiny_vit32", 1, 2, "relu")


def test_import_safetensors_needs_no_torch(tmp_path, capsys, monkeypatch):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  tmodel = common.make_torch_lseg("tiny_vit32")
  state_dict = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  safetensors_numpy.save_file(state_dict, str(tmp_path / "lseg.safetensors"))
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
  rc, log = run(capsys, "import", tmp_path / "lseg.safetensors", tmp_path / "out")
  assert rc == 0, log
  model, _ = checkpoint.load_model(str(tmp_path / "out"))
  exported = langseg.export_langseg(model)
  assert all(np.array_equal(exported[k], v) for k, v in state_dict.items())


def test_without_torch_the_tool_says_how_to_install_it(tmp_path, capsys, monkeypatch):
  (tmp_path / "lseg.ckpt").write_bytes(b"not read")
  checkpoint.save_model(str(tmp_path / "ckpt"), common.make_jax_lseg("tiny_vit32"))
  monkeypatch.setitem(sys.modules, "torch", None)
  for argv in (("import", tmp_path / "lseg.ckpt", tmp_path / "out"),
               ("export", tmp_path / "ckpt", tmp_path / "lseg.pt")):
    rc, log = run(capsys, *argv)
    assert rc == 2 and 'pip install -e ".[torch]"' in log, log
  assert not (tmp_path / "out").exists() and not (tmp_path / "lseg.pt").exists()


def _official_lsegnet(cfg):
  """Stand-in for the official LSegNet: our PyTorch LSeg plus a CLIP image tower and
  logit_scale, as `clip.load` puts them under `clip_pretrained`."""
  model = torch_lseg.LSegTorch(cfg)
  visual = torch.nn.Module()
  visual.conv1 = torch.nn.Conv2d(3, 8, 4, bias=False)
  visual.class_embedding = torch.nn.Parameter(torch.zeros(8))
  model.clip_pretrained.visual = visual
  model.clip_pretrained.logit_scale = torch.nn.Parameter(torch.zeros([]))
  return model


def test_export_loads_into_lsegnet(tmp_path, capsys):
  jmodel = common.make_jax_lseg("tiny_vit16", 2, 2, "relu")
  checkpoint.save_model(str(tmp_path / "ckpt"), jmodel)
  rc, log = run(capsys, "export", tmp_path / "ckpt", tmp_path / "lseg.pt")
  assert rc == 0, log

  obj = torch.load(tmp_path / "lseg.pt", weights_only=True)
  assert set(obj) == {"state_dict", "lseg_config"}
  assert all(v.dtype in (torch.float32, torch.int64) for v in obj["state_dict"].values())
  tcfg = torch_lseg.TorchLSegConfig(**obj["lseg_config"])
  assert tcfg == common.torch_config("tiny_vit16", 2, 2, "relu")
  official = _official_lsegnet(tcfg)
  result = official.load_state_dict(obj["state_dict"], strict=False)
  assert not result.unexpected_keys
  assert sorted(result.missing_keys) == [
      "clip_pretrained.logit_scale", "clip_pretrained.visual.class_embedding",
      "clip_pretrained.visual.conv1.weight"]
  assert torch_lseg.LSegTorch.from_checkpoint(tmp_path / "lseg.pt").config == tcfg

  # --clip-weights: an OpenAI CLIP state dict (whose text tower is the model's).
  clip_sd = {k[len("clip_pretrained."):]: v for k, v in obj["state_dict"].items()
             if k.startswith("clip_pretrained.")}
  clip_sd.update({"visual.conv1.weight": torch.randn(8, 3, 4, 4).half(),
                  "visual.class_embedding": torch.randn(8).half(),
                  "logit_scale": torch.tensor(4.6052), "input_resolution": torch.tensor(224),
                  "context_length": torch.tensor(77), "vocab_size": torch.tensor(100)})
  torch.save(clip_sd, tmp_path / "ViT-B-32.pt")
  rc, log = run(capsys, "export", tmp_path / "ckpt", tmp_path / "full.pt", "--clip-weights",
                tmp_path / "ViT-B-32.pt", "--half")
  assert rc == 0 and "warning" not in log, log
  full = torch.load(tmp_path / "full.pt", weights_only=True)["state_dict"]
  official.load_state_dict(full, strict=True)
  torch_lseg.LSegTorch.from_checkpoint(tmp_path / "full.pt")  # skips CLIP's image side
  assert torch.equal(full["clip_pretrained.visual.conv1.weight"],
                     clip_sd["visual.conv1.weight"])
  for key, value in full.items():  # --half: the CLIP tower in float16, the rest float32
    if value.is_floating_point():
      half = key.startswith("clip_pretrained.")
      assert value.dtype == (torch.float16 if half else torch.float32), key

  # --bare: the state dict alone, as `LSegNet.load(path)` reads it.
  rc, log = run(capsys, "export", tmp_path / "ckpt", tmp_path / "bare.pt", "--bare")
  assert rc == 0, log
  bare = torch.load(tmp_path / "bare.pt", weights_only=True)
  assert set(bare) == set(obj["state_dict"])


def test_export_rejects_clip_weights_of_another_model(tmp_path, capsys):
  checkpoint.save_model(str(tmp_path / "ckpt"), common.make_jax_lseg("tiny_vit32"))
  other = {"token_embedding.weight": torch.zeros(100, 32),
           "positional_embedding": torch.zeros(77, 32),
           "text_projection": torch.zeros(32, 24), "visual.proj": torch.zeros(4, 24)}
  torch.save(other, tmp_path / "other.pt")
  rc, log = run(capsys, "export", tmp_path / "ckpt", tmp_path / "x.pt", "--clip-weights",
                tmp_path / "other.pt")
  assert rc == 2 and "text projection" in log
  assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------------------
# Bad input: a clear error, nothing in OUT_DIR, no temporary files left.
# ---------------------------------------------------------------------------
def _write_other_architecture(path):
  vit_sd = common.timm_vision_transformer.VisionTransformer(
      img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2).state_dict()
  torch.save(vit_sd, path)
  return "not an LSegNet state dict"


def _write_truncated(path):
  lightning_checkpoint(common.make_torch_lseg("tiny_vit16"), path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  return "complete"


def _write_missing_keys(path):
  lightning_checkpoint(common.make_torch_lseg("tiny_vit16"), path, drop=(
      "scratch.refinenet2.out_conv.weight", "pretrained.model.blocks.1.mlp.fc1.bias"))
  return "missing torch keys"


def _write_mis_shaped(path):
  lightning_checkpoint(common.make_torch_lseg("tiny_vit16"), path,
                       extra={"scratch.head1.weight": torch.zeros(16, 8, 1, 1)})
  return "scratch.head1.weight"


def _write_not_a_state_dict(path):
  torch.save([1, 2, 3], path)
  return "expected a state dict"


@pytest.mark.parametrize("write", [_write_other_architecture, _write_truncated,
                                   _write_missing_keys, _write_mis_shaped,
                                   _write_not_a_state_dict])
def test_bad_input_is_reported_and_nothing_is_written(write, tmp_path, capsys):
  src = tmp_path / "bad.ckpt"
  expected = write(src)
  out_dir = tmp_path / "out"
  rc, log = run(capsys, "import", src, out_dir)
  assert rc == 2
  assert "error: cannot import" in log
  if write is _write_missing_keys:
    assert "scratch.refinenet2.out_conv.weight" in log
    assert "pretrained.model.blocks.1.mlp.fc1.bias" in log
  else:
    assert expected in log, log
  assert_nothing_written(tmp_path, out_dir, ["bad.ckpt"])


def test_existing_out_dir_is_kept_unless_overwrite(tmp_path, capsys, monkeypatch):
  lightning_checkpoint(common.make_torch_lseg("tiny_vit32"), tmp_path / "lseg.ckpt")
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  (out_dir / "keep.txt").write_text("previous")
  rc, log = run(capsys, "import", tmp_path / "lseg.ckpt", out_dir)
  assert rc == 2 and "--overwrite" in log
  assert os.listdir(out_dir) == ["keep.txt"]

  # A failure while writing leaves the previous OUT_DIR and no temporary folder.
  save_model = checkpoint.save_model

  def failing_save(directory, model, **kwargs):
    save_model(directory, model, **kwargs)
    raise OSError("disk full")
  monkeypatch.setattr(convert.checkpoint, "save_model", failing_save)
  with pytest.raises(OSError, match="disk full"):
    convert.main(["import", str(tmp_path / "lseg.ckpt"), str(out_dir), "--overwrite"])
  assert os.listdir(out_dir) == ["keep.txt"]
  assert sorted(os.listdir(tmp_path)) == ["lseg.ckpt", "out"]
  monkeypatch.undo()

  rc, log = run(capsys, "import", tmp_path / "lseg.ckpt", out_dir, "--overwrite")
  assert rc == 0, log
  assert "keep.txt" not in os.listdir(out_dir)
  assert sorted(os.listdir(tmp_path)) == ["lseg.ckpt", "out"]
  checkpoint.load_model(str(out_dir))
