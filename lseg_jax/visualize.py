"""Colour overlays of label maps, with a legend listing the labels in order.

    overlay | legend
    --------+-------------------
    image   | [swatch] dog   41.2%
    blended | [swatch] grass 55.0%
    with    | [swatch] other  3.8%

Label i is drawn in `palette(L)[i]` (PASCAL VOC's colour map, which keeps
neighbouring indices far apart), and legend row i sits at
y = LEGEND_PAD + i * LEGEND_ROW, so the legend reads in label order.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LEGEND_PAD = 8
LEGEND_ROW = 20
SWATCH = 14


def palette(num_labels: int) -> np.ndarray:
  """uint8 [num_labels, 3]: the PASCAL VOC colour map, label 0 not black.

  VOC interleaves the bits of the index into R, G, B; we start at index 1 so
  that no label is drawn black (black reads as "no label").
  """
  if num_labels < 1:
    raise ValueError(f"num_labels={num_labels}; expected >= 1")
  colours = np.zeros((num_labels, 3), np.uint8)
  for i in range(num_labels):
    c, r, g, b = i + 1, 0, 0, 0
    for shift in range(7, -1, -1):
      r |= (c & 1) << shift
      g |= ((c >> 1) & 1) << shift
      b |= ((c >> 2) & 1) << shift
      c >>= 3
    colours[i] = (r, g, b)
  return colours


def area_fractions(label_map: np.ndarray, num_labels: int) -> np.ndarray:
  """float64 [num_labels]: fraction of the pixels of label_map [H, W] per label."""
  label_map = np.asarray(label_map)
  counts = np.bincount(label_map.reshape(-1), minlength=num_labels)[:num_labels]
  return counts / max(label_map.size, 1)


def colorize(label_map: np.ndarray, num_labels: int) -> np.ndarray:
  """label_map int [H, W] in [0, num_labels) -> uint8 [H, W, 3] colours."""
  label_map = np.asarray(label_map)
  if label_map.size and (label_map.min() < 0 or label_map.max() >= num_labels):
    raise ValueError(f"label map values span [{label_map.min()}, {label_map.max()}]; "
                     f"expected [0, {num_labels})")
  return palette(num_labels)[label_map]


def overlay(image: np.ndarray, label_map: np.ndarray, num_labels: int,
            alpha: float = 0.5) -> np.ndarray:
  """Blends label colours over image uint8 [H, W, 3] -> uint8 [H, W, 3]."""
  image = np.asarray(image)
  if image.shape[:2] != np.shape(label_map):
    raise ValueError(f"image {image.shape[:2]} and label map {np.shape(label_map)} differ in size")
  if not 0 <= alpha <= 1:
    raise ValueError(f"alpha={alpha}; expected in [0, 1]")
  colours = colorize(label_map, num_labels).astype(np.float32)
  out = (1 - alpha) * image.astype(np.float32) + alpha * colours
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def legend(labels: Sequence[str], areas: Sequence[float] | None = None,
           height: int | None = None) -> Image.Image:
  """A white panel listing `labels` in order with their colours (and areas)."""
  font = ImageFont.load_default()
  colours = palette(len(labels))
  texts = [name if areas is None else f"{name}  {100 * a:.1f}%"
           for name, a in zip(labels, areas if areas is not None else labels)]
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  text_w = max(int(probe.textlength(t, font=font)) for t in texts)
  width = 2 * LEGEND_PAD + SWATCH + 6 + text_w
  rows_h = 2 * LEGEND_PAD + len(labels) * LEGEND_ROW
  panel = Image.new("RGB", (width, max(rows_h, height or 0)), "white")
  draw = ImageDraw.Draw(panel)
  for i, (text, colour) in enumerate(zip(texts, colours)):
    y = LEGEND_PAD + i * LEGEND_ROW
    draw.rectangle([LEGEND_PAD, y, LEGEND_PAD + SWATCH - 1, y + SWATCH - 1],
                   fill=tuple(int(c) for c in colour), outline="black")
    draw.text((LEGEND_PAD + SWATCH + 6, y), text, fill="black", font=font)
  return panel


def overlay_with_legend(image: np.ndarray, label_map: np.ndarray, labels: Sequence[str],
                        alpha: float = 0.5, show_areas: bool = True) -> Image.Image:
  """The overlay of image uint8 [H, W, 3] with the legend panel to its right."""
  blended = Image.fromarray(overlay(image, label_map, len(labels), alpha))
  areas = area_fractions(label_map, len(labels)) if show_areas else None
  panel = legend(labels, areas, height=blended.height)
  out = Image.new("RGB", (blended.width + panel.width, max(blended.height, panel.height)), "white")
  out.paste(blended, (0, 0))
  out.paste(panel, (blended.width, 0))
  return out


def swatch_centre(index: int, image_width: int) -> tuple[int, int]:
  """(x, y) of legend row `index`'s swatch centre in an `overlay_with_legend` image."""
  return image_width + LEGEND_PAD + SWATCH // 2, LEGEND_PAD + index * LEGEND_ROW + SWATCH // 2
