"""Every training config loads, has the required fields, and builds a model config."""
import importlib
import os
import re
import subprocess
import sys

import pytest

from lseg_jax import config as config_lib
from lseg_jax import text
from lseg_jax.cli import common
from lseg_jax.errors import UserError
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
  return importlib.import_module(f"configs.{name}")


@pytest.mark.parametrize("name,arg", CASES)
def test_config_fields(name, arg):
  config = config_lib.complete(_load(name).get_config(arg))
  config_lib.check_config(config)
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
  for dataset in ("pascal", "coco", "fss"):  # the official --nshot 0
    assert _load("fewshot").get_config(f"dataset={dataset}").data.shot == 0
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
    ("mix7", "tpu=v5e-8", "unknown TPU slice tpu='v5e-8'"),
])
def test_bad_args_fail_clearly(name, arg, match):
  with pytest.raises(ValueError, match=match):
    _load(name).get_config(arg)


@pytest.mark.parametrize("name", ["ade20k", "fewshot", "mix7"])
def test_tpu_slices_set_batch_mesh_and_schedule(name):
  """tpu=NAME: the slice's global batch (the learning rate follows it in the library),
  remat and a data-parallel mesh; epoch-based schedules keep their epochs."""
  from configs import common as configs_common  # pylint: disable=g-import-not-at-top
  plain = _load(name).get_config(None)
  for slice_name, (batch, remat) in configs_common.TPU_SLICES.items():
    c = _load(name).get_config(f"tpu={slice_name}")
    assert (c.batch_size, c.model.remat) == (batch, remat)
    assert (c.mesh.data, c.mesh.fsdp) == (-1, 1)
    if name != "fewshot":  # a step count, not epochs
      assert c.total_steps == plain.total_steps * 16 // batch
    config_lib.complete(c)


@pytest.mark.parametrize("name", ["synthetic_tiny", "ade20k", "fewshot", "mix7"])
def test_docstring_carries_the_command(name):
  doc = _load(name).__doc__
  assert re.search(rf"python tools/train.py --config configs/{name}\.py", doc), doc


def test_command_line_overrides_and_locking():
  """What the tools do: the config file, completed, then --config.KEY=VALUE overrides."""
  def parse(argv):
    rest, overrides = common.split_overrides(argv)
    return common.load_config(rest[0].partition("=")[2], overrides)
  c = parse([
      f"--config={ROOT}/configs/ade20k.py:variant=vitb32",
      "--config.batch_size=32", "--config.mesh.fsdp=4", "--config.init.clip=/x/ViT-B-32.pt",
      "--config.optim.grad_clip_norm=1.0", "--config.model.dtype=float32"])
  assert (c.batch_size, c.mesh.fsdp, c.init.clip) == (32, 4, "/x/ViT-B-32.pt")
  assert c.optim.grad_clip_norm == 1.0 and c.model.backbone == "clip_vitb32_384"
  with pytest.raises(UserError, match="batch_sise.*did you mean batch_size"):
    parse([f"--config={ROOT}/configs/ade20k.py", "--config.batch_sise=4"])


_IMPORT_CHECK = """
import sys
import configs.ade20k, configs.fewshot, configs.mix7, configs.synthetic_tiny
for m in (configs.ade20k, configs.fewshot, configs.mix7, configs.synthetic_tiny):
  m.get_config()
heavy = sorted(k for k in sys.modules if k.split(".")[0] in ("jax", "jaxlib", "tensorflow", "lseg_jax", "flax", "torch"))
print(heavy)
sys.exit(1 if heavy else 0)
"""


