r"""The quick start: a small tokenizer, then BEiT MIM, on the built-in photos (no download).

  python -m beit_jax.main --config=configs/pretrain_small.py --workdir=runs/pretrain_small

Stage 1 trains the compact dVAE of configs/dvae_small.py (32 px view -> 8x8 tokens, 1024
tokens) in `<workdir>/tokenizer` on the same images; stage 2 pretrains a small BEiT
(patch 8 at 64 px -> 8x8 patches) to predict those tokens for ~40% of the patches,
blockwise. Both stages run in minutes on 2 CPU cores; re-running resumes/skips what
is done. Exports: `<workdir>/tokenizer/export/tokenizer`, `<workdir>/export/beit`.

Tiny-ImageNet-style data (64 px images) with a tokenizer trained before:
  python -m beit_jax.main --config=configs/pretrain_small.py:steps=3000 --workdir=runs/tin \
    --config.data.source=folder --config.data.path=/data/tin \
    --config.tokenizer.path=runs/dvae_tin/export/tokenizer

Arguments after ':' (e.g. configs/pretrain_small.py:variant=tiny,steps=1000):
  variant           ViT size (mini = 128 wide, 6 blocks, 4 heads)
  steps             MIM training steps
  tokenizer_steps   tokenizer training steps (when no tokenizer path is given)
  batch_size        global batch
"""

from beit_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="mini", steps=300, tokenizer_steps=600, batch_size=32)
  c = config_lib.sibling_config(
    __file__, "pretrain_base.py", f"variant={arg.variant},batch_size={arg.batch_size}"
  )
  c.total_steps = arg.steps
  c.data = config_lib.data_config()  # Built-in photos.
  c.input.image_size = 64
  c.input.second_size = 32
  c.input.norm = "half"
  c.model.patch_size = 8
  c.model.drop_path_rate = 0.0
  c.model.dtype = "float32"
  c.optim = config_lib.adamw_config(
    lr=1.5e-3,
    min_lr=1e-5,
    warmup_steps=max(arg.steps // 20, 1),
    weight_decay=0.05,
    clip_grad_norm=3.0,
    scale_lr_with_batch=True,  # `:batch_size=N` scales lr linearly from batch 32.
    reference_batch=32,
  )
  c.ckpt = config_lib.ckpt_config(every=250, keep=2)
  c.nonfinite = config_lib.nonfinite_config()
  c.pictures = True  # Draw beit_jax.viz pictures at every checkpoint.
  c.log_every = 25
  c.eval_batch_size = 64
  # Trained first (in <workdir>/tokenizer, on config.data) when tokenizer.path is empty.
  c.tokenizer.train = config_lib.sibling_config(
    __file__, "dvae_small.py", f"image_size=32,steps={arg.tokenizer_steps}"
  )
  return c
