r"""A small VQ-KD tokenizer that trains in minutes on a CPU, distilling a BEiT of this project.

The teacher is any BEiT export, e.g. the quick start's fine-tuned classifier (64 px, patch 8:
its 8x8 patch features are the targets):

  python -m beit_jax.main --config=configs/vqkd_small.py --workdir=runs/vqkd_small \
    --config.teacher.path=runs/finetune_small/export/best

`configs/vqkd_base.py`'s recipe scaled down: a 6-block, 128-wide encoder and a 1-block
decoder on the 64 px view (patch 8 -> 8x8 codes of 1024, 32-d), batch 64 on the built-in
photos, lr 1e-3 for batch 64 (unilm's 5e-5 per 128 is for 100 epochs of ImageNet; at a few
hundred steps the encoder barely moves with it), warmup 5% and cosine to 1e-5. The codes
then feed BEiT v2 pretraining at the same size (`configs/pretrain_v2_small.py`).

Arguments after ':' (e.g. configs/vqkd_small.py:steps=2000,num_codes=512):
  steps       training steps
  num_codes   codebook size
  batch_size  global batch (lr scales linearly from 64)
"""

from beit_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=600, num_codes=1024, batch_size=64)
  c = config_lib.sibling_config(__file__, "vqkd_base.py", "epochs=1")
  c.total_steps = arg.steps
  c.data = config_lib.data_config()  # Built-in photos.
  c.input.batch_size = arg.batch_size
  c.input.image_size = 64
  c.input.crop_scale = (0.2, 1.0)
  c.model.variant = "mini"
  c.model.patch_size = 8
  c.model.num_codes = arg.num_codes
  c.model.dtype = "float32"
  c.optim = config_lib.adamw_config(
    lr=1e-3,
    min_lr=1e-5,
    warmup_steps=max(arg.steps // 20, 1),
    b1=0.9,
    b2=0.99,
    weight_decay=1e-4,
    scale_lr_with_batch=True,
    reference_batch=64,
  )
  c.ckpt = config_lib.ckpt_config(every=250, keep=2)
  c.log_every = 25
  c.eval_every = 0
  c.eval_batch_size = 64
  return c
