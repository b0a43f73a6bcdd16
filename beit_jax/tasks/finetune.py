"""Task `finetune`: image classification fine-tuning of a BEiT backbone (unilm
`run_class_finetuning.py`).

* Backbone: a pretrained export (`config.pretrained`) loaded by unilm's rules, or random
  init for the from-scratch baseline (`tasks/downstream.py`); classifier `fc_norm(mean of
  patch tokens)` -> `head` (trunc-normal x `init_scale` 0.001), drop path.
* Input (host, Grain): timm's train transform — random-resized crop (bicubic), flip,
  RandAugment `rand-m9-mstd0.5-inc1`, random-erasing boxes (`data/augment.py`); eval:
  resize to size / crop_pct, centre crop.
* One jitted step: normalise -> random erasing (pixel noise in the host's boxes) ->
  mixup / cutmix (one draw per step made on the host from (seed, step), `data/mixup.py`)
  -> soft-target cross-entropy (label smoothing in the targets); without mixup,
  label-smoothing cross-entropy. AdamW with unilm's no-decay rule and layer-wise lr
  decay (`training/optim.py`), cosine with warmup, optional clipping, optional
  parameter EMA.
* Eval every `eval_every` steps and at the end: loss, top-1, top-5 (and the same for the
  EMA params); the best top-1 params are kept in `<workdir>/export/best`, the last in
  `<workdir>/export/final`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from beit_jax import config_lib, exports, pixels
from beit_jax.data import augment, mixup, pipeline, randaugment, transforms
from beit_jax.models import precision, vit
from beit_jax.tasks import downstream
from beit_jax.training import checkpointing, loop, losses, optim
from beit_jax.training import mesh as mesh_lib
from beit_jax.training.train_state import TrainState, init_sharded_from_params

IMAGE_KEY, LABEL_KEY, ERASE_KEY = "image", "label", "erase_boxes"
BATCH_KEYS = (IMAGE_KEY, LABEL_KEY, ERASE_KEY)
EVAL_KEYS = (IMAGE_KEY, LABEL_KEY, "valid")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises naming the first bad value, before anything is compiled or written."""
  downstream.common_checks(config, ("finetune",))
  config_lib.check_positive(
    config,
    "model.drop_path_rate",
    "label_smoothing",
    "ema_decay",
    "mixup.mixup_alpha",
    "mixup.cutmix_alpha",
    "mixup.prob",
    "mixup.switch_prob",
    "input.reprob",
    allow_zero=True,
  )
  config_lib.check_choice(config, "input.remode", ("pixel", "rand", "const"))
  if not 0.0 < config.optim.layer_decay <= 1.0:
    raise ValueError(
      f"config.optim.layer_decay={config.optim.layer_decay} must be in (0, 1] "
      "(1 = no layer-wise decay; unilm: 0.65 Base, 0.75 Large)."
    )
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f"config.ema_decay={config.ema_decay} must be in [0, 1) (0 = no EMA).")
  if config.input.auto_augment:
    randaugment.rand_augment_transform(config.input.auto_augment)  # Raises on a bad string.
  downstream.check_data_exists(config, "finetune")


def mixup_enabled(config: ml_collections.ConfigDict) -> bool:
  m = config.mixup
  return m.prob > 0 and (m.mixup_alpha > 0 or m.cutmix_alpha > 0)


def make_transforms(config: ml_collections.ConfigDict):
  """(train, eval) transforms: timm's fine-tuning train transform, resize + centre crop."""
  inputs = config.input
  # RandAugment fills with the normalisation mean, as timm's create_transform does.
  mean = pixels.IMAGENET_MEAN if inputs.norm == "imagenet" else (0.5, 0.5, 0.5)
  train = augment.FinetuneTrainTransform(
    inputs.image_size,
    scale=tuple(inputs.crop_scale),
    ratio=tuple(inputs.crop_ratio),
    interpolation=inputs.interpolation,
    hflip=inputs.flip_prob,
    auto_augment=inputs.auto_augment or None,
    color_jitter=inputs.color_jitter,
    mean=mean,
    re_prob=inputs.reprob,
    re_mode=inputs.remode,
    re_count=inputs.recount,
    key=IMAGE_KEY,
    boxes_key=ERASE_KEY,
  )
  evals = transforms.CenterCropTransform(
    inputs.image_size,
    key=IMAGE_KEY,
    interpolation=inputs.interpolation,
    crop_pct=inputs.eval_crop_pct,
  )
  return train, evals


