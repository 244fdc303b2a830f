r"""The open-vocabulary suite: its benchmarks and named test protocols, plain data.

One command evaluates a checkpoint on every benchmark (docs/evaluation.md, "The
open-vocabulary suite"):

  python tools/eval.py --checkpoint CKPT --suite openvocab --data-dir ROOT \
      [--protocol whole] [--benchmarks a847,pc459] [--out DIR]

`get_config("protocol=NAME")` is one protocol (`PROTOCOLS[NAME]` with its name);
`lseg_jax.openvocab` reads these tables. A protocol states:
  kind: "views" (`lseg_jax.inference.ViewProtocol`: resize, crop_size, overlap,
    global_view, activation, pad_value) or "sliding" (`lseg_jax.inference.SlidingWindow`:
    scales, base_size, crop_size, stride_rate, flip: PyTorch-Encoding's multi-scale
    protocol that lang-seg tests with);
  templates: prompt templates, their embeddings ensembled (CLIP's ImageNet recipe: the
    normalised mean of the normalised embeddings); None: the checkpoint's own prompt
    (bare names for LSeg; --prompt changes it);
  synonyms: how a name listing synonyms ("person, people") becomes texts: "join" (the
    string as one text, as SAN), "max" (one text per synonym, the class scores their
    maximum), "mean" (one embedding per class, ensembled over synonyms and templates,
    as CAT-Seg).
Every protocol scores at the ground truth's original resolution.
"""
from __future__ import annotations

import ml_collections

from configs import common

BENCHMARKS = {"a847": "A-847", "pc459": "PC-459", "a150": "A-150", "pc59": "PC-59",
              "pas20": "PAS-20", "pas20b": "PAS-20b", "pas21": "PAS-21"}

# SAN's default template set (its config's CLIP_TEMPLATE_SET "vild").
VILD_TEMPLATES = (
    "a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene",
    "There is the {} in the scene", "a photo of a {} in the scene", "a photo of a small {}.",
    "a photo of a medium {}.", "a photo of a large {}.", "This is a photo of a small {}.",
    "This is a photo of a medium {}.", "This is a photo of a large {}.",
    "There is a small {} in the scene.", "There is a medium {} in the scene.",
    "There is a large {} in the scene.")

PROTOCOLS = {
    # SAN: detectron2 resizes the short side to 640 (long side <= 2560), the image is
    # padded (zeros after normalisation) to the size multiple, one forward pass, the
    # scores cut to the resized size and resized back to the original (bilinear).
    "whole": dict(kind="views", resize="short_side", size=640, max_size=2560,
                  crop_size=None, overlap=0.0, global_view=False, activation="none",
                  pad_value=0.0, templates=VILD_TEMPLATES, synonyms="join"),
    # CAT-Seg's inference_sliding_window: the image resized to 640 x 640, windows of 384
    # at stride int(384 * (1 - 0.333)) = 256 (2 x 2), plus the image resized to 384 x 384;
    # sigmoid scores, windows averaged where they overlap, then (windows + global) / 2,
    # resized back to the original size. Its ViT-L config's single template.
    "sliding_cat_seg": dict(kind="views", resize="square", size=640, max_size=640,
                            crop_size=384, overlap=0.333, global_view=True,
                            activation="sigmoid", pad_value=0.0,
                            templates=("A photo of a {} in the scene",), synonyms="mean"),
    # lang-seg's test_lseg.py at one scale: long side 520, 480 windows at stride 320.
    "lseg_single": dict(kind="sliding", scales=(1.0,), base_size=520, crop_size=480,
                        stride_rate=2.0 / 3.0, flip=False, templates=None, synonyms="join"),
    # lang-seg's multi-scale + flip protocol (tools/eval.py --multiscale --flip).
    "lseg_multiscale": dict(kind="sliding", scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
                            base_size=520, crop_size=480, stride_rate=2.0 / 3.0, flip=True,
                            templates=None, synonyms="join"),
}
DEFAULT_PROTOCOL = "whole"


# `runlocal`: the same rules at sizes a CPU runs in seconds (tests, a laptop check).
RUNLOCAL = {"views": dict(size=64, max_size=256), "sliding": dict(base_size=64, crop_size=32)}
RUNLOCAL_WINDOWS = dict(resize="square", size=96, max_size=96, crop_size=64, overlap=0.5)


def get_config(arg=None):
  """arg: "protocol=NAME[,runlocal]" (default `DEFAULT_PROTOCOL`) -> that protocol with
  its name and the suite's benchmarks."""
  args = common.parse_arg(arg, protocol=DEFAULT_PROTOCOL, runlocal=False)
  if args.protocol not in PROTOCOLS:
    raise ValueError(f"protocol={args.protocol!r}; expected one of {sorted(PROTOCOLS)}")
  name = args.protocol + ("_runlocal" if args.runlocal else "")
  c = ml_collections.ConfigDict(dict(name=name, benchmarks=tuple(BENCHMARKS.items()),
                                     **PROTOCOLS[args.protocol]))
  if args.runlocal:
    c.update(RUNLOCAL_WINDOWS if c.get("crop_size") and c.kind == "views" else RUNLOCAL[c.kind])
  return c
