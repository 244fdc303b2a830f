r"""Converts LSeg checkpoints between lang-seg (PyTorch) and lseg-jax (Orbax).

Import an official lang-seg checkpoint (Lightning `.ckpt`, `net.`-prefixed keys; also the
zero-shot `LSegNetZS` and `LSegRNNetZS`) or a bare LSegNet state dict (torch file or
`.safetensors`; SRC may be an http(s) URL) into a checkpoint directory that
`lseg_jax.checkpoint.load_model` (and every tool) reads; export one of ours to a state
dict in the LSegNet layout (LSegRNNetZS's for the ResNet backbones), which the official
code and `LSegTorch.from_checkpoint` load (`--clip-weights`, a local file or a `clip.load`
name: CLIP's image tower too, for `strict=True`):

  python tools/convert.py import demo_e200.ckpt ckpts/lseg_l16 --trust-pickle
  python tools/convert.py import pascal_fold0.ckpt ckpts/pascal_fold0 --trust-pickle
  python tools/convert.py export ckpts/lseg_l16 lseg_l16.pt --clip-weights ViT-B/32

The exported file's format and how to load it: docs/interop.md, "Export".
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from lseg_jax import checkpoint
from lseg_jax import langseg_layout
from lseg_jax import text
from lseg_jax import weights
from lseg_jax.cli import common
from lseg_jax.convert import clip_openai, langseg
from lseg_jax.errors import UserError
from lseg_jax.models import lseg

_TORCH_HINT = 'install the torch extra: pip install -e ".[torch]"'


def _require_torch(what: str) -> None:
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise UserError(f"{what} needs PyTorch, which is not installed; {_TORCH_HINT}") from e


# --- import ---
def run_import(args) -> str:
  src = os.fspath(args.src)
  if src.startswith(("http://", "https://")):
    src = weights.resolve(src, kind="checkpoint", what="SRC")
  if not os.path.isfile(src):
    raise UserError(f"SRC {src!r} is not a file")
  if not src.endswith(".safetensors"):
    _require_torch(f"reading {os.path.basename(src)} (a PyTorch file)")
  if os.path.exists(args.out_dir):
    if not os.path.isdir(args.out_dir):
      raise UserError(f"OUT_DIR {args.out_dir!r} exists and is not a directory")
    if os.listdir(args.out_dir) and not args.overwrite:
      raise UserError(f"OUT_DIR {args.out_dir!r} exists and is not empty; pass --overwrite "
                      "to replace it")
  start = time.perf_counter()
  try:
    state_dict, meta = langseg_layout.read_checkpoint(src, weights_only=not args.trust_pickle)
    langseg_layout.check_layout(state_dict, src)
    cfg = langseg.infer_config(
        state_dict, meta, backbone=args.backbone, readout=args.readout,
        arch_option=args.arch_option, block_depth=args.block_depth,
        activation=args.activation)
    model = langseg.load_langseg(state_dict, cfg)
  except (ValueError, FileNotFoundError) as e:
    raise UserError(f"cannot import {src!r}: {e}") from e
  for warning in langseg_layout.tensor_warnings(state_dict):
    print(f"warning: {src}: {warning}", file=sys.stderr)
  del state_dict
  net = "LSegRNNetZS" if cfg.image_encoder == "resnet" else "LSegNet"
  extra = {"source": {"file": os.path.basename(src), "format": f"lang-seg {net}",
                      "converted_by": "tools/convert.py import",
                      **{k: langseg_layout.json_safe(v) for k, v in meta.items()}},
           # CLIP's BPE, or the byte-level one of the tiny test models' vocabulary.
           "tokenizer": args.tokenizer or (
               text.BYTE_LEVEL_TOKENIZER if cfg.text_vocab_size == text.BYTE_LEVEL_VOCAB_SIZE
               else text.DEFAULT_TOKENIZER)}
  checkpoint.write_dir_atomically(args.out_dir, lambda tmp: checkpoint.save_model(
      tmp, model, extra_meta=extra, check_finite=False))
  return (f"imported {src} -> {args.out_dir} ({cfg.backbone}, arch_option "
          f"{cfg.arch_option}, block_depth {cfg.block_depth}) in "
          f"{time.perf_counter() - start:.1f} s")


# --- export ---
def _add_clip_weights(state_dict, clip_path: str, trust_pickle: bool):
  clip_path = weights.resolve(clip_path, kind="clip", what="--clip-weights")
  if os.path.isdir(clip_path):
    raise UserError(f"--clip-weights {clip_path!r} is a folder; expected an OpenAI CLIP "
                       f"file (one of {weights.names('clip')}, its URL, or a local .pt)")
  try:
    clip_sd = langseg_layout.load_state_dict_file(clip_path, weights_only=not trust_pickle)
    merged = langseg.add_clip_image_tower(state_dict, clip_sd)
  except (ValueError, FileNotFoundError) as e:
    raise UserError(f"cannot take CLIP's image tower from {clip_path!r}: {e}") from e
  # Our CLIP tensor name -> the same tensor's name in the CLIP file.
  ours, theirs = langseg_layout.CLIP_PREFIX, clip_openai.find_prefix(clip_sd)
  names = {k: theirs + k[len(ours):] for k in state_dict if k.startswith(ours)}
  differ = [k for k, name in names.items() if name in clip_sd
            and not np.array_equal(np.asarray(clip_sd[name], np.float32), state_dict[k])]
  if differ:
    print(f"warning: {len(differ)} text-tower tensors of {clip_path} differ from the model's "
          f"(e.g. {differ[0]}); the model's are kept. Is it the CLIP model LSeg was "
          "trained with?", file=sys.stderr)
  return merged


def run_export(args) -> str:
  _require_torch("writing a PyTorch checkpoint")
  out = os.path.abspath(args.out)
  if os.path.isdir(out):
    raise UserError(f"OUT {args.out!r} is a directory; expected a file name like lseg.pt")
  if os.path.exists(out) and not args.overwrite:
    raise UserError(f"OUT {args.out!r} exists; pass --overwrite to replace it")
  start = time.perf_counter()
  try:
    model, _ = checkpoint.load_model(args.ckpt_dir, step=args.step)
  except (ValueError, FileNotFoundError) as e:
    raise UserError(f"cannot load {args.ckpt_dir!r}: {e}") from e
  state_dict = langseg.export_langseg(model)
  if args.clip_weights:
    state_dict = _add_clip_weights(state_dict, args.clip_weights, args.trust_pickle)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  langseg.write_torch_checkpoint(
      out, state_dict, lseg_config=langseg.torch_config(model.cfg),
      half_prefixes=(langseg_layout.CLIP_PREFIX,) if args.half else (), bare=args.bare)
  return (f"exported {args.ckpt_dir} ({model.cfg.backbone}) -> {args.out}, "
          f"{len(state_dict)} tensors in {time.perf_counter() - start:.1f} s")


# --- command line ---
def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="tools/convert.py", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  imp = sub.add_parser(
      "import", help="lang-seg checkpoint -> lseg-jax checkpoint directory",
      description=(
          "The backbone, decoder width and readout are inferred from the weights; a "
          "spatial-regularisation head is not (bottleneck and depthwise hold the same "
          "weights): --arch-option, --block-depth (and --activation for depth >= 2) are "
          "then required unless the file records them. Nothing is written to OUT_DIR "
          "unless the import succeeds."))
  imp.add_argument("src", metavar="SRC", help=(
      "checkpoint file (.ckpt, .pt, .pth, .safetensors), or its http(s) URL"))
  imp.add_argument("out_dir", metavar="OUT_DIR", help="checkpoint directory to create")
  imp.add_argument("--backbone", choices=sorted(lseg.FIELD_CHOICES["backbone"]),
                   help="override the backbone inferred from the weights")
  imp.add_argument("--arch-option", type=int, choices=lseg.FIELD_CHOICES["arch_option"],
                   help="0 none, 1 bottleneck, 2 depthwise head block")
  imp.add_argument("--block-depth", type=int,
                   help="times the head block runs (lang-seg --block_depth)")
  imp.add_argument("--activation", choices=lseg.FIELD_CHOICES["activation"],
                   help="head-block activation (lang-seg --activation)")
  imp.add_argument("--readout", choices=lseg.FIELD_CHOICES["readout"],
                   help="only for checkpoints without the readout projection")
  imp.add_argument("--trust-pickle", action="store_true",
                   help="let torch.load unpickle arbitrary objects (official Lightning "
                   "checkpoints may need it); only for files you trust")
  imp.add_argument("--tokenizer", default=None, help=(
      "tokenizer to record for the model (default: CLIP's, or byte-level for a byte-level "
      "vocabulary)"))
  imp.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
  imp.set_defaults(run=run_import)

  exp = sub.add_parser(
      "export", help="lseg-jax checkpoint directory -> PyTorch state dict (LSegNet layout)",
      description="The file format and how the official code loads it: docs/interop.md, "
                  "\"Export\".")
  exp.add_argument("ckpt_dir", metavar="CKPT_DIR", help="checkpoint directory (ours)")
  exp.add_argument("out", metavar="OUT.pt", help="file to write")
  exp.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  exp.add_argument("--clip-weights", metavar="CLIP.pt",
                   help="OpenAI CLIP checkpoint (a file, a clip.load name such as ViT-B/32, "
                   "or a URL) whose image tower and logit_scale to include")
  exp.add_argument("--half", action="store_true",
                   help="store the CLIP tower (clip_pretrained.*) in float16, as the official "
                   "checkpoints do; the rest stays float32")
  exp.add_argument("--bare", action="store_true",
                   help="write the state dict alone (for LSegNet.load(path)); the config is "
                   "then not recorded")
  exp.add_argument("--trust-pickle", action="store_true",
                   help="let torch.load unpickle arbitrary objects in --clip-weights")
  exp.add_argument("--overwrite", action="store_true", help="replace an existing OUT file")
  exp.set_defaults(run=run_export)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  print(args.run(args))
  return 0


if __name__ == "__main__":
  common.entry_point(main)
