"""Task `segment`: semantic segmentation with a BEiT backbone + UperNet, as unilm
`beit/semantic_segmentation` trains it on ADE20K (mmseg 0.11).

* Model (`models/segmentation.py`): the BEiT backbone (per-block rel-pos, LayerScale,
  drop path) started from a pretrained export (`config.pretrained`, unilm's loading rules
  in `models/transfer.py`: shared -> per-block tables, tables resized to the crop's grid)
  or random init; fpn1-4 neck, UperNet decode head, FCN auxiliary head, BatchNorm with
  statistics over the global batch (what SyncBN does across GPUs: under `jax.jit` the batch
  axes of a sharded batch are reduced globally, so 8 devices give what 1 does).
* Input (host, Grain, one generator per element): mmseg's ADE20K train pipeline
  (`data/segmentation.py`: resize ratio 0.5-2 of (2048, 512), crop with cat_max_ratio 0.75,
  flip, PhotoMetricDistortion, pad 0 / 255); the device normalises and zeroes the padding
  (mmseg pads after Normalize).
* One jitted step: per-pixel cross-entropy, ignore 255, decode head + 0.4 x auxiliary head
  (`tasks/segmentation_eval.py`), BatchNorm statistics updated (kept only for a finite
  step, like the params); AdamW, weight decay 0.05 on every >1-D non-bias leaf (unilm's
  segmentation rule: cls_token and the rel-pos tables decay too), layer-wise lr decay with
  unilm's segmentation layer ids (embeddings 0, block i -> i + 1, neck and heads depth + 1),
  mmcv's poly schedule with linear warmup (`training/optim.py: warmup_poly`).
* Eval every `eval_every` steps and at the end, one image at a time: the image resized
  keep-ratio to `input.img_scale` (x each of `eval.ratios`), sliding-window inference
  (`input.crop_size` windows, `eval.stride`; the windows go through one jitted step of
  static shape, `eval_batch_size` windows a call), logits averaged where windows
  overlap, resized to the original size, softmax (averaged over ratios and the flip);
  mIoU / mAcc / aAcc as mmseg's, the sums on the device. The best-mIoU variables are kept
  in `<workdir>/export/best`, the last in `<workdir>/export/segmenter` (`exports.
  write_segmenter`); pictures (image, ground truth, prediction) at each checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from beit_jax import config_lib, exports, pixels
from beit_jax.data import pipeline, segmentation_sources
from beit_jax.data import segmentation as seg_data
from beit_jax.models import attention, precision, segmentation, vit
from beit_jax.tasks import downstream
from beit_jax.tasks import segmentation_eval as seg_eval
from beit_jax.training import checkpointing, loop, optim
from beit_jax.training import mesh as mesh_lib
from beit_jax.training.train_state import TrainState, init_sharded_from_params
from beit_jax.viz import pictures

IMAGE_KEY, LABEL_KEY, VALID_KEY = "image", "label", "valid_hw"
BATCH_KEYS = (IMAGE_KEY, LABEL_KEY, VALID_KEY)


# ----------------------------------------------------------------------------------
# Config checks and data.
# ----------------------------------------------------------------------------------
def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises naming the first bad value, before anything is compiled or written."""
  config_lib.check_choice(config, "task", ("segment",))
  config_lib.check_storage(config)  # Every gs:// value can be opened here, before any read.
  config_lib.check_choice(config, "data.source", segmentation_sources.SEGMENTATION_SOURCES)
  config_lib.check_positive(config, "data.num_workers", allow_zero=True)
  config_lib.check_choice(config, "model.variant", tuple(vit.VARIANTS))
  config_lib.check_choice(config, "model.dtype", precision.DTYPE_NAMES)
  config_lib.check_choice(config, "model.attention", attention.CHOICES)
  config_lib.check_choice(config, "input.norm", ("half", "imagenet"))
  config_lib.check_choice(config, "optim.schedule", ("poly", "cosine"))
  config_lib.check_positive(
    config,
    "total_steps",
    "input.batch_size",
    "input.crop_size",
    "model.patch_size",
    "log_every",
    "ckpt.every",
    "ckpt.keep",
    "optim.lr",
    "eval_batch_size",
    "eval.stride",
  )
  config_lib.check_positive(
    config,
    "eval_every",
    "optim.warmup_steps",
    "eval.max_images",
    "model.drop_path_rate",
    "model.dropout_rate",
    "loss.aux_weight",
    allow_zero=True,
  )
  if not 0.0 < config.optim.layer_decay <= 1.0:
    raise ValueError(
      f"config.optim.layer_decay={config.optim.layer_decay} must be in (0, 1] (unilm: 0.65 "
      "from a self-supervised checkpoint, 0.9 / 0.95 from an IN-22k fine-tuned one)."
    )
  lo, hi = config.input.ratio_range
  if not 0 < lo <= hi:
    raise ValueError(
      f"config.input.ratio_range={tuple(config.input.ratio_range)} needs 0 < lo <= hi."
    )
  if not 0.0 < config.input.cat_max_ratio <= 1.0:
    raise ValueError(f"config.input.cat_max_ratio={config.input.cat_max_ratio} must be in (0, 1].")
  if config.eval.stride > config.input.crop_size:
    raise ValueError(
      f"config.eval.stride={config.eval.stride} exceeds the window (config.input.crop_size="
      f"{config.input.crop_size}): pixels between windows would get no prediction."
    )
  if not config.eval.ratios or min(config.eval.ratios) <= 0:
    raise ValueError(f"config.eval.ratios={tuple(config.eval.ratios)} must be positive numbers.")
  meta = downstream.check_pretrained(config.pretrained)
  patch = meta["model_kwargs"]["patch_size"] if meta else config.model.patch_size
  if config.input.crop_size % (2 * patch):
    raise ValueError(
      f"config.input.crop_size={config.input.crop_size} must be a multiple of {2 * patch} "
      f"(twice the patch size {patch}: the neck's coarsest map halves the patch grid)."
    )
  make_sources(config)  # A missing data set or a bad class count stops the run here.


