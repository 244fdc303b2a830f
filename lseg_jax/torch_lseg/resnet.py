"""lang-seg's ResNet image encoder (`LSegRNNetZS.pretrained`) for the PyTorch LSeg: a
torchvision ResNet regrouped as lang-seg's `_make_resnet_backbone` does (its keys:
`langseg_layout.RESNET_LAYOUT`; docs/interop.md, "Key layout").
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

# lang-seg's ResNet models see ImageNet-normalised images; LSegTorch takes mean 0.5 /
# std 0.5 for every backbone and converts.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAGE_WIDTHS = (256, 512, 1024, 2048)


class ResNetBackbone(nn.Module):
  """A torchvision Bottleneck ResNet with `layers` blocks per stage, in lang-seg's
  grouping; returns the four stage outputs."""

  def __init__(self, layers: Sequence[int]):
    super().__init__()
    net = ResNet(Bottleneck, list(layers))
    self.layer1 = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
    self.layer2 = net.layer2
    self.layer3 = net.layer3
    self.layer4 = net.layer4
    self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
    self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

  def forward(self, x):
    """[B, 3, H, W] (mean 0.5, std 0.5) -> [B, 256, H/4, W/4], [B, 512, H/8, W/8],
    [B, 1024, H/16, W/16], [B, 2048, H/32, W/32]."""
    x = (x * 0.5 + 0.5 - self.mean) / self.std
    l1 = self.layer1(x)
    l2 = self.layer2(l1)
    l3 = self.layer3(l2)
    return [l1, l2, l3, self.layer4(l3)]
