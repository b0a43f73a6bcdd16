r"""BEiT v2-Base masked image modeling on ImageNet-1k, on VQ-KD codes (unilm BEiT v2 recipe).

  python -m beit_jax.main --config=configs/pretrain_v2_base.py \
    --config.tokenizer.path=RUN/export/tokenizer --config.data.data_dir=~/tensorflow_datasets

unilm `beit2/PRETRAINING.md`, Base row (`run_beitv2_pretraining.py` with
`--model beit_base_patch16_224_8k_vocab_cls_pt --shared_lm_head True --early_layers 9
--head_layers 2`): the BEiT recipe of configs/pretrain_base.py (global batch 2048 = 128 x 16
V100, AdamW eps 1e-8, lr 1.5e-3 with 10 warmup epochs from 0 and a per-step cosine to 1e-5,
weight decay 0.05, clip 3.0, LayerScale 0.1, shared relative position bias, blockwise masking
of 75 of 196 patches, min block 16, ColorJitter 0.4 and flip, ImageNet mean/std) with BEiT
v2's changes:
  * the targets are a VQ-KD tokenizer's codes (`configs/vqkd_base.py`, or unilm's
    `vqkd_encoder_base_decoder_3x768x12_clip` converted by `python -m beit_jax.convert vqkd`):
    8192 codes on a 14x14 grid, seen on a 224 px bicubic view of the same crop;
  * random-resized crops of 20-100% of the image (`--min_crop_scale 0.2`, not 8%);
  * patch aggregation (`model.patch_aggregation`): the last block's cls token with block 9's
    patch states through 2 extra blocks, the LM head shared, loss = sum of the two
    masked-token cross-entropies; the extra blocks are dropped from the export.

The two schedules of the PRETRAINING.md notes (`:schedule=`):
  1600   (default) 1600 epochs, betas (0.9, 0.999), drop path 0.1 -- the released
         `beitv2_base_patch16_224_pt1k.pth` (fine-tuned: 85.5% top-1 in the paper);
  300    300 epochs, betas (0.9, 0.98), drop path 0 -- `beitv2_base_patch16_224_pt1k_300e.pth`
         (85.0%).
Large (`:variant=large`, or configs/pretrain_large.py's settings): early layer 21 of 24 and
LayerScale 1e-5, as in the Large row; the rest is the same.

Arguments after ':' (e.g. configs/pretrain_v2_base.py:schedule=300,batch_size=1024):
  schedule    1600 | 300 (epochs, betas and drop path of that row)
  variant     ViT size: base | large (tiny, small: unilm has no row; early layer depth - 3)
  batch_size  global batch (lr is not rescaled: pass --config.optim.lr, or
              --config.optim.scale_lr_with_batch=True to scale it linearly from 2048)
  tokenizer   path of the VQ-KD tokenizer export
"""

from beit_jax import config_lib

# The two rows of unilm's PRETRAINING.md notes: epochs -> (beta2, drop path).
SCHEDULES = {1600: (0.999, 0.1), 300: (0.98, 0.0)}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, schedule=1600, variant="base", batch_size=2048, tokenizer="")
  if arg.schedule not in SCHEDULES:
    raise ValueError(
      f"configs/pretrain_v2_base.py:schedule={arg.schedule} is not one of unilm's rows; "
      f"use one of {sorted(SCHEDULES)} (or set total_steps / optim.b2 / model.drop_path_rate)."
    )
  c = config_lib.sibling_config(
    __file__,
    "pretrain_base.py",
    f"variant={arg.variant},epochs={arg.schedule},batch_size={arg.batch_size},"
    f"tokenizer={arg.tokenizer}",
  )
  beta2, drop_path = SCHEDULES[arg.schedule]
  c.optim.b2 = beta2
  c.model.drop_path_rate = drop_path
  c.input.second_size = 224
  c.input.second_interpolation = "bicubic"
  c.input.crop_scale = (0.2, 1.0)
  c.model.patch_aggregation = True
  # unilm's --early_layers: 9 of 12 blocks (Base), 21 of 24 (Large); 0 = depth - 3.
  c.model.early_layers = {"base": 9, "large": 21}.get(arg.variant, 0)
  c.model.head_layers = 2
  if arg.variant == "large":
    c.model.init_values = 1e-5  # The Large row's --layer_scale_init_value (clip stays 3.0).
  return c
