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
from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from beit_jax import config_lib
from beit_jax.data import augment, mixup, pipeline, transforms
from beit_jax.models import vit
from beit_jax.tasks import downstream
from beit_jax.tasks.pretrain import compute_dtype
from beit_jax.training import checkpointing, loop
from beit_jax.training import mesh as mesh_lib
from beit_jax.training import optim
from beit_jax.training.train_state import TrainState, init_sharded_from_params

EXPORT_KIND = "beit_classifier"
IMAGE_KEY, LABEL_KEY, ERASE_KEY = "image", "label", "erase_boxes"
BATCH_KEYS = (IMAGE_KEY, LABEL_KEY, ERASE_KEY)
EVAL_KEYS = (IMAGE_KEY, LABEL_KEY, "valid")
WD_SKIP = ("pos_embed", "cls_token")  # unilm VisionTransformer.no_weight_decay().


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises naming the first bad value, before anything is compiled or written."""
  downstream.common_checks(config, ("finetune",))
  config_lib.check_positive(config, "model.drop_path_rate", "label_smoothing", "ema_decay",
                            "mixup.mixup_alpha", "mixup.cutmix_alpha", "mixup.prob",
                            "mixup.switch_prob", "input.reprob", allow_zero=True)
  config_lib.check_choice(config, "input.remode", ("pixel", "rand", "const"))
  if not 0.0 < config.optim.layer_decay <= 1.0:
    raise ValueError(f"config.optim.layer_decay={config.optim.layer_decay} must be in (0, 1] "
                     "(1 = no layer-wise decay; unilm: 0.65 Base, 0.75 Large).")
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f"config.ema_decay={config.ema_decay} must be in [0, 1) (0 = no EMA).")
  if config.input.auto_augment:
    augment.rand_augment_transform(config.input.auto_augment)  # Raises on a bad string.
  downstream.check_data_exists(config, "finetune")


def mixup_enabled(config: ml_collections.ConfigDict) -> bool:
  m = config.mixup
  return m.prob > 0 and (m.mixup_alpha > 0 or m.cutmix_alpha > 0)


def make_transforms(config: ml_collections.ConfigDict):
  i = config.input
  # RandAugment fills with the normalisation mean, as timm's create_transform does.
  mean = transforms.IMAGENET_MEAN if i.norm == "imagenet" else (0.5, 0.5, 0.5)
  train = augment.FinetuneTrainTransform(
      i.image_size, scale=tuple(i.crop_scale), ratio=tuple(i.crop_ratio),
      interpolation=i.interpolation, hflip=i.flip_prob, auto_augment=i.auto_augment or None,
      color_jitter=i.color_jitter, mean=mean, re_prob=i.reprob, re_mode=i.remode,
      re_count=i.recount, key=IMAGE_KEY, boxes_key=ERASE_KEY)
  evals = transforms.CenterCropTransform(i.image_size, key=IMAGE_KEY,
                                         interpolation=i.interpolation,
                                         crop_pct=i.eval_crop_pct)
  return train, evals


def make_train_step(model: vit.BEiT, tx: optax.GradientTransformation, lr_fn: optim.Schedule,
                    config: ml_collections.ConfigDict, num_classes: int):
  """`train_step(state, batch, mix) -> (state, metrics)`; `mix` = the step's mixup draw
  ({'lam', 'box'}, replicated) or None without mixup."""
  chex.clear_trace_counter()
  use_mixup, smoothing = mixup_enabled(config), config.label_smoothing
  ema_decay, norm, remode = config.ema_decay, config.input.norm, config.input.remode
  poison_steps = config_lib.injected_nonfinite_steps(config)

  @chex.assert_max_traces(n=1)
  def train_step(state: TrainState, batch: Mapping[str, jax.Array], mix: Any):
    erase_rng, dropout_rng = jax.random.split(state.step_rng())
    images = transforms.normalize(batch[IMAGE_KEY], norm)
    images = augment.apply_random_erasing(images, batch[ERASE_KEY], erase_rng, mode=remode)
    labels = batch[LABEL_KEY]
    if use_mixup:
      images, targets = mixup.mix_batch(images, labels, mix, num_classes, smoothing)

    def loss_fn(params):
      logits = model.apply({"params": params}, images, train=True,
                           rngs={"dropout": dropout_rng}, method=vit.BEiT.classify)
      if use_mixup:
        loss = mixup.soft_target_cross_entropy(logits, targets)
      else:
        loss = mixup.label_smoothing_cross_entropy(logits, labels, smoothing)
      return loss, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, guard = state.apply_gradients(grads, tx, loss, ema_decay=ema_decay,
                                             poison_steps=poison_steps)
    dominant = jnp.argmax(targets, axis=-1) if use_mixup else labels
    metrics = dict(loss=loss, lr=lr_fn(state.step),
                   train_top1=jnp.mean(jnp.argmax(logits, -1) == dominant), **guard)
    return new_state, metrics

  return train_step


def make_eval_step(model: vit.BEiT, norm: str):
  def eval_step(params: Any, batch: Mapping[str, jax.Array]):
    images = transforms.normalize(batch[IMAGE_KEY], norm)
    logits = model.apply({"params": params}, images, train=False, method=vit.BEiT.classify)
    return downstream.classification_sums(logits, batch[LABEL_KEY], batch["valid"])
  return eval_step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes (or resumes) in `workdir`; returns {'train': ..., 'eval': final eval}."""
  validate_config(config)
  pretrained_meta = downstream.check_pretrained(config.pretrained)

  # --- Mesh and data ---------------------------------------------------------------
  mesh, batch_sh, repl = mesh_lib.task_mesh(config)
  train_source, eval_source, num_classes = downstream.labelled_sources(config)
  transform, eval_transform = make_transforms(config)
  data_iter = pipeline.make_task_train_iterator(config, train_source, transform)

  # --- Model, pretrained weights, optimizer ---------------------------------------
  dtype = compute_dtype(config.model.dtype)
  model = downstream.backbone_model(config, num_classes, pretrained_meta, dtype)
  host_params, report = downstream.backbone_params(model, config.pretrained, config.seed)
  lr_fn = config_lib.lr_schedule(config)
  scales = optim.layerwise_lr_scales(host_params, config.optim.layer_decay, model.depth)
  tx = optim.make_optimizer(config.optim, lr_fn, wd_skip=WD_SKIP, lr_scales=scales)
  use_ema = config.ema_decay > 0

  state, state_sh = init_sharded_from_params(
      host_params, lambda p: TrainState.create(p, tx, jax.random.PRNGKey(config.seed + 1),
                                               use_ema=use_ema), mesh)
  logging.info("Fine-tuning BEiT (%s params, %d blocks, %dx%d patches) on %d classes from %s",
               f"{vit.param_count(model):,}", model.depth, *model.grid, num_classes,
               config.pretrained or "random init")

  # --- Resume ---------------------------------------------------------------------
  ckpt = checkpointing.make_checkpointer(workdir, config.ckpt)
  state = ckpt.restore_latest(state, state_sh, data_iter)
  first_step = int(jax.device_get(state.step))

  # --- Compiled steps -------------------------------------------------------------
  sampler = None
  if mixup_enabled(config):
    m = config.mixup
    sampler = mixup.MixupSampler(
        mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha,
        cutmix_minmax=tuple(m.cutmix_minmax) or None, prob=m.prob, switch_prob=m.switch_prob,
        correct_lam=True, image_size=config.input.image_size,
        legacy_bbox=True)  # timm 0.3.2's boxes, the version unilm pins.
  step_fn = jax.jit(make_train_step(model, tx, lr_fn, config, num_classes),
                    in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl),
                    donate_argnums=(0,))
  host_step = [first_step]

  def train_step(s, batch):
    mix = None
    if sampler is not None:  # Host numpy, from (seed, step): the same draws after a resume.
      mix = sampler.sample_step(config.seed, host_step[0])
    host_step[0] += 1
    return step_fn(s, batch, mix)

  eval_step = jax.jit(make_eval_step(model, config.input.norm),
                      in_shardings=(state_sh.params, batch_sh), out_shardings=repl)
  export_meta = dict(kind=EXPORT_KIND, model_kwargs=vit.architecture(model),
                     num_classes=num_classes, image_size=config.input.image_size,
                     patch_size=model.patch_size, input_norm=config.input.norm,
                     pretrained=config.pretrained)
  best = downstream.BestExport(
      os.path.join(config.export_dir or os.path.join(workdir, "export"), "best"))

  def eval_fn(s: TrainState) -> dict[str, float]:
    def one_pass(params, prefix):
      batches = pipeline.make_eval_iterator(eval_source, eval_transform,
                                            batch_size=config.eval_batch_size)
      return downstream.summarize_sums(
          loop.sum_over_batches(eval_step, batches, EVAL_KEYS, batch_sh, params), prefix)
    scalars = one_pass(s.params, "")
    if s.ema_params is not None:
      scalars.update(one_pass(s.ema_params, "ema_"))
    best.update(int(jax.device_get(s.step)), s.params, scalars, export_meta)
    scalars["best_top1"] = best.best
    return scalars

  # --- Train, then export ------------------------------------------------------------
  def export(s: TrainState, last: dict, final: dict) -> None:
    final_dir = os.path.join(config.export_dir or os.path.join(workdir, "export"), "final")
    step = int(jax.device_get(s.step))
    checkpointing.export_params(final_dir, s.params, metadata=dict(
        export_meta, step=step, final_train=last, eval=final,
        pretrained_report={k: list(map(str, v)) for k, v in report.items()}))
    if s.ema_params is not None:
      checkpointing.export_params(final_dir + "_ema", s.ema_params, metadata=dict(
          export_meta, step=step, eval=final))
    logging.info("Exported the fine-tuned classifier to %s", final_dir)

  _, last, final = loop.run_job(
      config=config, workdir=workdir, state=state, train_step=train_step, data_iter=data_iter,
      batch_keys=BATCH_KEYS, batch_sharding=batch_sh, checkpointer=ckpt,
      eval_fn=eval_fn if eval_source is not None else None, finish=export)
  return {"train": last, "eval": final}


def load_classifier(export_dir: str, sharding=None, dtype=jnp.float32):
  """(model, params, metadata) of a fine-tuned classifier export."""
  meta = checkpointing.read_metadata(export_dir)
  if meta.get("kind") != EXPORT_KIND:
    raise ValueError(f"{export_dir} holds a {meta.get('kind')!r} export, not a classifier.")
  model = vit.BEiT(**meta["model_kwargs"], dtype=dtype)
  return model, checkpointing.load_params_onto(export_dir, vit.abstract_params(model),
                                               sharding), meta
