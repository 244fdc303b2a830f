"""Zero-shot episode evaluation through the ResNet model (`clip_resnet101`, the paper's
PASCAL-5i / COCO-20i / FSS-1000 rows), on generated episodes in HSNet's layouts.

The library evaluation must equal HSNet's accumulation written out, and the documented
command (`tools/convert.py import` of a lang-seg `LSegRNNetZS` checkpoint, then
`tools/eval.py --data fss1000`) must run end to end.
"""
import itertools
import json

# torch (and torchvision, through timm) before TensorFlow: in this environment
# torchvision's triton import crashes a process that loaded TensorFlow first.
import test_convert_common as common  # pylint: disable=g-bad-import-order
from test_convert_tool import lightning_checkpoint, run as run_convert

from flax import nnx
import numpy as np
import pytest

from lseg_jax import checkpoint, evaluate, labels, text
from lseg_jax.cli import eval as eval_cli
from lseg_jax.data import input_pipeline
from lseg_jax.models import lseg
from lseg_jax.text import BYTE_LEVEL_TOKENIZER, BYTE_LEVEL_VOCAB_SIZE

from test_evaluate import _direct_episodes, episode_cfg, fss_dir, pascal_dir, run, text_for  # noqa: F401  pylint: disable=unused-import


def _model(backbone):
  cfg = lseg.LSegConfig(backbone=backbone,
                        text_vocab_size=None if backbone == "clip_resnet101" else 64)
  model = lseg.LSeg(cfg, rngs=nnx.Rngs(0))
  model.eval()
  return model


@pytest.mark.parametrize("backbone,dataset", [
    ("tiny_resnet", "fss1000"),
    pytest.param("tiny_resnet", "pascal5i", marks=pytest.mark.slow),  # 1,000 episodes
    pytest.param("clip_resnet101", "fss1000", marks=pytest.mark.slow),
])
def test_resnet_zero_shot_episodes(backbone, dataset, fss_dir, pascal_dir):  # noqa: F811
  model = _model(backbone)
  if dataset == "fss1000":
    data_cfg = episode_cfg("fss1000", fss_dir, "test")
  else:
    data_cfg = episode_cfg("pascal5i", pascal_dir, "validation", fold=0)
  names = input_pipeline.make_eval_iterator(data_cfg, batch_size=8).label_names
  text = text_for(model, len(names), seed=3)
  report = run(model, data_cfg, text, episodic=True)
  assert report["protocol"] == "episodes" and list(report["per_class_iou"]) == names[1:]
  miou, fb = _direct_episodes(model, data_cfg, text)
  print(f"\n{backbone} {dataset}: {report['num_examples']} episodes, mIoU "
        f"{report['metrics']['mIoU']:.4f}, FB-IoU {report['metrics']['FB-IoU']:.4f}")
  assert report["metrics"]["mIoU"] == pytest.approx(miou, abs=1e-12)
  assert report["metrics"]["FB-IoU"] == pytest.approx(fb, abs=1e-12)


def test_eval_tool_on_an_imported_lang_seg_resnet_checkpoint(fss_dir, tmp_path, capsys):  # noqa: F811
  tmodel = common.torch_lseg.LSegTorch(common.torch_lseg.TorchLSegConfig(
      backbone="tiny_resnet", vocab_size=BYTE_LEVEL_VOCAB_SIZE))
  lightning_checkpoint(common.randomize_torch_(tmodel, 7).eval(), tmp_path / "fss_rn101.ckpt")
  rc, log = run_convert(capsys, "import", tmp_path / "fss_rn101.ckpt", tmp_path / "fss_rn101")
  assert rc == 0, log

  out = tmp_path / "fss1000_test.json"
  assert eval_cli.main([
      "--checkpoint", str(tmp_path / "fss_rn101"), "--data", "fss1000", "--data-dir", fss_dir,
      "--split", "test", "--tokenizer", BYTE_LEVEL_TOKENIZER, "--batch-size", "8",
      "--max-batches", "1", "--no-progress", "--out", str(out)]) == 0
  report = json.loads(out.read_text())
  assert report["protocol"] == "episodes" and report["num_examples"] == 8
  assert report["eval_resize"] == "square" and report["background_text"] == "others"

  # The same numbers from the library, with the label texts the tool embeds.
  model, meta = checkpoint.load_model(str(tmp_path / "fss_rn101"))
  assert model.cfg.backbone == "tiny_resnet"
  embedder, _, _ = text.checkpoint_label_embedder(
      model, meta, str(tmp_path / "fss_rn101"), tokenizer=BYTE_LEVEL_TOKENIZER)
  data_cfg = input_pipeline.default_data_config()
  data_cfg.update(name="fss1000", data_dir=fss_dir, eval_split="test", eval_resize="square")
  it = input_pipeline.make_eval_iterator(data_cfg, batch_size=8)
  label_emb = embedder(labels.text_names(it.label_names, episodic=True))
  ev = evaluate.Evaluator(model, it.label_names, label_emb, episodic=True)
  direct = evaluate.evaluate(ev, itertools.islice(it, 1), progress=False)
  assert report["metrics"] == pytest.approx(direct["metrics"], abs=1e-12)
  assert np.isfinite(list(report["metrics"].values())).all()
