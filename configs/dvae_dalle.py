r"""The DALL-E dVAE (paper App. A.2) at ImageNet scale: the tokenizer BEiT uses.

8192 tokens, 112 px tokenizer view -> 14x14 grid, logit-Laplace decoder, tau 1 -> 1/16
over 150k updates, beta 0 -> 6.6 over 5k, lr 1e-4 -> 1.25e-6, AdamW wd 1e-4, EMA 0.999,
batch 512, 3M updates in the paper (64 V100s). ImageNet prepared as a TFDS ArrayRecord
dataset (see README):

  python -m beit_jax.main --config=configs/dvae_dalle.py --workdir=gs://BUCKET/dvae_dalle \
    --config.data.source=tfds --config.data.name=imagenet2012 --config.data.data_dir=DIR

Arguments after ':' (e.g. configs/dvae_dalle.py:steps=500000):
  steps  total updates (default 3,000,000 as in the paper)
"""

import ml_collections

from beit_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=3_000_000)
  c = ml_collections.ConfigDict()
  c.task = "dvae"
  c.seed = 0
  c.total_steps = arg.steps
  c.data = config_lib.data_config(source="tfds", name="imagenet2012", num_workers=16)
  c.input = dict(
    batch_size=512,
    image_size=112,
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    interpolation="lanczos",
    flip_prob=0.5,
    color_jitter=0.0,
  )
  c.model = dict(
    arch="dall_e",
    vocab_size=8192,
    recon_loss="logit_laplace",
    input_norm="dall_e",
    num_layers=3,
    hidden=256,
    num_resblocks=2,
    codebook_dim=512,
    n_hid=256,
    n_blk_per_group=2,
    group_count=4,
    n_init=128,
    dtype="bfloat16",
  )
  c.loss = dict(
    tau_start=1.0,
    tau_end=1 / 16,
    tau_steps=150_000,
    beta_start=0.0,
    beta_end=6.6,
    beta_steps=5_000,
    hard=False,
    diversity=0.0,  # DALL-E's ELB exactly (no codebook-diversity term).
  )
  c.codebook = dict(
    init="random", init_images=256, restart_every=0, restart_below=0.05
  )  # DALL-E's init ('kmeans': compact only).
  c.optim = config_lib.adamw_config(
    lr=1e-4,
    min_lr=1.25e-6,
    warmup_steps=0,
    weight_decay=1e-4,
    decay_steps=min(1_200_000, arg.steps),
    reference_batch=512,  # DALL-E's lr is for batch 512; not rescaled (exact recipe).
  )
  c.ema_decay = 0.999
  c.mesh = config_lib.mesh_config()
  c.ckpt = config_lib.ckpt_config(every=5000, keep=3)
  c.nonfinite = config_lib.nonfinite_config()
  c.pictures = True  # Draw beit_jax.viz pictures at every checkpoint.
  c.log_every = 100
  c.eval_every = 50_000
  c.eval_batch_size = 512
  c.tensorboard = True
  c.export_dir = ""
  return c
