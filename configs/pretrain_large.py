r"""BEiT-Large masked image modeling on ImageNet-1k (paper recipe).

  python -m beit_jax.main --config=configs/pretrain_large.py \
    --config.tokenizer.path=RUN/export/tokenizer --config.data.data_dir=~/tensorflow_datasets

The Base recipe (configs/pretrain_base.py) with unilm's Large settings: ViT-L/16
(1024 wide, 24 blocks, 16 heads), LayerScale 1e-5, gradient clipping 1.0. Same
arguments as pretrain_base.py (e.g. `:epochs=300,batch_size=1024`).
"""

from beit_jax import config_lib


def get_config(arg=None):
  c = config_lib.sibling_config(__file__, "pretrain_base.py", arg)
  if c.model.variant == "base":  # Default variant of this file is large.
    c.model.variant = "large"
  c.model.init_values = 1e-5
  c.optim.clip_grad_norm = 1.0
  return c
