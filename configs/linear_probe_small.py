r"""Linear probing of every block of a small BEiT on small images (built-in photos by
default; Tiny-ImageNet-style folders).

  python -m beit_jax.main --config=configs/linear_probe_small.py \
    --config.pretrained=runs/pretrain_small/export/beit --workdir=runs/linear_probe_small

The protocol of configs/linear_probe_base.py at 64 px (eval: the whole 64 px image).
`--config.pretrained=` probes a random-init backbone of `variant` (the baseline).

Arguments after ':' (e.g. configs/linear_probe_small.py:steps=800,batch_size=64):
  variant, steps, batch_size, pretrained
"""

from beit_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="mini", steps=200, batch_size=32, pretrained="")
  c = config_lib.sibling_config(
    __file__, "linear_probe_base.py", f"batch_size={arg.batch_size},pretrained={arg.pretrained}"
  )
  config_lib.small_downstream(c, variant=arg.variant, steps=arg.steps)
  c.optim = config_lib.adamw_config(
    lr=4e-3,
    min_lr=0.0,
    warmup_steps=0,
    weight_decay=1e-4,
    scale_lr_with_batch=True,  # `:batch_size=N` scales lr linearly from batch 32.
    reference_batch=32,
  )
  c.knn.max_train_images = 10000
  return c
