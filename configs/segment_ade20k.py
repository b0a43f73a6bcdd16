r"""BEiT + UperNet semantic segmentation on ADE20K: unilm's settings (`beit/semantic_segmentation`).

  python -m beit_jax.main --config=configs/segment_ade20k.py \
    --config.pretrained=RUN/export/beit --config.data.path=/data/ADEChallengeData2016

`--config.pretrained` is any BEiT export: this project's MIM export, `python -m
beit_jax.convert beit` of a unilm checkpoint (`beit_base_patch16_224_pt22k` for `pt`,
`..._pt22k_ft22k` for `ft22k`), or a fine-tuned classifier. A unilm / mmseg or Hugging Face
segmentation checkpoint converts with `python -m beit_jax.convert segmentation SRC.pth OUT`.

unilm's configs `configs/beit/upernet/upernet_beit_{base_12,large_24}_{512,640}_slide_160k_
ade20k_{pt,pt2ft}.py` (mmseg 0.11), picked by the arguments after ':'
(e.g. configs/segment_ade20k.py:variant=large,setting=ft22k,crop=640):

  variant  base | large      backbone (Large: LayerScale 1e-6, drop path 0.2, out_indices
                             7, 11, 15, 23; Base: 0.1, 0.1, 3, 5, 7, 11)
  setting  pt | ft22k        from a self-supervised checkpoint (lr 7e-4, layer decay 0.65)
                             or an IN-22k fine-tuned one (Base lr 3e-5, decay 0.9; Large
                             2e-5, 0.95)
  crop     512 | 640         crop and window size (640: img_scale (2560, 640), stride 426;
                             Large 640: 320k iterations, warmup 3000)
  steps    0 = the recipe's; batch_size (16 = unilm's 8 GPUs x 2); pretrained; path

Both: AdamW (0.9, 0.999), wd 0.05 on every >1-D non-bias weight, poly schedule power 1 to
0 with linear warmup (ratio 1e-6), 160k iterations at batch 16; UperNet channels = width,
FCN auxiliary head (256 channels, loss weight 0.4), dropout 0.1, BatchNorm over the global
batch; images normalised by mean / std 127.5; train pipeline resize (2048, 512) x 0.5-2.0,
crop with cat_max_ratio 0.75, flip, PhotoMetricDistortion, pad 0 / 255; test: short side
512 (keep ratio), sliding windows (crop, stride 341) averaged, single scale without flip
(`--config.eval.flip=True --config.eval.ratios='(0.5,0.75,1.0,1.25,1.5,1.75)'` is unilm's
multi-scale test, `_ms` configs). unilm trains with fp16 AMP; here `model.dtype='auto'`
(bfloat16 on accelerators).

`setting=pt` with `variant=large` has no unilm config; it uses the Base `pt` values.
"""

from typing import NamedTuple

import ml_collections

from beit_jax import config_lib


class Recipe(NamedTuple):
  lr: float
  layer_decay: float
  warmup: int
  steps: int


RECIPES = {  # (variant, setting, crop) -> unilm's values.
  ("base", "pt", 512): Recipe(7e-4, 0.65, 1500, 160_000),
  ("base", "pt", 640): Recipe(7e-4, 0.65, 1500, 160_000),
  ("base", "ft22k", 512): Recipe(3e-5, 0.9, 1500, 160_000),
  ("base", "ft22k", 640): Recipe(3e-5, 0.9, 1500, 160_000),
  ("large", "pt", 512): Recipe(7e-4, 0.65, 1500, 160_000),
  ("large", "pt", 640): Recipe(7e-4, 0.65, 1500, 160_000),
  ("large", "ft22k", 512): Recipe(2e-5, 0.95, 1500, 160_000),
  ("large", "ft22k", 640): Recipe(2e-5, 0.95, 3000, 320_000),
}
BACKBONE = {"base": (0.1, 0.1), "large": (1e-6, 0.2)}  # init_values, drop_path_rate


def get_config(arg=None):
  arg = config_lib.parse_arg(
    arg, variant="base", setting="pt", crop=512, steps=0, batch_size=16, pretrained="", path=""
  )
  key = (arg.variant, arg.setting, arg.crop)
  if key not in RECIPES:
    raise ValueError(
      f"No unilm recipe for variant={arg.variant}, setting={arg.setting}, crop={arg.crop}; "
      "choose variant base|large, setting pt|ft22k, crop 512|640."
    )
  recipe = RECIPES[key]
  init_values, drop_path = BACKBONE[arg.variant]

  c = ml_collections.ConfigDict()
  c.task = "segment"
  c.seed = 0
  c.total_steps = arg.steps or recipe.steps
  c.pretrained = arg.pretrained
  c.data = config_lib.data_config(
    source="ade20k",
    path=arg.path,
    train_split="training",
    eval_split="validation",
    num_workers=8,
    num_classes=0,
    reduce_zero_label=True,
    num_images=0,
  )
  scale = (2048, 512) if arg.crop == 512 else (2560, 640)
  c.input = dict(
    batch_size=arg.batch_size,
    crop_size=arg.crop,
    img_scale=scale,
    ratio_range=(0.5, 2.0),
    cat_max_ratio=0.75,
    flip_prob=0.5,
    photometric=True,
    norm="half",  # mean / std 127.5 (unilm's img_norm_cfg).
  )
  c.model = dict(
    variant=arg.variant,
    patch_size=16,
    drop_path_rate=drop_path,
    init_values=init_values,
    use_abs_pos_emb=False,
    use_rel_pos_bias=True,
    out_indices=(),  # () = unilm's for the depth.
    channels=0,  # 0 = the backbone's width (768 / 1024).
    aux_channels=256,
    dropout_rate=0.1,
    remat=False,
    attention="auto",
    dtype="auto",
  )
  c.loss = dict(aux_weight=0.4, avg_non_ignore=False)
  c.optim = config_lib.adamw_config(
    lr=recipe.lr, min_lr=0.0, warmup_steps=recipe.warmup, weight_decay=0.05
  )
  c.optim.schedule = "poly"
  c.optim.power = 1.0
  c.optim.warmup_ratio = 1e-6
  c.optim.layer_decay = recipe.layer_decay
  c.eval = dict(
    stride=341 if arg.crop == 512 else 426, ratios=(1.0,), flip=False, max_images=0, read_threads=8
  )
  c.eval_batch_size = 8  # Windows per call of the jitted window step.
  c.ckpt = config_lib.ckpt_config(every=16_000, keep=2)
  c.log_every = 50
  c.eval_every = 16_000
  c.mesh = config_lib.mesh_config()
  c.nonfinite = config_lib.nonfinite_config()
  c.pictures = True  # (image, ground truth, prediction) of the first eval images.
  c.num_pictures = 4
  c.tensorboard = True
  c.export_dir = ""
  return c
