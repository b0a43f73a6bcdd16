r"""Semantic segmentation with a small BEiT on small images (mosaics of the built-in photos
by default; no download).

  python -m beit_jax.main --config=configs/segment_small.py \
    --config.pretrained=runs/pretrain_small/export/beit --workdir=runs/segment_small

From the quick start's MIM export (`configs/pretrain_small.py`), or from random init
(`--config.pretrained=`, the from-scratch baseline). Any images + masks folders
(`PATH/<split>/images/*.png|jpg` with `PATH/<split>/masks/<same stem>.png` holding class
ids, 255 ignored), e.g. the Tiny-ImageNet mosaics of `benchmarks/segmentation_mosaics.py`:
  --config.data.source=masks --config.data.path=/tmp/seg_mosaics --config.data.num_classes=100

The recipe of configs/segment_ade20k.py (UperNet + FCN auxiliary head, AdamW, layer decay,
poly schedule with linear warmup, mmseg's augmentation, sliding-window eval) scaled to
128 px images: crops of 64 px (img_scale (256, 64), i.e. the short side resized to 64 x
0.5-2.0), patch 8, windows 64 / stride 43 (unilm's 512 / 341), batch 16, checkpoints and
eval every 250 steps. The patch-8 neck keeps unilm's patch-16 design (stride 4 for the
finest map becomes 2).

Arguments after ':' (e.g. configs/segment_small.py:steps=2000,batch_size=32):
  variant (random init only), steps, batch_size, pretrained, lr, crop
"""

from beit_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(
    arg, variant="mini", steps=200, batch_size=16, pretrained="", lr=7e-4, crop=64
  )
  c = config_lib.sibling_config(
    __file__, "segment_ade20k.py", f"batch_size={arg.batch_size},pretrained={arg.pretrained}"
  )
  c.total_steps = arg.steps
  c.data = config_lib.data_config(
    source="builtin",
    train_split="train",
    eval_split="val",
    num_classes=0,  # 0 = the source's (builtin: one class per photo).
    reduce_zero_label=False,
    num_images=512,  # builtin: training mosaics (eval: 1/8 as many, at least 64).
  )
  c.input.crop_size = arg.crop
  c.input.img_scale = (4 * arg.crop, arg.crop)
  c.model.variant = arg.variant
  c.model.patch_size = 8
  c.model.init_values = 0.1
  c.model.drop_path_rate = 0.1
  c.model.aux_channels = 32
  c.model.channels = 64  # UperNet width (unilm: the backbone's, 768); its maps are at stride 2.
  c.model.dtype = "float32"
  c.optim.lr = arg.lr
  c.optim.warmup_steps = max(arg.steps // 10, 1)
  c.eval.stride = max(arg.crop * 2 // 3, 1)
  c.eval.max_images = 0
  c.eval.read_threads = 4
  c.eval_batch_size = 8
  c.ckpt = config_lib.ckpt_config(every=250, keep=2)
  c.log_every = 25
  c.eval_every = 0
  return c
