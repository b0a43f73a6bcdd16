r"""BEiT v2's VQ-KD tokenizer at ImageNet scale: unilm `beit2/TOKENIZER.md`'s run.

`vqkd_encoder_base_decoder_3x768x12_clip`: a ViT-B/16 encoder on the 224 px view -> 14x14
codes of 8192 (32-d, l2-normalised, EMA 0.99, k-means init), a 3-block 768-wide decoder
regressing the frozen CLIP ViT-B/16's patch features (cosine). The teacher is converted
once from timm's state dict (`vit_base_patch16_clip_quickgelu_224.openai`, saved with
`torch.save(model.state_dict())`):

  python -m beit_jax.convert teacher clip_b16.pth runs/teacher_clip --kind=clip
  python -m beit_jax.main --config=configs/vqkd_base.py --workdir=gs://BUCKET/vqkd_base \
    --config.teacher.path=runs/teacher_clip \
    --config.data.source=tfds --config.data.name=imagenet2012 --config.data.data_dir=DIR

The recipe is TOKENIZER.md's command line with run_vqkd_training.py's defaults: 8 GPUs x 64 =
batch 512; 100 epochs of 1,281,167 // 64 // 8 = 2,502 steps (250,200 steps), 10 warmup
epochs; AdamW betas (0.9, 0.99), weight decay 1e-4 (none on biases, norms, cls / position
embeddings); lr 5e-5 per 128 images = 2e-4 at 512 (unilm scales lr, not min_lr, by
batch / 128), cosine to 1e-5; random-resized crop (0.08-1) bicubic + flip. The DINO teacher
(`--kind=dino`, 768-d features) needs nothing else: the decoder's output width is taken
from the teacher (`model.teacher_dim=0`). unilm trains in float16 autocast; bfloat16 here.

Arguments after ':' (e.g. configs/vqkd_base.py:epochs=10):
  epochs  training epochs of ImageNet-1k at batch 512 (default 100, TOKENIZER.md's)
"""

import ml_collections

from beit_jax import config_lib

STEPS_PER_EPOCH = 1_281_167 // 64 // 8  # unilm: len(dataset) // batch_size // num_tasks.


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, epochs=100)
  c = ml_collections.ConfigDict()
  c.task = "vqkd"
  c.seed = 0
  c.total_steps = arg.epochs * STEPS_PER_EPOCH
  c.data = config_lib.data_config(source="tfds", name="imagenet2012", num_workers=16)
  c.input = dict(
    batch_size=512,
    image_size=224,
    crop_scale=(0.08, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    interpolation="bicubic",
    flip_prob=0.5,
  )
  c.model = dict(
    variant="base",  # encoder 768 x 12 (12 heads), decoder 768 x 3 (12 heads)
    patch_size=16,
    code_dim=32,
    num_codes=8192,
    teacher_dim=0,  # the decoder's output width; 0 = the teacher's (CLIP 512, DINO 768)
    beta=1.0,  # the commitment weight (NormEMAVectorQuantizer(beta=1.0))
    dtype="bfloat16",
  )
  c.codebook = dict(decay=0.99, kmeans_init=True, kmeans_iters=10)
  # The frozen ViT whose patch features are distilled: a teacher export (`python -m
  # beit_jax.convert teacher`) or a BEiT export of this project (input_norm: its
  # normalisation when the export does not record one).
  c.teacher = dict(path="", input_norm="")
  c.optim = config_lib.adamw_config(
    lr=2e-4,
    min_lr=1e-5,
    warmup_steps=10 * STEPS_PER_EPOCH,
    b1=0.9,
    b2=0.99,
    weight_decay=1e-4,
    reference_batch=512,  # unilm's 5e-5 x 512 / 128, already scaled; not rescaled.
  )
  c.mesh = config_lib.mesh_config()
  c.ckpt = config_lib.ckpt_config(every=5000, keep=3)
  c.nonfinite = config_lib.nonfinite_config()
  c.pictures = True  # Token maps and codebook use at every checkpoint (beit_jax/viz).
  c.log_every = 100
  c.eval_every = 10 * STEPS_PER_EPOCH
  c.eval_batch_size = 512
  c.tensorboard = True
  c.export_dir = ""
  return c
