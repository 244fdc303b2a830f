r"""LSeg on the 7-dataset mixture of the official demo model (`demo_e200.ckpt`).

  python tools/train.py --config configs/mix7.py --workdir ckpts/mix7 --config.data.data_dir=DATA

DATA holds every dataset in its official layout (docs/datasets.md): ADE20K, BDD100K,
Cityscapes, COCO panoptic, IDD, Mapillary Vistas, SUN RGB-D. Batches mix the datasets
with probabilities proportional to their training-set sizes (a concatenation, as a
PyTorch ConcatDataset would); the label table is the union of their label names and
each example's label mask marks its own dataset's labels, so every pixel competes
only with the classes its dataset annotates. Arguments: epochs=200 (passes over the
mixture; "e200" of the demo checkpoint), tpu=NAME (a TPU slice's batch and mesh,
`common.TPU_SLICES`), runlocal. The recipe is the ADE20K one
(ViT-L/16 + CLIP ViT-B/32 text, SGD, lr 0.004 x batch/16, decoder 10x, poly 0.9,
crop 480, bfloat16), starting from the official code's pretrained weights by name
(timm vit_large_patch16_384 and CLIP ViT-B/32, downloaded once and checked: see
docs/interop.md; runlocal starts from random weights); the official code does not
publish the mixture's settings.
Periodic evaluation covers the first `eval_num_batches` batches of the mixture's
validation splits (one union table).
"""
from configs import common

# Training images per dataset (their official train splits).
TRAIN_SIZES = {
    "ade20k": 20_210,
    "bdd100k": 7_000,
    "cityscapes": 2_975,
    "coco_panoptic": 118_287,
    "idd": 6_993,
    "mapillary_vistas": 18_000,
    "sunrgbd": 5_285,
}


def get_config(arg=None):
  args = common.parse_arg(arg, epochs=200, tpu="", runlocal=False)
  c = common.base_config()
  c.batch_size = 16
  common.set_tpu_slice(c, args.tpu)
  c.total_steps = args.epochs * sum(TRAIN_SIZES.values()) // c.batch_size
  c.log_every_steps = 50
  c.eval_every_steps = 10_000
  c.eval_num_batches = 200
  c.checkpoint_every_steps = 2000

  c.model.backbone = "clip_vitl16_384"
  c.model.dtype = "bfloat16"

  c.data.name = "mix"
  c.data.mixture = tuple({"name": name, "weight": float(size)}
                         for name, size in TRAIN_SIZES.items())
  c.data.crop_size = 480
  c.data.base_size = 520
  c.data.eval_resize = "center_crop"

  if args.runlocal:
    common.shrink_for_local_run(c)
  else:
    common.set_paper_weights(c, c.model.backbone)
  return c
