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
  c = config_lib.sibling_config(__file__, "linear_probe_base.py",
                                f"batch_size={arg.batch_size},pretrained={arg.pretrained}")
  c.model.variant = arg.variant
  c.total_steps = arg.steps
  c.data = config_lib.data_config()  # Built-in photos.
  c.input.image_size = 64
  c.input.norm = "half"
  c.input.eval_crop_pct = 1.0
  c.model.patch_size = 8
  c.model.dtype = "float32"
  c.optim = config_lib.adamw_config(lr=4e-3, min_lr=0.0, warmup_steps=0, weight_decay=1e-4)
  c.knn.max_train_images = 10000
  c.ckpt = config_lib.ckpt_config(every=250, keep=2)
  c.log_every = 25
  c.eval_every = 0
  c.eval_batch_size = 250
  return c
