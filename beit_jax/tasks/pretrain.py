"""Task `pretrain`: BEiT masked image modeling against a frozen visual tokenizer.

unilm `run_beit_pretraining.py` / `engine_for_pretraining.py`, as one jitted step:

  tokenizer view (uint8, e.g. 112 px) -> frozen dVAE -> argmax token ids (no gradient)
  ViT view (uint8, e.g. 224 px) -> normalise -> patch embeddings, masked ones replaced
      by the mask token -> blocks (shared rel-pos bias) -> norm -> lm_head, evaluated
      only at the masked positions (gathered to a static K = mask.num_patches, with
      weights for the padding) -> cross-entropy averaged over every masked token of the
      global batch.

Masks are made on the host inside the Grain pipeline (`beit_jax/data/masking.py`), from
the same per-element generator as the crop. Optimizer: AdamW with unilm's no-decay rule
(1-D params, biases, `pos_embed`, `cls_token`), per-step cosine with linear warmup from
0, global-norm clipping. Metrics: loss, mlm_acc, grad_norm, lr, masked patches per
image; on the eval split (centre crops, a fixed mask per image): loss and mlm_acc. At the
end the MIM model's params go to `<workdir>/export/beit` (`exports.write_mim`).

`config.target='pixels'` (the paper's pixel-regression ablation, Table 4) replaces the
tokens with each chosen patch's pixels, normalised per patch, and the cross-entropy with
an L2 loss; the tokenizer is then neither trained nor run (the pipeline still makes the
second view, so crops and masks are those of the token run with the same seed).

The tokenizer comes from an Orbax export by path (`config.tokenizer.path`: one trained
with the `dvae` task, or the official DALL-E dVAE converted to the same format). If the
path is empty and the config holds a `tokenizer.train` section (the quick start), that
tokenizer is trained first in `<workdir>/tokenizer` and then used.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from beit_jax import config_lib, exports
from beit_jax.data import masking, pipeline, sources, transforms
from beit_jax.models import attention, beit_v2, dvae, precision, vit
from beit_jax.models import tokenizer as tokenizer_lib
from beit_jax.tasks import dvae as dvae_task
from beit_jax.tasks import mim_eval, mim_step
from beit_jax.tasks.mim_eval import BATCH_KEYS, IMAGE_KEY, MASK_KEY, TOKENIZER_KEY
from beit_jax.tasks.mim_step import LOSS_ON, TARGETS
from beit_jax.training import checkpointing, loop, optim
from beit_jax.training import mesh as mesh_lib
from beit_jax.training.train_state import TrainState, init_sharded
from beit_jax.viz import pictures


def predicts_pixels(config: ml_collections.ConfigDict) -> bool:
  return config.get("target", "tokens") == "pixels"


def head_size(config: ml_collections.ConfigDict, tokenizer_vocab: int) -> int:
  """The MIM head's output width: the vocabulary, or a patch's p*p*3 pixels."""
  if predicts_pixels(config):
    return config.model.patch_size**2 * 3
  return config.model.vocab_size or tokenizer_vocab


# ----------------------------------------------------------------------------------
# Config checks and the resolved pieces (before anything is compiled or written).
# ----------------------------------------------------------------------------------
def mask_counts(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(num masked patches, min block) — unilm's 75 / 16 of 196 scaled to the grid if 0."""
  grid = config.input.image_size // config.model.patch_size
  default_num, default_min = masking.default_mask_counts(grid, grid)
  return (config.mask.num_patches or default_num, config.mask.min_patches or default_min)


def tokenizer_train_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """The `dvae` config to train first (quick start), reading the same data; else None."""
  train = config.tokenizer.get("train")
  if train is None or config.tokenizer.path or predicts_pixels(config):
    return None
  train = ml_collections.ConfigDict(train.to_dict())
  train.data = ml_collections.ConfigDict(config.data.to_dict())
  return train