def make_sources(config: ml_collections.ConfigDict) -> tuple[Any, Any, int]:
  """(train source, eval source or None, number of classes)."""
  try:
    train = segmentation_sources.make_segmentation_source(config.data, config.data.train_split)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise FileNotFoundError(
      f"Cannot start segmentation: training data: {e}\nTry it without any download on "
      "mosaics of the built-in photos: python -m beit_jax.main "
      "--config=configs/segment_small.py --config.data.source=builtin"
    ) from e
  evals = segmentation_sources.make_segmentation_source(config.data, config.data.eval_split)
  num_classes = int(train.num_classes)
  if evals is not None and int(evals.num_classes) != num_classes:
    raise ValueError(
      f"The eval split has {evals.num_classes} classes but the train split {num_classes}; "
      "set config.data.num_classes."
    )
  return train, evals, num_classes


def make_transforms(config: ml_collections.ConfigDict, source: Any, num_classes: int):
  """(train, eval) transforms: mmseg's ADE20K train pipeline and its (multi-scale) test."""
  i = config.input
  common = dict(reduce_zero_label=bool(source.reduce_zero_label), num_classes=num_classes)
  train = seg_data.SegmentationTrainTransform(
    crop_size=(i.crop_size, i.crop_size),
    img_scale=tuple(i.img_scale),
    ratio_range=tuple(i.ratio_range),
    cat_max_ratio=i.cat_max_ratio,
    flip_prob=i.flip_prob,
    photometric=i.photometric,
    **common,
  )
  evals = seg_data.MultiScaleEvalTransform(
    img_scale=tuple(i.img_scale), ratios=tuple(config.eval.ratios), **common
  )
  return train, evals


# ----------------------------------------------------------------------------------
# Model and variables.
# ----------------------------------------------------------------------------------
def make_model(
  config: ml_collections.ConfigDict,
  num_classes: int,
  pretrained_meta: Mapping[str, Any] | None,
  dtype: Any = jnp.float32,
) -> segmentation.Segmenter:
  """unilm's UperNet at `input.crop_size`: `config.model` for random init; a pretrained
  export fixes the backbone's architecture (`downstream.pretrained_architecture`)."""
  m = config.model
  overrides: dict[str, Any] = dict(
    patch_size=m.patch_size,
    drop_path_rate=m.drop_path_rate,
    init_values=m.init_values,
    use_abs_pos_emb=m.use_abs_pos_emb,
    use_rel_pos_bias=m.use_rel_pos_bias,
    aux_channels=m.aux_channels,
    dropout_rate=m.dropout_rate,
    remat=m.remat,
    attention=m.attention,
    dtype=dtype,
  )
  overrides.update(downstream.pretrained_architecture(m, pretrained_meta))
  if m.out_indices:
    overrides["out_indices"] = tuple(m.out_indices)
  if m.channels:
    overrides["channels"] = m.channels
  if pretrained_meta is None:
    return segmentation.segmenter(m.variant, num_classes, config.input.crop_size, **overrides)
  return segmentation.segmenter("base", num_classes, config.input.crop_size, **overrides)


def init_variables(model: segmentation.Segmenter, seed: int) -> dict[str, Any]:
  """Random-init {'params', 'batch_stats'} of `model` (numpy, on the host)."""
  size = model.image_size
  init = jax.jit(
    lambda: dict(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3)), train=False))
  )
  return jax.tree.map(np.asarray, init())


