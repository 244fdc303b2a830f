r"""The built-in default: a tiny LSeg on the generated `synthetic` dataset, on a CPU.

A tiny ViT-DPT (`tiny_vit16`) with a tiny random CLIP text tower and a byte-level
tokenizer (nothing is downloaded) learns to segment the six classes of
`lseg_jax.data.synthetic` (64x64 images, built on first use). Float32, as CPUs
without native bfloat16 run it many times slower.

  python tools/train.py --config configs/synthetic_tiny.py --workdir runs/synthetic_tiny

Reaches validation mIoU 0.917 (pixAcc 0.981) after its 600 steps (global batch 16,
~600 images/s): under a minute on 2 idle CPU cores, compilation included.
`python tools/run_default.py` trains it, then evaluates it and segments an image.
`:runlocal` trains a few steps only (smoke test).
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, backbone="tiny_vit16")
  c = common.base_config()
  c.seed = 0
  c.batch_size = 16
  c.eval_batch_size = 16
  c.total_steps = 600
  c.log_every_steps = 25
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200

  c.model.backbone = args.backbone
  c.model.dtype = "float32"
  c.text.tokenizer = common.BYTE_LEVEL_TOKENIZER

  c.data.name = "synthetic"
  c.data.source_kwargs = dict(height=64, width=64, num_train=512, num_validation=64, seed=0)
  c.data.crop_size = 64
  c.data.base_size = 64
  c.data.scale_range = (0.75, 1.5)
  c.data.eval_resize = "none"
  c.data.num_parallel_calls = 2
  c.data.shuffle_buffer = 512

  # The paper's SGD recipe (decoder at 10x, poly decay) at a larger lr, with the global
  # gradient norm clipped at 1: from a random init, unclipped SGD keeps growing the
  # weights in front of the L2-normalised pixel embeddings (their scale does not change
  # the loss), which shrinks the effective step until some classes are never learned.
  c.optim.base_lr = 0.05
  c.optim.grad_clip_norm = 1.0

  if args.runlocal:
    c.total_steps = 20
    c.log_every_steps = 5
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 10
    c.data.source_kwargs = dict(height=64, width=64, num_train=64, num_validation=16, seed=0)
  return c
