r"""BEiT v2 at CPU size: a small BEiT pretrained with patch aggregation on a small VQ-KD's codes.

The chain on the built-in photos (each step minutes on 2 CPU cores):

  python -m beit_jax.main --config=configs/pretrain_small.py --workdir=runs/pretrain_small
  python -m beit_jax.main --config=configs/finetune_small.py --workdir=runs/finetune_small \
    --config.pretrained=runs/pretrain_small/export/beit
  python -m beit_jax.main --config=configs/vqkd_small.py --workdir=runs/vqkd_small \
    --config.teacher.path=runs/finetune_small/export/best
  python -m beit_jax.main --config=configs/pretrain_v2_small.py --workdir=runs/pretrain_v2_small \
    --config.tokenizer.path=runs/vqkd_small/export/tokenizer

configs/pretrain_v2_base.py's recipe (its 300-epoch row: betas (0.9, 0.98), no drop path) at
the size of configs/pretrain_small.py: a mini BEiT (128 wide, 6 blocks) on 64 px images with
patch 8 (8x8 patches), the VQ-KD codes of a 64 px bicubic view of the same crop (crop scale
0.2-1), ~40% of the patches masked blockwise, patch aggregation from block 3 of 6 through 2
extra blocks (loss = the two heads' cross-entropies). The export (`<workdir>/export/beit`)
is a plain BEiT that configs/finetune_small.py and configs/linear_probe_small.py take
(`--config.pretrained=runs/pretrain_v2_small/export/beit`).

Arguments after ':' (e.g. configs/pretrain_v2_small.py:steps=1000,batch_size=64):
  variant     ViT size (mini = 128 wide, 6 blocks, 4 heads)
  steps       MIM training steps
  batch_size  global batch (lr scales linearly from 32)
  tokenizer   path of the VQ-KD export
"""

from beit_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="mini", steps=300, batch_size=32, tokenizer="")
  c = config_lib.sibling_config(
    __file__,
    "pretrain_v2_base.py",
    f"schedule=300,variant={arg.variant},batch_size={arg.batch_size},tokenizer={arg.tokenizer}",
  )
  c.total_steps = arg.steps
  c.data = config_lib.data_config()  # Built-in photos.
  c.input.image_size = 64
  c.input.second_size = 64
  c.input.norm = "half"
  c.model.patch_size = 8
  c.model.early_layers = 0  # depth - 3: block 3 of the mini's 6.
  c.model.dtype = "float32"
  c.optim = config_lib.adamw_config(
    lr=1.5e-3,
    min_lr=1e-5,
    warmup_steps=max(arg.steps // 20, 1),
    b2=0.98,
    weight_decay=0.05,
    clip_grad_norm=3.0,
    scale_lr_with_batch=True,  # `:batch_size=N` scales lr linearly from batch 32.
    reference_batch=32,
  )
  c.ckpt = config_lib.ckpt_config(every=250, keep=2)
  c.pictures = True
  c.log_every = 25
  c.eval_batch_size = 64
  return c
