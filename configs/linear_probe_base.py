r"""Linear probing of every block of a frozen BEiT on ImageNet-1k (the paper's protocol).

  python -m beit_jax.main --config=configs/linear_probe_base.py \
    --config.pretrained=RUN/export/beit --config.data.data_dir=~/tensorflow_datasets

unilm `run_linear_eval.py` (`beit/README.md`, linear probing): frozen backbone; for every
block the feature [h_cls, mean(h_patches)] of its raw output; one Linear(2D, classes) per block
(N(0, 0.01) init), all trained at once from one forward per batch; AdamW lr 4e-3, wd
1e-4, cosine to 0, batch 1024, 100 epochs (the paper reports 50: `:epochs=50`);
random-resized crop 224 + flip; eval resize 256 -> centre crop 224. Reports top-1 per
block and the best block (paper: block 9 of BEiT-B, 14 of BEiT-L), and a weighted
k-NN (k 20, T 0.07) on the best block's features.

Arguments after ':' (e.g. configs/linear_probe_base.py:epochs=50,pretrained=DIR):
  variant (random-init baseline only), epochs, batch_size, pretrained, num_train_images
"""

import ml_collections

from beit_jax import config_lib

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
  arg = config_lib.parse_arg(
    arg,
    variant="base",
    epochs=100,
    batch_size=1024,
    pretrained="",
    num_train_images=IMAGENET_TRAIN_IMAGES,
  )
  steps_per_epoch = arg.num_train_images // arg.batch_size
  c = ml_collections.ConfigDict()
  c.task = "linear_probe"
  c.seed = 0
  c.total_steps = arg.epochs * steps_per_epoch
  c.pretrained = arg.pretrained
  c.data = config_lib.data_config(
    source="tfds", name="imagenet2012", train_split="train", eval_split="validation", num_workers=8
  )
  c.input = dict(
    batch_size=arg.batch_size,
    image_size=224,
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    interpolation="bicubic",
    flip_prob=0.5,
    norm="imagenet",
    eval_crop_pct=224 / 256,
  )
  # Used for the random-init baseline; with `pretrained`, the export's architecture.
  c.model = dict(
    variant=arg.variant,
    patch_size=16,
    drop_path_rate=0.0,
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
    lr=4e-3, min_lr=0.0, warmup_steps=0, weight_decay=1e-4, reference_batch=1024
  )
  c.knn = dict(k=20, temperature=0.07, max_train_images=0)  # k=0: no k-NN; 0 = all images.
  c.mesh = config_lib.mesh_config()
  c.ckpt = config_lib.ckpt_config(every=steps_per_epoch, keep=2)
  c.nonfinite = config_lib.nonfinite_config()
  c.log_every = 100
  c.eval_every = 10 * steps_per_epoch
  c.eval_batch_size = 1024
  c.tensorboard = True
  c.export_dir = ""
  return c
