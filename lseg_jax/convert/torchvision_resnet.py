"""torchvision `ResNet` state dict <-> our `models.resnet.ResNet`, in two key layouts.

Our ResNet names its modules as torchvision does, so the table is the identity up to
layouts: Conv2d weights [O, I, kH, kW] <-> kernels [kH, kW, I, O], and BatchNorm
`weight`/`bias`/`running_mean`/`running_var`/`num_batches_tracked` <->
`scale`/`bias`/`mean`/`var`/`num_batches_tracked` (int64 <-> int32).

Two layouts of the same weights (`LAYOUTS`): "torchvision" (`conv1`, `bn1`, `layerS.I.*`,
plus the classifier `fc.*`, skipped: not part of our model), as in torchvision's ImageNet
checkpoints, and "langseg", lang-seg's regrouping in `LSegRNNetZS.pretrained`
(`langseg_layout.RESNET_LAYOUT`, the one owner of that layout).
"""
from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

from lseg_jax import langseg_layout
from lseg_jax.convert import mapping
from lseg_jax.convert.mapping import CONV, MappingTable, Rule, batch_norm
from lseg_jax.models import resnet

# Torch names of the stem conv, the stem BatchNorm and the four stages, per layout.
LAYOUTS = {
    "torchvision": ("conv1", "bn1", ("layer1", "layer2", "layer3", "layer4")),
    "langseg": langseg_layout.RESNET_LAYOUT,
}


def _block_rules(nnx_block: str, torch_block: str) -> list[Rule]:
  rules = []
  for c in (1, 2, 3):
    rules.append(Rule(f"{nnx_block}/conv{c}/kernel", f"{torch_block}.conv{c}.weight", CONV))
    rules += batch_norm(f"{nnx_block}/bn{c}", f"{torch_block}.bn{c}")
  rules.append(Rule(f"{nnx_block}/downsample/0/kernel", f"{torch_block}.downsample.0.weight", CONV))
  rules += batch_norm(f"{nnx_block}/downsample/1", f"{torch_block}.downsample.1")
  return rules


def table(torch_prefix: str = "", nnx_prefix: str = "", *,
          layout: str = "torchvision") -> MappingTable:
  """The ResNet table, e.g. `table("pretrained.", "pretrained/model/", layout="langseg")`
  for lang-seg's `LSegRNNetZS` keys and our LSeg model."""
  if layout not in LAYOUTS:
    raise ValueError(f"unknown ResNet key layout {layout!r}; expected one of {sorted(LAYOUTS)}")
  conv1, bn1, stages = LAYOUTS[layout]
  rules = [Rule("conv1/kernel", f"{conv1}.weight", CONV), *batch_norm("bn1", bn1)]
  for s, torch_stage in enumerate(stages, start=1):
    rules += _block_rules(f"layer{s}/{{i}}", f"{torch_stage}.{{i}}")
  ignore = (r"fc\..*",) if layout == "torchvision" else ()
  return MappingTable(tuple(rules), ignore_torch=ignore).prefixed(torch_prefix, nnx_prefix)


def find_prefix(state_dict: Mapping[str, Any], layout: str = "torchvision") -> str:
  """The key prefix of the ResNet in `state_dict` ("" for a bare torchvision model,
  "module." or "model." for training wrappers, "pretrained." for lang-seg)."""
  conv1, _, stages = LAYOUTS[layout]
  return mapping.find_prefix(state_dict, f"{conv1}.weight", f"{stages[0]}.0.conv1.weight",
                             f"ResNet in the {layout} layout")


def infer_variant(state_dict: Mapping[str, Any], prefix: str = "") -> str:
  """The `resnet.RESNET_VARIANTS` name whose blocks per stage the state dict has."""
  _, _, stages = LAYOUTS["torchvision"]
  counts = langseg_layout.resnet_blocks(state_dict, [f"{prefix}{stage}." for stage in stages])
  for name, layers in resnet.RESNET_VARIANTS.items():
    if tuple(layers) == counts:
      return name
  raise ValueError(f"the ResNet has {counts} Bottleneck blocks per stage; no known variant has "
                   f"that: {dict(sorted(resnet.RESNET_VARIANTS.items()))}")


def load_torchvision_resnet(path_or_state_dict,
                            resnet_module: resnet.ResNet | resnet.ResNetConfig | str | None = None,
                            *, prefix: str | None = None) -> resnet.ResNet:
  """Loads torchvision ResNet weights (a state dict or any file `langseg_layout.read_state_dict`
  reads; `fc.*` skipped; prefix None: found) into `resnet_module`, our ResNet updated in place, or
  one built from a `ResNetConfig` or variant name (None: `infer_variant`) without initialising it.
  MappingError lists every missing, unknown and mis-shaped key."""
  state_dict, prefix = mapping.read_under_prefix(path_or_state_dict, prefix, find_prefix)
  tab = table(prefix)
  if isinstance(resnet_module, resnet.ResNet):
    return mapping.load_module(state_dict, tab, resnet_module)
  if resnet_module is None:
    resnet_module = infer_variant(state_dict, prefix)
  cfg = resnet.decode_variant(resnet_module) if isinstance(resnet_module, str) else resnet_module
  if not isinstance(cfg, resnet.ResNetConfig):
    raise TypeError(f"resnet_module must be a ResNet, ResNetConfig or variant name, "
                    f"got {type(resnet_module).__name__}")
  return mapping.load_module(state_dict, tab, lambda: resnet.ResNet(cfg, rngs=nnx.Rngs(0)))


def export_torchvision_resnet(resnet_module: resnet.ResNet, prefix: str = "",
                              layout: str = "torchvision") -> dict[str, Any]:
  """Our ResNet -> torch keys {prefix + key: np.ndarray} (float32; counters int64)."""
  return mapping.nnx_to_torch(resnet_module, table(prefix, layout=layout))
