r"""Fine-tuning a small BEiT on small images (built-in photos by default; Tiny-ImageNet).

  python -m beit_jax.main --config=configs/finetune_small.py \
    --config.pretrained=runs/pretrain_small/export/beit --workdir=runs/finetune_small

From the quick start's MIM export (`configs/pretrain_small.py`), or from random init
(`--config.pretrained=`, the from-scratch baseline). Tiny-ImageNet-style folders:
  --config.data.source=folder --config.data.path=/data/tin --config.data.eval_split=val

The recipe of configs/finetune_base.py (RandAugment rand-m9-mstd0.5-inc1, random erasing
0.25, label smoothing 0.1, layer-wise lr decay, drop path 0.1, cosine with warmup) at
64 px / patch 8, with two changes for budgets of a few epochs: mixup / cutmix off
(`--config.mixup.prob=1.0` turns them on, alpha 0.8 / 1.0) and layer decay 0.75 for the
6-block model.

Arguments after ':' (e.g. configs/finetune_small.py:steps=1000,batch_size=64):
  variant (random init only), steps, batch_size, pretrained, lr
"""

from beit_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="mini", steps=200, batch_size=32, pretrained="", lr=2e-3)
  c = config_lib.sibling_config(
    __file__, "finetune_base.py", f"batch_size={arg.batch_size},pretrained={arg.pretrained}"
  )
  config_lib.small_downstream(c, variant=arg.variant, steps=arg.steps)
  c.mixup.prob = 0.0
  c.optim = config_lib.adamw_config(
    lr=arg.lr,
    min_lr=1e-6,
    warmup_steps=max(arg.steps // 10, 1),
    weight_decay=0.05,
    scale_lr_with_batch=True,  # `:batch_size=N` scales lr linearly from batch 32.
    reference_batch=32,
  )
  c.optim.layer_decay = 0.75
  return c