def tokenizer_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Grid, vocabulary and view size of the tokenizer the config points to."""
  train = tokenizer_train_config(config)
  if train is not None:
    dvae_task.check_config(train)
    down = dvae.from_config(train.model).downsample
    return dict(
      grid=train.input.image_size // down,
      vocab_size=train.model.vocab_size,
      image_size=train.input.image_size,
    )
  try:
    return exports.tokenizer_info(config.tokenizer.path)
  except ValueError as e:
    raise ValueError(f"config.tokenizer.path: {e}") from e


def missing_inputs_message(config: ml_collections.ConfigDict) -> str | None:
  """What is missing (tokenizer, data set) and how to get it; None if all is there."""
  problems = []
  if predicts_pixels(config):
    pass  # Pixel regression needs no tokenizer.
  elif not config.tokenizer.path and tokenizer_train_config(config) is None:
    if config.model.get("patch_aggregation", False):
      how = (
        "a VQ-KD tokenizer: `python -m beit_jax.main --config=configs/vqkd_base.py` (or "
        "configs/vqkd_small.py), or unilm's released one converted by `python -m "
        "beit_jax.convert vqkd`"
      )
    else:
      how = (
        "e.g. `python -m beit_jax.main --config=configs/dvae_dalle.py`, or the official "
        "DALL-E dVAE converted by `python -m beit_jax.convert dalle`"
      )
    problems.append(
      "config.tokenizer.path is empty. Pass the export of a trained tokenizer "
      f"(--config.tokenizer.path=RUN/export/tokenizer): {how}."
    )
  elif config.tokenizer.path and not exports.is_export(config.tokenizer.path):
    problems.append(
      f"config.tokenizer.path={config.tokenizer.path!r} is not a tokenizer "
      "export (no metadata.json there)."
    )
  try:
    sources.make_source(config.data, config.data.train_split)
  except (FileNotFoundError, ValueError, KeyError) as e:
    problems.append(f"Training data: {e}")
  if not problems:
    return None
  return (
    "Cannot start pretraining:\n  - "
    + "\n  - ".join(problems)
    + "\nTo try BEiT without any download, run the quick start: python -m beit_jax.main "
    "--config=configs/pretrain_small.py (tokenizer + MIM on built-in photos)."
  )


def check_patch_aggregation(config: ml_collections.ConfigDict) -> None:
  """BEiT v2's head (`model.patch_aggregation`): an early layer inside the ViT, token targets."""
  m = config.model
  if not m.get("patch_aggregation", False):
    return
  config_lib.check_positive(config, "model.early_layers", allow_zero=True)
  config_lib.check_positive(config, "model.head_layers")
  depth = vit.VARIANTS[m.variant][1]
  early = m.early_layers or beit_v2.default_early_layers(depth)
  if not 0 < early < depth:
    raise ValueError(
      f"config.model.early_layers={early} must be in 1..{depth - 1}: ViT-{m.variant} has "
      f"{depth} blocks (unilm: 9 of 12, 21 of 24; 0 = that default)."
    )
  if predicts_pixels(config):
    raise ValueError(
      "config.model.patch_aggregation=True predicts tokens (BEiT v2); set config.target="
      "'tokens' or turn patch aggregation off."
    )


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad value, before anything is compiled or written."""
  config_lib.check_choice(config, "task", ("pretrain",))
  config_lib.check_data(config)
  config_lib.check_choice(config, "model.variant", tuple(vit.VARIANTS))
  config_lib.check_choice(config, "model.dtype", precision.DTYPE_NAMES)
  config_lib.check_choice(config, "model.attention", attention.CHOICES)
  config_lib.check_choice(config, "mask.kind", masking.MASK_KINDS)
  config_lib.check_choice(config, "loss_on", LOSS_ON)
  config_lib.check_choice(config, "target", TARGETS)
  config_lib.check_choice(config, "input.norm", ("half", "imagenet"))
  config_lib.check_choice(config, "input.interpolation", tuple(transforms.INTERPOLATIONS))
  config_lib.check_choice(config, "input.second_interpolation", tuple(transforms.INTERPOLATIONS))
  config_lib.check_positive(
    config,
    "total_steps",
    "input.batch_size",
    "input.image_size",
    "input.second_size",
    "model.patch_size",
    "log_every",
    "ckpt.every",
    "ckpt.keep",
    "optim.lr",
  )
  config_lib.check_positive(config, "eval_batch_size", "prior_images")
  config_lib.check_positive(
    config,
    "mask.num_patches",
    "mask.min_patches",
    "eval_every",
    "model.drop_path_rate",
    "model.init_values",
    "optim.warmup_steps",
    "model.vocab_size",
    allow_zero=True,
  )
  size, patch = config.input.image_size, config.model.patch_size
  if size % patch:
    raise ValueError(
      f"config.input.image_size={size} is not divisible by "
      f"config.model.patch_size={patch}; use a multiple of {patch}."
    )
  grid = size // patch
  num, min_block = mask_counts(config)
  if num > grid * grid:
    raise ValueError(
      f"config.mask.num_patches={num} exceeds the {grid}x{grid}={grid * grid} "
      "patches of the image; lower it (unilm: 75 of 196)."
    )
  if config.mask.kind == "blockwise" and min_block > num:
    raise ValueError(
      f"config.mask.min_patches={min_block} is above "
      f"config.mask.num_patches={num}; a block cannot be larger than the mask."
    )
  check_patch_aggregation(config)
  message = missing_inputs_message(config)
  if message:
    raise FileNotFoundError(message)
  if predicts_pixels(config):
    if config.model.vocab_size:
      raise ValueError(
        f"config.model.vocab_size={config.model.vocab_size} with config.target='pixels': "
        f"the head regresses a patch's {patch}*{patch}*3 pixels; set it to 0."
      )
    return
  tokenizer = tokenizer_spec(config)
  if tokenizer["grid"] != grid:
    raise ValueError(
      f"The tokenizer makes a {tokenizer['grid']}x{tokenizer['grid']} token grid but the ViT "
      f"has {grid}x{grid} patches (image_size {size} / patch {patch}); they must match (e.g. "
      f"input.second_size = tokenizer image size, image_size = patch * {tokenizer['grid']})."
    )
  if config.input.second_size != tokenizer["image_size"]:
    raise ValueError(
      f"config.input.second_size={config.input.second_size} but the tokenizer "
      f"was trained on {tokenizer['image_size']} px views; set them equal."
    )
  if config.model.vocab_size and config.model.vocab_size != tokenizer["vocab_size"]:
    raise ValueError(
      f"config.model.vocab_size={config.model.vocab_size} but the tokenizer has "
      f"{tokenizer['vocab_size']} tokens; set it to {tokenizer['vocab_size']} "
      "(or 0 to take the tokenizer's)."
    )


# ----------------------------------------------------------------------------------
# The job.
# ----------------------------------------------------------------------------------
def prepare_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The tokenizer export path; trains the quick-start tokenizer first if asked to."""
  train = tokenizer_train_config(config)
  if train is None:
    return config.tokenizer.path
  tok_workdir = os.path.join(workdir, "tokenizer")
  export = train.export_dir or os.path.join(tok_workdir, "export", "tokenizer")
  if exports.is_export(export):
    logging.info("Using the tokenizer already trained in %s.", export)
    return export
  logging.info("Stage 1/2: training the tokenizer in %s (config.tokenizer.train).", tok_workdir)
  dvae_task.train_and_evaluate(train, tok_workdir)
  logging.info("Stage 2/2: masked image modeling.")
  return export


