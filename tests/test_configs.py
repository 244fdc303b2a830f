"""Every training config loads, has the required fields, and builds a model config."""
import importlib.util
import os
import re

from absl import flags
from ml_collections import config_flags
import pytest

from lseg_jax import train
from lseg_jax.models import lseg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [
    ("synthetic_tiny", None), ("synthetic_tiny", "runlocal"),
    ("ade20k", None), ("ade20k", "variant=vitb32"), ("ade20k", "variant=rn50x16,runlocal"),
    ("ade20k", "variant=vitl16,arch_option=1,block_depth=2,activation=tanh"),
    ("fewshot", "dataset=pascal,fold=2"), ("fewshot", "dataset=coco,fold=3,runlocal"),
    ("fewshot", "dataset=fss"), ("fewshot", "dataset=fss,backbone=clip_vitl16_384"),
    ("mix7", None), ("mix7", "runlocal"),
]


def _load(name):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name,arg", CASES)
def test_config_fields(name, arg):
  config = _load(name).get_config(arg)
  train.check_config(config)
  cfg = lseg.LSegConfig.from_dict(dict(config.model))
  assert config.batch_size % (config.optim.accum_steps or 1) == 0
  assert config.mesh.to_dict() in ({"data": -1, "fsdp": 1},)
  if arg and "runlocal" in arg:
    assert config.total_steps <= 20 and cfg.dtype == "float32"
  assert "clip_pretrained/.*" in config.optim.frozen
  assert dict(config.optim.lr_mults)["scratch/.*"] == 10.0


def test_variants_and_ablation_args():
  ade = _load("ade20k")
  assert ade.get_config("variant=vitb32").model.backbone == "clip_vitb32_384"
  assert ade.get_config("variant=rn50x16").model.backbone == "clipRN50x16_vitl16_384"
  c = ade.get_config("arch_option=2,block_depth=3")
  assert (c.model.arch_option, c.model.block_depth) == (2, 3)
  assert ade.get_config(None).total_steps == 240 * 20210 // 16
  assert _load("fewshot").get_config("dataset=coco,fold=1").data.fold == 1
  assert _load("fewshot").get_config("dataset=fss").data.name == "fss1000"
  for dataset in ("pascal", "coco", "fss"):  # the paper's zero-shot ResNet-101 rows
    assert _load("fewshot").get_config(f"dataset={dataset}").model.backbone == "clip_resnet101"
  assert _load("fewshot").get_config(
      "dataset=fss,backbone=clip_vitl16_384").model.backbone == "clip_vitl16_384"
  mix = _load("mix7").get_config(None)
  assert len(mix.data.mixture) == 7 and mix.data.name == "mix"


@pytest.mark.parametrize("name,arg,match", [
    ("ade20k", "variant=vitl14", "unknown variant"),
    ("ade20k", "varient=vitl16", "unknown config argument 'varient'"),
    ("ade20k", "block_depth=two", "expected int"),
    ("fewshot", "dataset=voc", "unknown dataset"),
    ("fewshot", "fold=4", "fold=4"),
])
def test_bad_args_fail_clearly(name, arg, match):
  with pytest.raises(ValueError, match=match):
    _load(name).get_config(arg)


@pytest.mark.parametrize("name", ["synthetic_tiny", "ade20k", "fewshot", "mix7"])
def test_docstring_carries_the_command(name):
  doc = _load(name).__doc__
  assert re.search(rf"python tools/train.py --config configs/{name}\.py", doc), doc


def test_command_line_overrides_and_locking():
  """What tools/train.py does: config_flags with a locked config."""
  def parse(argv):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config
  c = parse([
      "prog", f"--config={ROOT}/configs/ade20k.py:variant=vitb32",
      "--config.batch_size=32", "--config.mesh.fsdp=4", "--config.init.clip=/x/ViT-B-32.pt",
      "--config.optim.grad_clip_norm=1.0", "--config.model.dtype=float32"])
  assert (c.batch_size, c.mesh.fsdp, c.init.clip) == (32, 4, "/x/ViT-B-32.pt")
  assert c.optim.grad_clip_norm == 1.0 and c.model.backbone == "clip_vitb32_384"
  with pytest.raises(AttributeError, match="batch_size"):
    parse(["prog", f"--config={ROOT}/configs/ade20k.py", "--config.batch_sise=4"])
