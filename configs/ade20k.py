r"""LSeg on ADE20K (150 classes): the paper's fixed-label experiment and its ablations.

  python tools/train.py --config configs/ade20k.py:variant=vitl16 --workdir ckpts/ade20k_l16 \
      --config.data.data_dir=DATA

DATA holds ADEChallengeData2016.zip (or its extracted folder). The pretrained weights
are those the official code starts from, by name (downloaded once, SHA-256 checked;
`configs/common.py` PAPER_WEIGHTS, evidence in docs/interop.md); --config.init.timm_vit
and --config.init.clip take a local path instead. Variants:
  vitl16   ViT-L/16 image encoder (timm vit_large_patch16_384), CLIP ViT-B/32 text
           encoder (the paper's model);
  vitb32   ViT-B/32 image encoder (timm vit_base_patch32_384), CLIP ViT-B/32 text;
  rn50x16  ViT-L/16 image encoder, CLIP RN50x16 text encoder (768-d).
More arguments: arch_option=0|1|2 and block_depth=N (spatial regularisation
ablation, activation=lrelu|relu|tanh), epochs=240, tpu=v4-8|v5e-16|v5e-64|v5p-128|v6e-64
(the batch and mesh for that TPU slice: `common.TPU_SLICES`), runlocal (4 tiny CPU
steps: needs the data, not the weights: it starts from random weights).
Recipe (lang-seg train.sh): global batch 16, SGD momentum 0.9, weight decay 1e-4, base
lr 0.004 x batch/16 with the decoder at 10x, poly decay 0.9, 240 epochs, crop 480 from
base size 520, scale 0.5-2.0, flip; bfloat16 compute
(float32 parameters, logits and loss). Attention is cuDNN's fused kernel on NVIDIA
GPUs, the Pallas flash kernel on TPUs and XLA's elsewhere (model.attention="auto");
--config.model.remat=dots|full trades compute for memory, --config.mesh.fsdp=N shards
the parameters and optimizer state over N devices (docs/scaling.md).
"""
from configs import common

VARIANTS = {
    "vitl16": "clip_vitl16_384",
    "vitb32": "clip_vitb32_384",
    "rn50x16": "clipRN50x16_vitl16_384",
}


def get_config(arg=None):
  args = common.parse_arg(arg, variant="vitl16", arch_option=0, block_depth=0,
                          activation="lrelu", epochs=common.PAPER_EPOCHS, tpu="",
                          runlocal=False)
  if args.variant not in VARIANTS:
    raise ValueError(f"unknown variant {args.variant!r}; expected one of {sorted(VARIANTS)}")
  c = common.base_config()
  c.batch_size = 16
  common.set_tpu_slice(c, args.tpu)
  c.total_steps = common.ade20k_steps(args.epochs, c.batch_size)
  c.log_every_steps = 50
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000

  c.model.backbone = VARIANTS[args.variant]
  c.model.arch_option = args.arch_option
  c.model.block_depth = args.block_depth
  c.model.activation = args.activation
  c.model.dtype = "bfloat16"

  c.data.name = "ade20k"
  c.data.crop_size = 480
  c.data.base_size = 520
  c.data.scale_range = (0.5, 2.0)
  c.data.flip = True
  # The official validation during training: short side 480, centre crop 480x480.
  c.data.eval_resize = "center_crop"

  if args.runlocal:
    common.shrink_for_local_run(c)
  else:
    common.set_paper_weights(c, c.model.backbone)
  return c