def make_transforms(config: ml_collections.ConfigDict):
  """(train, eval) transforms and K: two views + mask; eval uses centre crops and a mask
  drawn from a generator seeded by the image index (the same masks at every eval)."""
  size, patch = config.input.image_size, config.model.patch_size
  num, min_block = mask_counts(config)
  views = transforms.TwoViewTransform(
    size,
    config.input.second_size,
    scale=tuple(config.input.crop_scale),
    ratio=tuple(config.input.crop_ratio),
    interpolation=config.input.interpolation,
    second_interpolation=config.input.second_interpolation,
    color_jitter=config.input.color_jitter,
    flip_prob=config.input.flip_prob,
    key=IMAGE_KEY,
    second_key=TOKENIZER_KEY,
  )
  generator = masking.make_mask_generator(config.mask.kind, size // patch, num, min_block)
  eval_views = transforms.ParallelViews(
    transforms.CenterCropTransform(size, key=IMAGE_KEY, interpolation=config.input.interpolation),
    transforms.CenterCropTransform(
      config.input.second_size, key=TOKENIZER_KEY, interpolation=config.input.second_interpolation
    ),
  )
  return (
    masking.MaskedViewsTransform(views, generator, mask_key=MASK_KEY),
    masking.MaskedViewsTransform(eval_views, generator, mask_key=MASK_KEY),
    num,
  )


class StepParts(NamedTuple):
  """What the pretrain step is made of, built from the config alone (no weights, no data):
  the task compiles `train_step` over its mesh, `beit_jax.aot` for a TPU topology."""

  model: vit.BEiT
  lr_fn: optim.Schedule
  tx: optax.GradientTransformation
  init_fn: Callable[[], TrainState]
  train_step: Callable[..., Any]  # (state, batch, tokenizer_params) -> (state, metrics)


def make_step_parts(
  config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer | None, vocab_size: int
) -> StepParts:
  """The MIM model, schedule, optimizer, state initialiser and train step of `config`
  (`vocab_size`: the tokenizer's; the head is `head_size` wide)."""
  dtype = precision.compute_dtype(config.model.dtype)
  model = mim_step.make_model(
    config.model, config.input.image_size, head_size(config, vocab_size), dtype
  )
  lr_fn = config_lib.lr_schedule(config)
  tx = optim.make_optimizer(config.optim, lr_fn, wd_skip=model.no_weight_decay())

  def init_fn() -> TrainState:
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    return TrainState.create(mim_step.init_params(model, init_rng), tx, state_rng)

  train_step = mim_step.make_train_step(
    model,
    tokenizer,
    tx,
    lr_fn,
    mask_counts(config)[0],
    config.input.norm,
    config_lib.injected_nonfinite_steps(config),
    config.loss_on,
    config.get("target", "tokens"),
  )
  return StepParts(model, lr_fn, tx, init_fn, train_step)


def batch_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
  """(shape, dtype) of each array of a global train batch, as the pipeline makes them."""
  batch, size, second = config.input.batch_size, config.input.image_size, config.input.second_size
  grid = size // config.model.patch_size
  return {
    IMAGE_KEY: ((batch, size, size, 3), jnp.uint8),
    TOKENIZER_KEY: ((batch, second, second, 3), jnp.uint8),
    MASK_KEY: ((batch, grid * grid), jnp.bool_),
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> loop.RunResult:
  """Pretrains (or resumes) in `workdir`, evaluates, exports the MIM model."""
  check_config(config)

  # --- Mesh ---------------------------------------------------------------------
  mesh, batch_sharding, replicated = mesh_lib.task_mesh(config)

  # --- Tokenizer (trained first in the quick start; none for pixel targets) ---------
  pixel_target = predicts_pixels(config)
  if pixel_target:
    tokenizer, tokenizer_params, tokenizer_path, vocab = None, {}, "", 0
    tokenizer_size = config.input.second_size
  else:
    tokenizer_path = prepare_tokenizer(config, workdir)
    tokenizer, tokenizer_params, tokenizer_meta = exports.load_tokenizer(
      tokenizer_path, sharding=replicated
    )
    vocab = tokenizer.vocab_size  # check_config made sure config.model.vocab_size agrees.
    tokenizer_size = tokenizer_meta["image_size"]

  # --- Input --------------------------------------------------------------------
  train_source = sources.make_source(config.data, config.data.train_split)
  eval_source = sources.make_source(config.data, config.data.eval_split)
  transform, eval_transform, max_masked = make_transforms(config)
  data_iter = pipeline.make_task_train_iterator(config, train_source, transform)
  logging.info(
    "Train source: %s (%d images); eval: %s; target: %s",
    config.data.source,
    len(train_source),
    "none" if eval_source is None else f"{len(eval_source)} images",
    "normalised pixels (L2)" if pixel_target else f"tokenizer {tokenizer_path} ({vocab} tokens)",
  )

  # --- Model, optimizer, step ------------------------------------------------------
  parts = make_step_parts(config, tokenizer, vocab)
  model, dtype = parts.model, parts.model.dtype
  plain = mim_step.eval_model(model)  # What the eval, pictures and export apply.

  state, state_sharding = init_sharded(parts.init_fn, mesh)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info(
    "%s-%s MIM: %s params, %d patches, %d masked (%s), compute %s",
    "BEiT v2" if isinstance(model, beit_v2.BEiTv2) else "BEiT",
    config.model.variant,
    f"{num_params:,}",
    model.num_patches,
    max_masked,
    config.mask.kind,
    jnp.dtype(dtype).name,
  )

  # --- Resume ---------------------------------------------------------------------
  ckpt = checkpointing.make_checkpointer(workdir, config.ckpt)
  state = ckpt.restore_latest(state, state_sharding, data_iter)

  # --- Compiled steps -------------------------------------------------------------
  tokenizer_sharding = jax.tree.map(lambda _: replicated, tokenizer_params)
  train_step = loop.compile_train_step(
    parts.train_step, state_sharding, batch_sharding, tokenizer_sharding
  )
  eval_fn = mim_eval.make_eval_fn(
    config,
    plain,
    tokenizer,
    tokenizer_params,
    max_masked,
    (state_sharding.eval_params, batch_sharding, tokenizer_sharding, replicated),
    (train_source, eval_source, eval_transform),
  )

  # --- Train, then export ------------------------------------------------------------
  export_dir = config.export_dir or os.path.join(workdir, "export", "beit")

  def describe(result: loop.RunResult) -> list[str]:
    return mim_eval.describe_run(config, export_dir, tokenizer_path, len(train_source), result)

  def export(result: loop.RunResult) -> None:
    # BEiT v2: the backbone only (the patch-aggregation blocks stay in the checkpoints).
    _, params = mim_step.backbone(model, result.state.eval_params)
    exports.write_mim(
      export_dir,
      params,
      plain,
      input_norm=config.input.norm,
      tokenizer=tokenizer_path,
      tokenizer_image_size=tokenizer_size,
      step=int(jax.device_get(result.state.step)),
      model_config=config.model.to_dict(),
      final_train=result.train,
      eval_metrics=result.eval,
      target=config.get("target", "tokens"),
    )
    logging.info("Exported BEiT MIM params to %s", export_dir)

  painter = None
  if (
    config.get("pictures", True) and not pixel_target
  ):  # What it learned, at every checkpoint (beit_jax/viz).
    sample = pictures.sample_images(train_source, 4)
    painter = pictures.checkpoint_painter(
      workdir,
      lambda state: pictures.mim_pictures(
        plain,
        state.eval_params,
        tokenizer,
        tokenizer_params,
        sample,
        input_norm=config.input.norm,
        tokenizer_image_size=tokenizer_size,
        seed=config.seed,
      ),
      config.tensorboard,
    )

  return loop.run_job(
    config=config,
    workdir=workdir,
    state=state,
    train_step=train_step,
    data_iter=data_iter,
    batch_keys=BATCH_KEYS,
    batch_sharding=batch_sharding,
    checkpointer=ckpt,
    step_args=lambda _: (tokenizer_params,),
    eval_fn=eval_fn if eval_source is not None else None,
    finish=export,
    on_checkpoint=painter,
    console_keys=(
      "loss",
      "mlm_acc",
      "cls_pt_loss",
      "cls_pt_acc",
      "lr",
      "unigram_loss",
      "frequent_acc",
      "patch_mean_loss",
    ),
    describe=describe,
  )
