"""The LSegNet checkpoint layout, shared by the converter and the PyTorch LSeg."""
import subprocess
import sys

import numpy as np
import pytest

from lseg_jax import langseg_layout as layout

# Shapes of a tiny LSegNet: ViT width 32, patch 16, 2 blocks; text width 32 -> 16.
_TINY = dict(vit_width=32, patch=16, depth=2, text_width=32, text_dim=16)


def _state_dict(head_block=False):
  shapes = {"pretrained.model.cls_token": (1, 1, 32), "pretrained.model.pos_embed": (1, 17, 32),
            "pretrained.model.patch_embed.proj.weight": (32, 3, 16, 16),
            "pretrained.model.blocks.0.norm1.weight": (32,),
            "pretrained.model.blocks.1.norm1.weight": (32,),
            "clip_pretrained.text_projection": (32, 16),
            "clip_pretrained.token_embedding.weight": (64, 32),
            "clip_pretrained.positional_embedding": (16, 32),
            "scratch.layer1_rn.weight": (24, 8, 3, 3)}
  if head_block:
    shapes[layout.HEAD_BLOCK_WEIGHT] = (1, 1, 3, 3)
  return {k: np.zeros(s, np.float32) for k, s in shapes.items()}


def test_importing_the_layout_imports_no_jax():
  code = ("import sys; import lseg_jax.langseg_layout, lseg_jax.torch_lseg; "
          "assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')]")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_split_lightning_checkpoint():
  sd = _state_dict()
  obj = {"state_dict": {"net." + k: v for k, v in sd.items()} | {"loss.weight": np.ones(1)},
         "hyper_parameters": {"num_features": 24}, "epoch": 3, "optimizer_states": []}
  state_dict, meta = layout.split_checkpoint(obj)
  assert state_dict.keys() == sd.keys()
  assert meta == {"hyper_parameters": {"num_features": 24}, "epoch": 3}
  with pytest.raises(ValueError, match="holds no arrays"):
    layout.split_checkpoint({"epoch": 3})


def test_settings_precedence_and_shapes():
  sd = _state_dict()
  settings = layout.infer_settings(sd, None, {"tiny": _TINY}, readout="add")
  assert settings == dict(backbone="tiny", readout="add", arch_option=0, features=24,
                          vocab_size=64, context_length=16)
  meta = {"hyper_parameters": {"readout": "ignore", "num_features": 8},
          "lseg_config": {"readout": "project", "block_depth": None}}
  settings = layout.infer_settings(sd, meta, {"tiny": _TINY})
  assert settings["readout"] == "project" and settings["features"] == 8
  assert "block_depth" not in settings  # None never overrides


def test_settings_the_weights_cannot_tell():
  sd = _state_dict(head_block=True)
  with pytest.raises(ValueError, match="readout"):
    layout.infer_settings(sd, None, {"tiny": _TINY})
  with pytest.raises(ValueError, match="arch_option=1"):
    layout.infer_settings(sd, None, {"tiny": _TINY}, readout="add")
  with pytest.raises(ValueError, match="activation"):
    layout.infer_settings(sd, None, {"tiny": _TINY}, readout="add", arch_option=1,
                          block_depth=2)
  with pytest.raises(ValueError, match=r"patch 16, depth 2 .* known backbones: \['other'\]"):
    layout.infer_settings(sd, None, {"other": dict(_TINY, depth=3)})
  with pytest.raises(ValueError, match="not an LSeg state dict"):
    layout.check_layout({"weights": np.zeros(3)}, "m.pt", "LSeg")


def test_resnet_layout_is_detected_and_its_depth_counted():
  """lang-seg's zero-shot `LSegRNNetZS`: the stem at `pretrained.layer1.0`, blocks at
  `pretrained.layer1.4.I` and `pretrained.layer{2,3,4}.I`; no readout weights."""
  sd = {k: v for k, v in _state_dict().items() if not k.startswith(layout.VIT_PREFIX)}
  sd[layout.RESNET_STEM] = np.zeros((64, 3, 7, 7), np.float32)
  for stage, blocks in zip(layout.RESNET_LAYOUT[2], (1, 2, 1, 1)):
    for i in range(blocks):
      sd[f"{layout.RESNET_PREFIX}{stage}.{i}.conv1.weight"] = np.zeros((1,), np.float32)
      sd[f"{layout.RESNET_PREFIX}{stage}.{i}.bn1.weight"] = np.zeros((1,), np.float32)
  assert layout.is_resnet(sd) and not layout.is_resnet(_state_dict())
  layout.check_layout(sd)
  assert layout.backbone_shapes(sd) == dict(resnet_blocks=(1, 2, 1, 1), text_width=32,
                                            text_dim=16)
  resnet = dict(resnet_blocks=(1, 2, 1, 1), text_width=32, text_dim=16)
  settings = layout.infer_settings(sd, None, {"tiny": _TINY, "rn": resnet})
  assert settings["backbone"] == "rn" and settings["readout"] == "project"
  with pytest.raises(ValueError, match=r"\(1, 2, 1, 1\) Bottleneck blocks"):
    layout.find_backbone(sd, {"tiny": _TINY, "rn": dict(resnet, resnet_blocks=(1, 1, 1, 1))})
  del sd["scratch.layer1_rn.weight"]
  with pytest.raises(ValueError, match=r"no keys under \['scratch.'\]"):
    layout.check_layout(sd)