def initial_variables(
  model: segmentation.Segmenter, pretrained: str, seed: int
) -> tuple[dict[str, Any], dict]:
  """Random init with the pretrained export (if any) loaded into the backbone."""
  variables = init_variables(model, seed)
  backbone = segmentation.backbone_model(model)
  params, report = downstream.transfer_pretrained(
    backbone, variables["params"]["backbone"], pretrained
  )
  variables["params"] = {**variables["params"], "backbone": params}
  return variables, report


# ----------------------------------------------------------------------------------
# The train step.
# ----------------------------------------------------------------------------------
def normalize_and_unpad(images: jax.Array, valid_hw: jax.Array, norm: str) -> jax.Array:
  """Normalised float32 crops with the padding beyond `valid_hw` (B, 2) set to 0 (mmseg
  pads after Normalize)."""
  x = pixels.normalize(images, norm)
  h, w = images.shape[1:3]
  rows = jnp.arange(h)[None, :, None] < valid_hw[:, 0, None, None]
  cols = jnp.arange(w)[None, None, :] < valid_hw[:, 1, None, None]
  return jnp.where((rows & cols)[..., None], x, 0.0)


def make_train_step(
  model: segmentation.Segmenter,
  tx: optax.GradientTransformation,
  lr_fn: optim.Schedule,
  config: ml_collections.ConfigDict,
):
  """`train_step(state, batch) -> (state, metrics)`: loss, its parts, lr, the decode
  head's pixel accuracy (mmseg's `acc_seg`), grad norm."""
  norm, aux_weight = config.input.norm, config.loss.aux_weight
  avg_non_ignore = config.loss.avg_non_ignore
  inject_at_steps = config_lib.injected_nonfinite_steps(config)

  def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
    images = normalize_and_unpad(batch[IMAGE_KEY], batch[VALID_KEY], norm)
    labels = batch[LABEL_KEY].astype(jnp.int32)

    def loss_fn(params):
      (logits, aux), updated = model.apply(
        {"params": params, "batch_stats": state.batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": state.step_rng()},
      )
      loss, parts = seg_eval.segmentation_loss(
        logits, aux if aux_weight > 0 else None, labels, aux_weight, avg_non_ignore
      )
      return loss, (parts, updated["batch_stats"], logits)

    (loss, (parts, stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, update_metrics = state.apply_gradients(
      grads, tx, loss, inject_at_steps=inject_at_steps, batch_stats=stats
    )
    pred = seg_eval.predict_labels(segmentation.resize_bilinear(logits, labels.shape[1:3]))
    labelled = labels != seg_eval.IGNORE_INDEX
    acc = jnp.sum((pred == labels) & labelled) / jnp.maximum(jnp.sum(labelled), 1)
    metrics = dict(loss=loss, lr=lr_fn(state.step), pixel_acc=acc, **parts, **update_metrics)
    return new_state, metrics

  return train_step


class StepParts(NamedTuple):
  """The schedule, optimizer, state initialiser and train step of a config and model."""

  lr_fn: optim.Schedule
  tx: optax.GradientTransformation
  init_fn: Callable[[Any], TrainState]  # {'params', 'batch_stats'} -> the train state.
  train_step: Callable[..., Any]


def make_step_parts(config: ml_collections.ConfigDict, model: segmentation.Segmenter) -> StepParts:
  lr_fn = config_lib.lr_schedule(config)
  abstract = segmentation.abstract_variables(model)["params"]
  scales = optim.layerwise_lr_scales(
    abstract, config.optim.layer_decay, model.depth, backbone="backbone"
  )
  tx = optim.make_optimizer(config.optim, lr_fn, lr_scales=scales)

  def init_fn(variables: Any) -> TrainState:
    return TrainState.create(
      variables["params"],
      tx,
      jax.random.PRNGKey(config.seed + 1),
      batch_stats=variables["batch_stats"],
    )

  return StepParts(lr_fn, tx, init_fn, make_train_step(model, tx, lr_fn, config))


def variables_of(state: TrainState) -> dict[str, Any]:
  return {"params": state.params, "batch_stats": state.batch_stats}


# ----------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> loop.RunResult:
  """Trains (or resumes) the segmenter in `workdir`, evaluates, exports the best and last."""
  check_config(config)
  pretrained_meta = downstream.check_pretrained(config.pretrained)

  # --- Mesh and data ---------------------------------------------------------------
  mesh, batch_sharding, _ = mesh_lib.task_mesh(config)
  train_source, eval_source, num_classes = make_sources(config)
  if eval_source is not None and jax.process_count() > 1:
    raise ValueError(
      "Segmentation evaluation runs in one process only (images of different sizes, one at "
      "a time); set --config.data.eval_split= for a multi-process run and evaluate its "
      "export in one process."
    )
  transform, eval_transform = make_transforms(config, train_source, num_classes)
  data_iter = pipeline.make_train_iterator(
    train_source,
    transform,
    global_batch_size=config.input.batch_size,
    seed=config.seed,
    num_workers=config.data.num_workers,
    max_failed_fraction=config.data.max_failed_fraction,
    decode_records=False,
  )

  # --- Model, pretrained weights, optimizer ---------------------------------------
  dtype = precision.compute_dtype(config.model.dtype)
  model = make_model(config, num_classes, pretrained_meta, dtype)
  host_variables, report = initial_variables(model, config.pretrained, config.seed)
  parts = make_step_parts(config, model)
  state, state_sharding = init_sharded_from_params(
    host_variables, parts.init_fn, mesh, params_of=variables_of
  )
  logging.info(
    "Segmentation: BEiT + UperNet (%s params, %d blocks, features of blocks %s) on %d "
    "classes, %d px crops, from %s",
    f"{segmentation.param_count(model):,}",
    model.depth,
    list(model.out_indices),
    num_classes,
    model.image_size,
    config.pretrained or "random init",
  )

  # --- Resume ---------------------------------------------------------------------
  ckpt = checkpointing.make_checkpointer(workdir, config.ckpt)
  state = ckpt.restore_latest(state, state_sharding, data_iter)

  # --- Compiled steps -------------------------------------------------------------
  train_step = loop.compile_train_step(parts.train_step, state_sharding, batch_sharding)
  predictor = seg_eval.Predictor(model, config, variables_of(state_sharding), batch_sharding)
  export_root = config.export_dir or os.path.join(workdir, "export")
  best = downstream.BestExport(os.path.join(export_root, "best"), metric="mIoU")

  def write(directory: str, state: TrainState, **metadata: Any) -> None:
    exports.write_segmenter(
      directory,
      jax.device_get(variables_of(state)),
      model,
      input_norm=config.input.norm,
      pretrained=config.pretrained,
      step=int(jax.device_get(state.step)),
      **metadata,
    )

  def eval_fn(state: TrainState) -> dict[str, Any]:
    scalars = seg_eval.evaluate(predictor, variables_of(state), eval_source, eval_transform, config)
    step = int(jax.device_get(state.step))
    best.update(step, scalars, lambda: write(best.directory, state, eval_metrics=scalars))
    scalars["best_mIoU"] = best.best
    return scalars

  samples = (
    seg_eval.eval_samples(eval_source, eval_transform, config.num_pictures)
    if config.pictures and eval_source is not None
    else []
  )
  paint = (
    pictures.checkpoint_painter(
      workdir,
      lambda state: seg_eval.draw_predictions(predictor, variables_of(state), samples),
      config.tensorboard,
    )
    if samples
    else None
  )

  def describe(result: loop.RunResult) -> list[str]:
    e, (_, _, lr) = result.eval, config_lib.effective_lr(config)
    lines = [
      f"Trained: BEiT-{config.model.variant} + UperNet segmentation from "
      f"{config.pretrained or 'random init (the from-scratch baseline)'}, "
      f"{config.total_steps} steps of batch {config.input.batch_size} on "
      f"{config.data.source}, {lr}."
    ]
    if e.get("num_images"):
      lines.append(
        f"Eval ({e['num_images']} images, sliding windows {config.input.crop_size} / stride "
        f"{config.eval.stride}): mIoU {100 * e['mIoU']:.2f}%, mAcc {100 * e['mAcc']:.2f}%, "
        f"aAcc {100 * e['aAcc']:.2f}% (best mIoU {100 * e['best_mIoU']:.2f}%)."
      )
      lines.append(
        f"Baseline: the most frequent class everywhere gives mIoU "
        f"{100 * e['majority_mIoU']:.2f}% ({num_classes} classes)."
      )
    other = "random init (--config.pretrained=)" if config.pretrained else "a pretrained export"
    lines += [
      f"Export: {os.path.join(export_root, 'segmenter')} (best: {best.directory})",
      f"Next: compare with {other}; exports.load_segmenter(DIR) reloads the model.",
    ]
    return lines

  # --- Train, then export ------------------------------------------------------------
  def export(result: loop.RunResult) -> None:
    final_dir = os.path.join(export_root, "segmenter")
    write(
      final_dir,
      result.state,
      eval_metrics=result.eval,
      final_train=result.train,
      pretrained_report={k: list(map(str, v)) for k, v in report.items()},
    )
    logging.info("Exported the segmenter to %s", final_dir)

  return loop.run_job(
    config=config,
    workdir=workdir,
    state=state,
    train_step=train_step,
    data_iter=data_iter,
    batch_keys=BATCH_KEYS,
    batch_sharding=batch_sharding,
    checkpointer=ckpt,
    eval_fn=eval_fn if eval_source is not None else None,
    finish=export,
    on_checkpoint=paint,
    console_keys=("loss", "pixel_acc", "lr", "mIoU", "mAcc", "best_mIoU", "majority_mIoU"),
    describe=describe,
  )
