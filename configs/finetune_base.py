r"""BEiT image classification fine-tuning on ImageNet-1k: the paper's settings.

  python -m beit_jax.main --config=configs/finetune_base.py \
    --config.pretrained=RUN/export/beit --config.data.data_dir=~/tensorflow_datasets

unilm `run_class_finetuning.py` with the hyper-parameters of its README / paper Table 13
(`beit/get_started_for_image_classification.md`). `setting` picks the row (`variant`
base | large):

  pt     from self-supervised pretraining (pt22k or pt1k) to IN-1k: batch 1024, AdamW
         (0.9, 0.999), wd 0.05; Base lr 4e-3, 100 epochs, 20 warmup, layer decay 0.65,
         drop path 0.1; Large lr 1e-3, 50 epochs, 5 warmup, layer decay 0.75, drop path
         0.2; mixup 0.8 / cutmix 1.0 (prob 1, switch 0.5), label smoothing 0.1;
  ft22k  from an IN-22k fine-tuned checkpoint (`_pt22k_ft22k`) to IN-1k: batch 512, lr
         2e-5, 30 epochs, 5 warmup, wd 1e-8, no mixup; layer decay 0.85 / 0.9, drop path
         0.1 / 0.4 (Base / Large).

Both: RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25 (pixel), random-resized
crop 224 bicubic + flip, ImageNet mean/std, cosine to 1e-6 per step, no clipping, mean
pooling + fc_norm, head init x 0.001, per-block relative position bias (a shared
pretrained table is copied into every block). Eval: resize 256 -> centre crop 224
(crop_pct 0.875); at image_size >= 384, crop_pct 1.0 and the position tables of a 224
checkpoint are resized to the new grid (unilm's geometric interpolation).

Arguments after ':' (e.g. configs/finetune_base.py:variant=large,image_size=384):
  variant, setting, image_size, epochs (0 = the setting's), batch_size (0 = the
  setting's; lr is not rescaled), pretrained (export path; '' = random init),
  num_train_images.
"""

from typing import NamedTuple

import ml_collections

from beit_jax import config_lib

IMAGENET_TRAIN_IMAGES = 1_281_167


class Recipe(NamedTuple):
  batch_size: int
  lr: float
  epochs: int
  warmup_epochs: int
  layer_decay: float
  drop_path: float
  weight_decay: float
  mixup: bool


RECIPES = {  # (setting, variant) -> the row of the paper's Table 13.
  ("pt", "base"): Recipe(1024, 4e-3, 100, 20, 0.65, 0.1, 0.05, True),
  ("pt", "large"): Recipe(1024, 1e-3, 50, 5, 0.75, 0.2, 0.05, True),
  ("ft22k", "base"): Recipe(512, 2e-5, 30, 5, 0.85, 0.1, 1e-8, False),
  ("ft22k", "large"): Recipe(512, 2e-5, 30, 5, 0.9, 0.4, 1e-8, False),
}


def get_config(arg=None):
  arg = config_lib.parse_arg(
    arg,
    variant="base",
    setting="pt",
    image_size=224,
    epochs=0,
    batch_size=0,
    pretrained="",
    num_train_images=IMAGENET_TRAIN_IMAGES,
  )
  key = (arg.setting, "large" if arg.variant == "large" else "base")
  if key not in RECIPES:
    raise ValueError(f"Unknown setting {arg.setting!r}; choose one of pt, ft22k.")
  recipe = RECIPES[key]
  batch = arg.batch_size or recipe.batch_size
  epochs = arg.epochs or recipe.epochs
  steps_per_epoch = arg.num_train_images // batch
  use_mixup = recipe.mixup

  c = ml_collections.ConfigDict()
  c.task = "finetune"
  c.seed = 0
  c.total_steps = epochs * steps_per_epoch
  c.pretrained = arg.pretrained
  c.data = config_lib.data_config(
    source="tfds", name="imagenet2012", train_split="train", eval_split="validation", num_workers=8
  )
  c.input = dict(
    batch_size=batch,
    image_size=arg.image_size,
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    interpolation="bicubic",
    flip_prob=0.5,
    auto_augment="rand-m9-mstd0.5-inc1",
    color_jitter=0.4,  # Jitter unused with RandAugment.
    reprob=0.25,
    remode="pixel",
    recount=1,
    norm="imagenet",
    eval_crop_pct=1.0 if arg.image_size >= 384 else 224 / 256,
  )
  c.mixup = dict(
    mixup_alpha=0.8 if use_mixup else 0.0,
    cutmix_alpha=1.0 if use_mixup else 0.0,
    cutmix_minmax=(),
    prob=1.0 if use_mixup else 0.0,
    switch_prob=0.5,
  )
  c.label_smoothing = 0.1
  # Used for random init; with `pretrained`, width/depth/heads/patch come from the export.
  c.model = dict(
    variant=arg.variant,
    patch_size=16,
    drop_path_rate=recipe.drop_path,
    init_values=0.1,
    use_abs_pos_emb=False,
    use_rel_pos_bias=True,
    use_mean_pooling=True,
    init_scale=0.001,
    remat=False,
    attention="auto",  # beit_jax.models.attention: einsum on CPU/TPU, cuDNN's on GPU.
    dtype="auto",
  )
  c.optim = config_lib.adamw_config(
    lr=recipe.lr,
    min_lr=1e-6,
    warmup_steps=recipe.warmup_epochs * steps_per_epoch,
    weight_decay=recipe.weight_decay,
    clip_grad_norm=0.0,
    reference_batch=recipe.batch_size,  # The paper's lr is for this batch; not rescaled.
  )
  c.optim.layer_decay = recipe.layer_decay
  c.ema_decay = 0.0  # unilm --model_ema (off by default; 0.9999 when on).
  c.mesh = config_lib.mesh_config()
  c.ckpt = config_lib.ckpt_config(every=steps_per_epoch, keep=2)
  c.nonfinite = config_lib.nonfinite_config()
  c.log_every = 100
  c.eval_every = steps_per_epoch
  c.eval_batch_size = 1024
  c.tensorboard = True
  c.export_dir = ""
  return c
