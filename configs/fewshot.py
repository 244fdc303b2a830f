r"""Zero-shot LSeg on PASCAL-5i, COCO-20i or FSS-1000 (trained on a fold's seen classes).

The paper's zero-shot rows, ResNet-101 image encoder (lang-seg's `LSegRNNetZS`) and
CLIP ViT-B/32 text encoder, one run per fold (PASCAL-5i and COCO-20i: fold=0..3):

  python tools/train.py --config configs/fewshot.py:dataset=pascal,fold=0 \
      --workdir ckpts/pascal_fold0 --config.data.data_dir=DATA
  python tools/train.py --config configs/fewshot.py:dataset=coco,fold=0 \
      --workdir ckpts/coco_fold0 --config.data.data_dir=DATA
  python tools/train.py --config configs/fewshot.py:dataset=fss \
      --workdir ckpts/fss_rn101 --config.data.data_dir=DATA

and the ViT-L/16 FSS-1000 row (lang-seg's `LSegNetZS`):

  python tools/train.py --config configs/fewshot.py:dataset=fss,backbone=clip_vitl16_384 \
      --workdir ckpts/fss_l16 --config.data.data_dir=DATA

Arguments: dataset=pascal|coco|fss, fold=0..3 (PASCAL-5i and COCO-20i; FSS-1000 has
one split), backbone (clip_resnet101 by default, or any LSegConfig backbone),
steps=N, tpu=NAME (a TPU slice's batch and mesh, `common.TPU_SLICES`), runlocal (random
weights). The pretrained weights are those the official code
starts from, by name (downloaded once, SHA-256 checked; `configs/common.py`
PAPER_WEIGHTS, docs/interop.md): `resnet101` is torchvision's ImageNet ResNet-101
(IMAGENET1K_V1, `resnet101-63fe2227.pth`: what `torchvision.models.resnet101(pretrained=True)`
gave lang-seg), `ViT-B/32` OpenAI's CLIP, `vit_large_patch16_384` timm 0.4.12's
weights; --config.init.* take local paths instead.

Each training example is an episode: the label table is ["other", *the fold's
training classes] and each example's label mask leaves two candidates, "other" and
its class (lang-seg's ['others', class] per example). Periodic evaluation scores the
held-out classes' episodes with HSNet's protocol (mIoU, FB-IoU); final numbers come
from tools/eval.py (docs/evaluation.md).

The recipe. lang-seg publishes no zero-shot training script; its zero-shot module
(`lsegmentation_module_zs.py`) trains with SGD (momentum 0.9, weight decay 1e-4),
lr = 0.004 x batch/16 with poly decay 0.9, the decoder (`scratch`) at 10x, the whole
image encoder (the ResNet included) at the base lr, and the CLIP text tower outside the
optimizer; BatchNorm in training mode. We keep all of that (it is also the paper's
ADE20K recipe, this project's `optim` defaults). What we choose differently, and why:
  * data: each example is one image of an episode, cropped 480 x 480 from base size
    520 with random scale 0.5-2.0 and flips (this project's training pipeline, the
    paper's augmentation). lang-seg's loop resizes every image to 480 x 480 without
    augmentation and trains on the support and the query image of each episode;
    random crops show the model the same classes at more scales, and evaluation uses
    HSNet's 480 x 480 resize (`eval_resize="square"`) as lang-seg does.
  * length: 20,000 steps at batch 16 (320k images) for every dataset, with the full
    poly schedule. lang-seg's PASCAL and COCO runs exit after 4 epochs of the episode
    list (`threshold_epoch = 3`), partway through a poly schedule set by --max_epochs;
    for PASCAL-5i fold 0 (11,394 training episodes, a support and a query image each)
    that is 91k images, about 5,700 steps at batch 16: `steps=5700` gives that budget
    (with a schedule that decays to 0). We keep one budget for all datasets rather
    than guess lang-seg's unpublished --max_epochs.
  * bfloat16 compute (float32 parameters, logits and loss) on accelerators.
Images are normalised with mean 0.5 / std 0.5 like every config; the ResNet backbone
converts them to the ImageNet normalisation lang-seg feeds its ResNet.
"""
from configs import common

DATASETS = {"pascal": "pascal5i", "coco": "coco20i", "fss": "fss1000"}
# The paper's zero-shot image encoder for every dataset (the official model zoo's
# pascal_fold*, coco_fold*, fss_rn101); FSS-1000 also has a ViT-L/16 model (fss_l16).
DEFAULT_BACKBONE = "clip_resnet101"


def get_config(arg=None):
  args = common.parse_arg(arg, dataset="pascal", fold=0, backbone=DEFAULT_BACKBONE,
                          steps=20_000, tpu="", runlocal=False)
  if args.dataset not in DATASETS:
    raise ValueError(f"unknown dataset {args.dataset!r}; expected one of {sorted(DATASETS)}")
  if not 0 <= args.fold < 4:
    raise ValueError(f"fold={args.fold}; expected 0, 1, 2 or 3")
  c = common.base_config()
  c.batch_size = 16
  common.set_tpu_slice(c, args.tpu)
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
  # The official --nshot 0 of the paper's zero-shot rows: which episodes there are
  # (FSS-1000: 2,400 test queries; COCO-20i: the official draw). 1 gives HSNet's 1-shot
  # episodes (FSS-1000: 2,160).
  c.data.shot = 0

  if args.runlocal:
    common.shrink_for_local_run(c)
  else:
    common.set_paper_weights(c, c.model.backbone)
  return c