def test_configs_import_no_library():
  """Configs are data: loading one imports neither JAX, TensorFlow nor lseg_jax."""
  done = subprocess.run([sys.executable, "-c", _IMPORT_CHECK], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stdout + done.stderr


_SOURCES = ("lseg_jax", "tools", "tests", "configs")
_FORBIDDEN = ("sys.path.insert", "sys.path.append", "spec_from_file_location", "run_path(",
              "sys.path[")


def test_no_path_edits_or_loading_code_by_path():
  """Entry points import the package; nothing edits sys.path or loads code by file path."""
  offenders = []
  for top in _SOURCES:
    for folder, _, files in os.walk(os.path.join(ROOT, top)):
      for name in files:
        if not name.endswith(".py") or name == os.path.basename(__file__):
          continue
        path = os.path.join(folder, name)
        with open(path, encoding="utf-8") as f:
          for i, line in enumerate(f, 1):
            if any(bad in line for bad in _FORBIDDEN):
              offenders.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
  assert not offenders, "\n".join(offenders)


def test_library_defaults_fill_what_a_config_leaves_out():
  c = config_lib.complete(_load("synthetic_tiny").get_config())
  assert c.optim.momentum == 0.9 and c.keep_checkpoints == 3  # library defaults
  assert c.text.tokenizer == "byte-level" and c.model.text_vocab_size is not None
  with pytest.raises(ValueError, match="unknown config field 'model.backbon'"):
    config_lib.complete({"model": {"backbon": "x"}})
  evals = config_lib.evals(config_lib.complete({"evals": {"fold1": {"data": {"fold": 1}}},
                                                 "eval_batch_size": 4}))
  assert list(evals) == ["fold1"] and evals["fold1"].data.fold == 1
  assert config_lib.complete({}).data.shot is None  # each source's default: 0
  with pytest.raises(ValueError, match="data.shot=-1; expected an integer >= 0"):
    config_lib.check_config(config_lib.override(config_lib.complete({}),
                                                [("data.shot", "-1")]))
  assert evals["fold1"].batch_size == 4


def test_import_free_configs_copies_equal_the_library():
  """configs/common.py keeps copies of library values (configs import no library code):
  they must stay equal to the library's."""
  configs_common = _load("common")
  assert configs_common.CLIP_TOKENIZER == text.DEFAULT_TOKENIZER
  assert configs_common.BYTE_LEVEL_TOKENIZER == text.BYTE_LEVEL_TOKENIZER
  cases = [("1", 0), ("1", None), ("1.5", 0.0), ("1e-3", None), ("-2", 0), ("x", None),
           ("32", "name"), ("True", False), ("true", False), ("false", True), ("None", 3),
           ("null", None), ("(2.0, 1.0)", (1.0, 2.0)), ("[1, 2]", None), ("'q'", None),
           ("a,b", None), ("", None), ("{'k': 1}", None)]
  for raw, current in cases:
    ours, library = configs_common.parse_value(raw, current), config_lib.parse_value(raw, current)
    assert (ours, type(ours)) == (library, type(library)), (raw, current)


def test_model_field_choices_are_declared_once():
  """LSegConfig, the run config's checks and the tools' choices take the allowed values
  of the model's fields from `lseg.FIELD_CHOICES`."""
  from lseg_jax.cli import convert  # pylint: disable=g-import-not-at-top
  for name, choices in lseg.FIELD_CHOICES.items():
    spec = config_lib.all_fields()[f"model.{name}"]
    assert all(spec.ok(c) for c in choices) and not spec.ok("no-such-value"), name
    assert all(repr(c) in spec.expected for c in choices), (name, spec.expected)
    with pytest.raises(UserError, match=f"unknown {name} 'no-such-value'"):
      lseg.LSegConfig(**{name: "no-such-value"})
  parser = convert.build_parser()
  imp = parser._subparsers._group_actions[0].choices["import"]  # pylint: disable=protected-access
  flags = {a.dest: a.choices for a in imp._actions}  # pylint: disable=protected-access
  for name in ("backbone", "arch_option", "activation", "readout"):
    assert sorted(flags[name]) == sorted(lseg.FIELD_CHOICES[name]), name
  import argparse  # pylint: disable=g-import-not-at-top
  ckpt = argparse.ArgumentParser()
  common.add_checkpoint_args(ckpt)
  dtype = next(a for a in ckpt._actions if a.dest == "dtype")  # pylint: disable=protected-access
  assert tuple(dtype.choices) == lseg.FIELD_CHOICES["dtype"]