def make_train_step(
  model: vit.BEiT,
  tx: optax.GradientTransformation,
  lr_fn: optim.Schedule,
  config: ml_collections.ConfigDict,
  num_classes: int,
):
  """`train_step(state, batch, mix) -> (state, metrics)`; `mix` = the step's mixup draw
  ({'lam', 'box'}, replicated) or None without mixup."""
  use_mixup, smoothing = mixup_enabled(config), config.label_smoothing
  ema_decay, norm, remode = config.ema_decay, config.input.norm, config.input.remode
  inject_at_steps = config_lib.injected_nonfinite_steps(config)

  def train_step(state: TrainState, batch: Mapping[str, jax.Array], mix: Any):
    erase_rng, dropout_rng = jax.random.split(state.step_rng())
    images = pixels.normalize(batch[IMAGE_KEY], norm)
    images = augment.apply_random_erasing(images, batch[ERASE_KEY], erase_rng, mode=remode)
    labels = batch[LABEL_KEY]
    if use_mixup:
      images, targets = mixup.mix_batch(images, labels, mix, num_classes, smoothing)

    def loss_fn(params):
      logits = model.apply(
        {"params": params},
        images,
        train=True,
        rngs={"dropout": dropout_rng},
        method=vit.BEiT.classify,
      )
      if use_mixup:
        loss = losses.soft_target_cross_entropy(logits, targets)
      else:
        loss = losses.label_smoothing_cross_entropy(logits, labels, smoothing)
      return loss, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, update_metrics = state.apply_gradients(
      grads, tx, loss, ema_decay=ema_decay, inject_at_steps=inject_at_steps
    )
    dominant = jnp.argmax(targets, axis=-1) if use_mixup else labels
    metrics = dict(
      loss=loss,
      lr=lr_fn(state.step),
      train_top1=jnp.mean(jnp.argmax(logits, -1) == dominant),
      **update_metrics,
    )
    return new_state, metrics

  return train_step


def make_eval_step(model: vit.BEiT, norm: str):
  def eval_step(params: Any, batch: Mapping[str, jax.Array]):
    images = pixels.normalize(batch[IMAGE_KEY], norm)
    logits = model.apply({"params": params}, images, train=False, method=vit.BEiT.classify)
    return losses.classification_sums(logits, batch[LABEL_KEY], batch["valid"])

  return eval_step


class StepParts(NamedTuple):
  """What the fine-tuning step is made of, from the config and the model alone (no
  weights, no data): the task compiles `train_step` over its mesh, `beit_jax.aot` for a
  TPU topology."""

  lr_fn: optim.Schedule
  tx: optax.GradientTransformation
  init_fn: Callable[[Any], TrainState]  # params -> the train state.
  train_step: Callable[..., Any]  # (state, batch, mix) -> (state, metrics)
  sampler: mixup.MixupSampler | None


def make_step_parts(
  config: ml_collections.ConfigDict, model: vit.BEiT, num_classes: int
) -> StepParts:
  """The schedule, optimizer (layer-wise lr decay over `model`'s blocks), state
  initialiser, train step and mixup sampler of `config`."""
  lr_fn = config_lib.lr_schedule(config)
  scales = optim.layerwise_lr_scales(
    downstream.abstract_params(model), config.optim.layer_decay, model.depth
  )
  tx = optim.make_optimizer(config.optim, lr_fn, wd_skip=model.no_weight_decay(), lr_scales=scales)
  use_ema = config.ema_decay > 0

  def init_fn(params: Any) -> TrainState:
    return TrainState.create(params, tx, jax.random.PRNGKey(config.seed + 1), use_ema=use_ema)

  train_step = make_train_step(model, tx, lr_fn, config, num_classes)
  return StepParts(lr_fn, tx, init_fn, train_step, make_mixup_sampler(config))


def batch_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
  """(shape, dtype) of each array of a global train batch, as the pipeline makes them."""
  batch, size = config.input.batch_size, config.input.image_size
  return {
    IMAGE_KEY: ((batch, size, size, 3), jnp.uint8),
    LABEL_KEY: ((batch,), jnp.int32),
    ERASE_KEY: ((batch, config.input.recount, 4), jnp.int32),
  }


