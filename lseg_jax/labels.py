"""The label conventions every part of the project shares (JAX-free, numpy-free).

  IGNORE_INDEX   the label value of pixels that are not scored or trained on;
  OTHER_LABEL    the background entry of an episode table ["other", *classes];
  EPISODE_BACKGROUND_TEXT  the text embedded for that entry: lang-seg's zero-shot
                 models embed ["others", class name] (`lseg_net_zs.py`).
"""
from __future__ import annotations

from typing import Sequence

IGNORE_INDEX = -1
OTHER_LABEL = "other"
EPISODE_BACKGROUND_TEXT = "others"


def text_names(label_names: Sequence[str], episodic: bool,
               background_text: str | None = None) -> list[str]:
  """The texts embedded for a label table: the one background-text rule.

  An episodic source's table ["other", *classes] embeds its first entry as
  `background_text` (default `EPISODE_BACKGROUND_TEXT`); every other name, and every
  name of a fixed label set, is embedded as it is.
  """
  names = list(label_names)
  if episodic and names and names[0] == OTHER_LABEL:
    names[0] = background_text or EPISODE_BACKGROUND_TEXT
  return names
