r"""BEiT-Base masked image modeling on ImageNet-1k: the paper's recipe (the main job).

  python -m beit_jax.main --config=configs/pretrain_base.py \
    --config.tokenizer.path=RUN/export/tokenizer --config.data.data_dir=~/tensorflow_datasets

unilm `run_beit_pretraining.py` as in its README / paper Table 12: ImageNet-1k (TFDS
`imagenet2012`, prepared as ArrayRecord), global batch 2048 (128 x 16 V100), AdamW
(0.9, 0.999, eps 1e-8), lr 1.5e-3 with 10 warmup epochs from 0 and a per-step cosine to
1e-5, weight decay 0.05, clip 3.0, 800 epochs (625 steps each = 500k steps), drop path
0.1, LayerScale 0.1, shared relative position bias (no absolute), blockwise masking of
75 of 196 patches (min block 16), views 224 px bicubic (ViT, ImageNet mean/std) and
112 px lanczos (tokenizer) from one crop with ColorJitter 0.4 and flip.

The tokenizer (`config.tokenizer.path`) is a params export: a dVAE trained with
`configs/dvae_dalle.py` (112 px, 8192 tokens, 14x14 grid), or the official DALL-E dVAE
(`encoder.pkl`) converted into the same format by `python -m beit_jax.convert dalle`.

Arguments after ':' (e.g. configs/pretrain_base.py:epochs=300,batch_size=1024):
  variant     ViT size: tiny | small | base | large
  epochs      pretraining epochs (ImageNet-1k: 1,281,167 images)
  batch_size  global batch (lr is not rescaled: pass --config.optim.lr, or
              --config.optim.scale_lr_with_batch=True to scale it linearly from 2048)
  tokenizer   path of the tokenizer export
Without ImageNet or a tokenizer it stops at once and says how to get them, or how to run
the quick start (configs/pretrain_small.py).
"""

import ml_collections

from beit_jax import config_lib

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
  arg = config_lib.parse_arg(
    arg,
    variant="base",
    epochs=800,
    batch_size=2048,
    tokenizer="",
    warmup_epochs=10,
    num_train_images=IMAGENET_TRAIN_IMAGES,
  )
  steps_per_epoch = arg.num_train_images // arg.batch_size
  c = ml_collections.ConfigDict()
  c.task = "pretrain"
  c.seed = 0
  c.total_steps = arg.epochs * steps_per_epoch
  c.data = config_lib.data_config(
    source="tfds", name="imagenet2012", train_split="train", eval_split="validation", num_workers=8
  )

  # unilm DataAugmentationForBEiT: ColorJitter(.4,.4,.4) -> flip -> one RandomResizedCrop
  # box (scale .08-1) -> 224 bicubic for the ViT and 112 lanczos for the tokenizer.
  c.input = dict(
    batch_size=arg.batch_size,
    image_size=224,
    second_size=112,
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    interpolation="bicubic",
    second_interpolation="lanczos",
    color_jitter=0.4,
    flip_prob=0.5,
    norm="imagenet",
  )  # --imagenet_default_mean_and_std (IN-1k); 'half' for 22k.

  # 0 = unilm's 75 / 16 of 196, scaled to other grids.
  c.mask = dict(kind="blockwise", num_patches=0, min_patches=0)
  # Which patches' tokens the loss predicts: 'masked' (BEiT) or 'all' (paper Table 4's
  # ablation; mask.kind='random' is the other one).
  c.loss_on = "masked"
  # What the ViT predicts: 'tokens' (BEiT) or 'pixels' (paper Table 4's pixel-regression
  # ablation: L2 on each masked patch's pixels, normalised per patch; no tokenizer).
  c.target = "tokens"

  c.model = dict(
    variant=arg.variant,
    patch_size=16,
    vocab_size=0,  # 0 = the tokenizer's vocabulary.
    init_values=0.1,
    drop_path_rate=0.1,
    use_abs_pos_emb=False,
    use_shared_rel_pos_bias=True,
    remat=False,
    # BEiT v2's patch aggregation (configs/pretrain_v2_base.py): the last block's cls token
    # with block `early_layers`' patch states (0: 9 of 12, 21 of 24) through `head_layers`
    # extra blocks, a second masked-token loss; dropped at export.
    patch_aggregation=False,
    early_layers=0,
    head_layers=2,
    attention="auto",  # beit_jax.models.attention: einsum on CPU/TPU, cuDNN's on GPU.
    dtype="auto",
  )  # bf16 compute on GPU/TPU, f32 on CPU.

  c.tokenizer = dict(path=arg.tokenizer)

  c.optim = config_lib.adamw_config(
    lr=1.5e-3,
    min_lr=1e-5,
    warmup_steps=arg.warmup_epochs * steps_per_epoch,
    weight_decay=0.05,
    clip_grad_norm=3.0,
    reference_batch=2048,  # The paper's lr is for batch 2048; not rescaled (exact recipe).
  )
  c.mesh = config_lib.mesh_config()
  c.ckpt = config_lib.ckpt_config(every=5000, keep=3)
  c.nonfinite = config_lib.nonfinite_config()
  c.pictures = True  # Draw beit_jax.viz pictures at every checkpoint.
  c.log_every = 100
  c.eval_every = 0  # MIM loss / mlm_acc on the eval split every N steps (0: at the end).
  c.eval_batch_size = 1024
  # The eval's context-free baseline (unigram / most frequent token) is the token
  # distribution of the centre crops of this many training images.
  c.prior_images = 10_000
  c.tensorboard = True
  c.export_dir = ""
  return c
