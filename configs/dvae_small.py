r"""A compact dVAE tokenizer that trains in minutes on a CPU (the quick start).

Built-in photos (no download):
  python -m beit_jax.main --config=configs/dvae_small.py --workdir=runs/dvae_small

Your own images (root/<class>/<image>, or root/train/... and root/val/...), e.g. 64 px data
tokenized at 32 px into an 8x8 grid, matching a ViT with patch 8 at 64 px:
  python -m beit_jax.main --config=configs/dvae_small.py:steps=1400 --workdir=runs/dvae_tin \
    --config.data.source=folder --config.data.path=/data/tiny-imagenet \
    --config.data.eval_split=val

Use `:steps=N` rather than --config.total_steps to change the length: the tau/beta/lr
schedules are laid out over `steps`.

Arguments after ':' (e.g. configs/dvae_small.py:image_size=64,vocab_size=8192):
  image_size  tokenizer-view size in pixels (grid = image_size / 4)
  vocab_size  number of visual tokens
  steps       total training steps
"""

import ml_collections

from beit_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, image_size=32, vocab_size=1024, steps=600)
  c = ml_collections.ConfigDict()
  c.task = "dvae"
  c.seed = 0
  c.total_steps = arg.steps
  c.data = config_lib.data_config()

  # The tokenizer view: random-resized crop + flip, resized with lanczos (unilm's
  # second_interpolation). A milder crop than the ViT's keeps whole objects in view.
  c.input = dict(
    batch_size=32,
    image_size=arg.image_size,
    crop_scale=(0.35, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    interpolation="lanczos",
    flip_prob=0.5,
    color_jitter=0.0,
  )

  # lucidrains-style compact dVAE: 2 stride-2 convs (x4 downsampling), MSE decoder.
  c.model = dict(
    arch="compact",
    vocab_size=arg.vocab_size,
    recon_loss="mse",
    input_norm="half",
    num_layers=2,
    hidden=64,
    num_resblocks=1,
    codebook_dim=64,
    n_hid=256,
    n_blk_per_group=2,
    group_count=4,
    n_init=128,
    dtype="float32",
  )

  # DALL-E App. A.2 schedules, shortened to the run: tau 1 -> 1/16 over the run. beta is
  # held at a small constant: with an MSE decoder the KL to the uniform prior dominates
  # the reconstruction at DALL-E's 6.6 (codes become noise), and at 0 the codebook
  # collapses in the first few hundred steps.
  c.loss = dict(
    tau_start=1.0,
    tau_end=1 / 16,
    tau_steps=arg.steps,
    beta_start=0.08,
    beta_end=0.08,
    beta_steps=1,
    hard=False,
    # wav2vec 2.0's codebook diversity term: keeps the batch's codes spread (measured on
    # the built-in photos, 600 steps: 43% of the codebook in use at eval vs 4% without).
    diversity=0.1,
  )
  # How the code logits start: 'random' (the layer's init) or 'kmeans' (the encoder's
  # output layer set from k-means of the encoder features of init_images training views:
  # +4.4 dB PSNR on the built-in photos at 300 steps).
  # restart_every > 0: every that many steps, codes the batch gives under restart_below / V
  # of its soft assignments take a copy of a busy code (dead-code restarts; 0 = off).
  c.codebook = dict(init="kmeans", init_images=256, restart_every=0, restart_below=0.05)
  c.optim = config_lib.adamw_config(
    lr=3e-3,
    min_lr=1e-5,
    warmup_steps=arg.steps // 20,
    weight_decay=1e-4,
    scale_lr_with_batch=True,  # --config.input.batch_size=N scales lr linearly from 32.
    reference_batch=32,
  )
  c.ema_decay = 0.0
  c.mesh = config_lib.mesh_config()
  c.ckpt = config_lib.ckpt_config(every=250, keep=2)
  c.nonfinite = config_lib.nonfinite_config()
  c.pictures = True  # Draw beit_jax.viz pictures at every checkpoint.
  c.log_every = 50
  c.eval_every = 0
  c.eval_batch_size = 256
  c.tensorboard = True
  c.export_dir = ""
  return c