def make_mixup_sampler(config: ml_collections.ConfigDict) -> mixup.MixupSampler | None:
  """The host-side mixup / cutmix draws (timm 0.3.2's boxes, the version unilm pins)."""
  if not mixup_enabled(config):
    return None
  m = config.mixup
  return mixup.MixupSampler(
    mixup_alpha=m.mixup_alpha,
    cutmix_alpha=m.cutmix_alpha,
    cutmix_minmax=tuple(m.cutmix_minmax) or None,
    prob=m.prob,
    switch_prob=m.switch_prob,
    correct_lam=True,
    image_size=config.input.image_size,
    legacy_bbox=True,
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> loop.RunResult:
  """Fine-tunes (or resumes) in `workdir`, evaluates, exports the best and last params."""
  check_config(config)
  pretrained_meta = downstream.check_pretrained(config.pretrained)

  # --- Mesh and data ---------------------------------------------------------------
  mesh, batch_sharding, replicated = mesh_lib.task_mesh(config)
  train_source, eval_source, num_classes = downstream.labelled_sources(config)
  transform, eval_transform = make_transforms(config)
  data_iter = pipeline.make_task_train_iterator(config, train_source, transform)

  # --- Model, pretrained weights, optimizer ---------------------------------------
  dtype = precision.compute_dtype(config.model.dtype)
  model = downstream.backbone_model(config, num_classes, pretrained_meta, dtype)
  host_params, report = downstream.backbone_params(model, config.pretrained, config.seed)
  parts = make_step_parts(config, model, num_classes)
  state, state_sharding = init_sharded_from_params(host_params, parts.init_fn, mesh)
  logging.info(
    "Fine-tuning BEiT (%s params, %d blocks, %dx%d patches) on %d classes from %s",
    f"{vit.param_count(model):,}",
    model.depth,
    *model.grid,
    num_classes,
    config.pretrained or "random init",
  )

  # --- Resume ---------------------------------------------------------------------
  ckpt = checkpointing.make_checkpointer(workdir, config.ckpt)
  state = ckpt.restore_latest(state, state_sharding, data_iter)

  # --- Compiled steps -------------------------------------------------------------
  sampler = parts.sampler
  train_step = loop.compile_train_step(parts.train_step, state_sharding, batch_sharding, replicated)

  def step_args(step: int) -> tuple[Any]:
    """The step's mixup draw: host numpy from (seed, step), the same after a resume."""
    return (None if sampler is None else sampler.sample_step(config.seed, step),)

  eval_step = jax.jit(
    make_eval_step(model, config.input.norm),
    in_shardings=(state_sharding.params, batch_sharding),
    out_shardings=replicated,
  )
  export_root = config.export_dir or os.path.join(workdir, "export")
  best = downstream.BestExport(os.path.join(export_root, "best"))

  def write(directory: str, params: Any, step: int, **metadata: Any) -> None:
    exports.write_classifier(
      directory,
      params,
      model,
      input_norm=config.input.norm,
      pretrained=config.pretrained,
      step=step,
      **metadata,
    )

  def eval_fn(state: TrainState) -> dict[str, float]:
    def one_pass(params, prefix):
      batches = pipeline.make_eval_iterator(
        eval_source, eval_transform, batch_size=config.eval_batch_size
      )
      return downstream.summarize_sums(
        loop.sum_over_batches(eval_step, batches, EVAL_KEYS, batch_sharding, params), prefix
      )

    scalars = one_pass(state.params, "")
    if state.ema_params is not None:
      scalars.update(one_pass(state.ema_params, "ema_"))
    step = int(jax.device_get(state.step))
    best.update(
      step, scalars, lambda: write(best.directory, state.params, step, eval_metrics=scalars)
    )
    scalars["best_top1"] = best.best
    scalars["chance_top1"] = 1.0 / num_classes
    return scalars

  def describe(result: loop.RunResult) -> list[str]:
    e = result.eval
    figures = (
      [
        f"Eval ({e['num_images']} images): top-1 {100 * e['top1']:.2f}%, top-5 "
        f"{100 * e['top5']:.2f}% (best top-1 during the run {100 * e['best_top1']:.2f}%)."
      ]
      if e
      else []
    )
    other = "random init" if config.pretrained else "a pretrained export"
    return downstream.describe_classifier(
      config,
      "fine-tuning",
      figures,
      num_classes,
      os.path.join(export_root, "final"),
      f"compare with {other} (--config.pretrained=...), or probe the backbone: python -m "
      "beit_jax.main --config=configs/linear_probe_small.py --config.pretrained=...",
    )

  # --- Train, then export ------------------------------------------------------------
  def export(result: loop.RunResult) -> None:
    final_dir = os.path.join(export_root, "final")
    state, step = result.state, int(jax.device_get(result.state.step))
    write(
      final_dir,
      state.params,
      step,
      eval_metrics=result.eval,
      final_train=result.train,
      pretrained_report={k: list(map(str, v)) for k, v in report.items()},
    )
    if state.ema_params is not None:
      write(final_dir + "_ema", state.ema_params, step, eval_metrics=result.eval)
    logging.info("Exported the fine-tuned classifier to %s", final_dir)

  return loop.run_job(
    config=config,
    workdir=workdir,
    state=state,
    train_step=train_step,
    data_iter=data_iter,
    batch_keys=BATCH_KEYS,
    batch_sharding=batch_sharding,
    checkpointer=ckpt,
    step_args=step_args,
    eval_fn=eval_fn if eval_source is not None else None,
    finish=export,
    console_keys=("loss", "train_top1", "lr", "top1", "top5", "best_top1", "chance_top1"),
    describe=describe,
  )
