r"""Zero-shot LSeg on PASCAL-5i, COCO-20i or FSS-1000 (trained on a fold's seen classes).

  python tools/train.py --config configs/fewshot.py:dataset=pascal,fold=0 \
      --workdir ckpts/pascal_fold0 --config.data.data_dir=DATA \
      --config.init.timm_vit=vit_large_patch16_384.safetensors --config.init.clip=ViT-B-32.pt

Arguments: dataset=pascal|coco|fss, fold=0..3 (PASCAL-5i and COCO-20i; FSS-1000 has
one split), steps=N, runlocal. Each training example is an episode: the label table is
["other", *the fold's training classes] and each example's label mask leaves two
candidates, "other" and its class. Periodic evaluation scores the held-out classes'
episodes with HSNet's protocol (mIoU, FB-IoU); final numbers come from tools/eval.py.
The official code publishes no zero-shot training schedule: the recipe is the ADE20K
one (SGD, lr 0.004 x batch/16, decoder 10x, poly 0.9, crop 480) and the step count
(default 20,000 at batch 16) is our choice. The official zero-shot models use a
ResNet-101 image encoder for PASCAL/COCO, which this project does not implement;
the default here is ViT-L/16 (the official FSS-1000 model).
"""
from configs import common

DATASETS = {"pascal": "pascal5i", "coco": "coco20i", "fss": "fss1000"}


def get_config(arg=None):
  args = common.parse_arg(arg, dataset="pascal", fold=0, backbone="clip_vitl16_384",
                          steps=20_000, runlocal=False)
  if args.dataset not in DATASETS:
    raise ValueError(f"unknown dataset {args.dataset!r}; expected one of {sorted(DATASETS)}")
  if not 0 <= args.fold < 4:
    raise ValueError(f"fold={args.fold}; expected 0, 1, 2 or 3")
  c = common.base_config()
  c.batch_size = 16
  c.total_steps = args.steps
  c.log_every_steps = 50
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 2000

  c.model.backbone = args.backbone
  c.model.dtype = "bfloat16"

  c.data.name = DATASETS[args.dataset]
  if args.dataset != "fss":
    c.data.fold = args.fold
  c.data.crop_size = 480
  c.data.base_size = 520
  c.data.eval_resize = "square"  # HSNet: query and mask at 480 x 480, scored there

  if args.runlocal:
    common.shrink_for_local_run(c)
  return c
