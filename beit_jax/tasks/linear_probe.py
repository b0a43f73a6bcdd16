"""Task `linear_probe`: BEiT's linear-probing protocol on every block (unilm
`run_linear_eval.py`), plus a k-NN evaluation of the same features.

The backbone is frozen (its params are a replicated argument of the step, never updated
and never donated). For every block l the feature is `[h_cls, mean(h_patches)]` of that
block's raw output (no final norm), 2D wide; one linear classifier per block (init
N(0, 0.01), bias 0) is trained on all of them at once from ONE backbone forward per
batch: the loss is the sum of the per-block cross-entropies, and each classifier only
receives the gradient of its own term. AdamW (wd on the weights and biases, as
`AdamW(linear_classifier.parameters())`), cosine to 0 with optional warmup;
random-resized crop + flip; eval resize 256 -> centre crop 224.

Reported per block on the eval split: top-1 / top-5 (`top1_block_<l>`, 1-based as in the
paper: BEiT-B is best at block 9, BEiT-L at 14), the best block and its accuracy. With
`knn.k > 0`, a weighted k-NN (cosine similarity on L2-normalised features, weights
exp(sim / T), DINO's protocol) on the best block's features of up to
`knn.max_train_images` centre-cropped training images. The probes go to
`<workdir>/export/final` (`exports.write_linear_probe`: params + metadata with every
figure; `exports.load_linear_probe` reads it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from beit_jax import config_lib, exports, pixels
from beit_jax.data import pipeline, transforms
from beit_jax.models import precision, vit
from beit_jax.tasks import downstream
from beit_jax.training import checkpointing, loop, losses, optim
from beit_jax.training import mesh as mesh_lib
from beit_jax.training.train_state import TrainState, init_sharded, place

IMAGE_KEY, LABEL_KEY = "image", "label"
BATCH_KEYS = (IMAGE_KEY, LABEL_KEY)
EVAL_KEYS = (IMAGE_KEY, LABEL_KEY, "valid")
PROBE_INIT_STD = 0.01


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises naming the first bad value, before anything is compiled or written."""
  downstream.common_checks(config, ("linear_probe",))
  config_lib.check_positive(config, "knn.k", "knn.max_train_images", allow_zero=True)
  config_lib.check_positive(config, "knn.temperature")
  downstream.check_data_exists(config, "linear_probe")


def block_features(model: vit.BEiT, backbone_params: Any, images: jax.Array) -> jax.Array:
  """(depth, B, 2D) float32: `[h_cls, mean(h_patches)]` of every block's output."""
  _, layers = model.apply(
    {"params": backbone_params}, images, train=False, return_layers=True, method=vit.BEiT.encode
  )
  feats = [jnp.concatenate([h[:, 0], jnp.mean(h[:, 1:], axis=1)], axis=-1) for h in layers]
  return jax.lax.stop_gradient(jnp.stack(feats).astype(jnp.float32))


def init_probes(rng: jax.Array, depth: int, dim: int, num_classes: int) -> dict[str, jax.Array]:
  """One Linear(dim, classes) per block, stacked: kernel (depth, dim, C), bias (depth, C)."""
  return dict(
    kernel=PROBE_INIT_STD * jax.random.normal(rng, (depth, dim, num_classes)),
    bias=jnp.zeros((depth, num_classes)),
  )


def probe_logits(probes: Mapping[str, jax.Array], feats: jax.Array) -> jax.Array:
  """(depth, B, C) logits of every block's classifier on its own features."""
  return jnp.einsum("lbd,ldc->lbc", feats, probes["kernel"]) + probes["bias"][:, None]


def probe_loss(probes: Mapping[str, jax.Array], feats: jax.Array, labels: jax.Array):
  """Sum over blocks of each block's mean cross-entropy (each probe gets only its own
  term's gradient); aux: (per-block losses (depth,), logits (depth, B, C))."""
  logits = probe_logits(probes, feats)
  ce = optax.softmax_cross_entropy_with_integer_labels(
    logits, jnp.broadcast_to(labels, logits.shape[:2])
  )
  per_block = jnp.mean(ce, axis=1)
  return jnp.sum(per_block), (per_block, logits)


def make_train_step(
  model: vit.BEiT,
  tx: optax.GradientTransformation,
  lr_fn: optim.Schedule,
  norm: str,
  inject_at_steps: tuple[int, ...] = (),
):
  """`train_step(state, batch, backbone_params) -> (state, metrics)`."""

  def train_step(state: TrainState, batch: Mapping[str, jax.Array], backbone_params: Any):
    feats = block_features(model, backbone_params, pixels.normalize(batch[IMAGE_KEY], norm))
    labels = batch[LABEL_KEY]

    (objective, (per_block, logits)), grads = jax.value_and_grad(probe_loss, has_aux=True)(
      state.params, feats, labels
    )
    new_state, update_metrics = state.apply_gradients(
      grads, tx, objective, inject_at_steps=inject_at_steps
    )
    acc = jnp.mean(jnp.argmax(logits, -1) == labels[None], axis=1)
    metrics = dict(
      loss=jnp.mean(per_block),
      loss_last_block=per_block[-1],
      train_top1_best_block=jnp.max(acc),
      lr=lr_fn(state.step),
      **update_metrics,
    )
    return new_state, metrics

  return train_step


def make_eval_step(model: vit.BEiT, norm: str):
  """Per-block sums (arrays of length depth) over a padded eval batch."""

  def eval_step(probes: Any, batch: Mapping[str, jax.Array], backbone_params: Any):
    feats = block_features(model, backbone_params, pixels.normalize(batch[IMAGE_KEY], norm))
    logits = probe_logits(probes, feats)
    return jax.vmap(losses.classification_sums, in_axes=(0, None, None))(
      logits, batch[LABEL_KEY], batch["valid"]
    )

  return eval_step


def summarize_blocks(sums: Mapping[str, np.ndarray] | None) -> dict[str, Any]:
  """Per-block top-1 / top-5 and the best block (1-based)."""
  if sums is None:
    return {}
  count = max(float(sums["count"][0]), 1.0)
  top1, top5 = sums["top1"] / count, sums["top5"] / count
  out: dict[str, Any] = {f"top1_block_{block + 1}": float(v) for block, v in enumerate(top1)}
  out.update({f"top5_block_{block + 1}": float(v) for block, v in enumerate(top5)})
  best = int(np.argmax(top1))
  out.update(
    best_layer=best + 1,
    best_top1=float(top1[best]),
    best_top5=float(top5[best]),
    loss_best_block=float(sums["loss_sum"][best]) / count,
    num_images=int(count),
  )
  return out


# ----------------------------------------------------------------------------------
# k-NN on the frozen features (DINO's weighted vote).
# ----------------------------------------------------------------------------------
def knn_predict(
  train_feats: jax.Array,
  train_labels: jax.Array,
  query: jax.Array,
  k: int,
  temperature: float,
  num_classes: int,
) -> jax.Array:
  """Class scores (Q, C): the k most cosine-similar training features vote with weight
  exp(sim / T)."""
  a = train_feats / jnp.linalg.norm(train_feats, axis=-1, keepdims=True).clip(1e-12)
  q = query / jnp.linalg.norm(query, axis=-1, keepdims=True).clip(1e-12)
  sims, idx = jax.lax.top_k(q @ a.T, k)
  votes = jax.nn.one_hot(train_labels[idx], num_classes) * jnp.exp(sims / temperature)[..., None]
  return jnp.sum(votes, axis=1)


def extract_features(
  features_fn, backbone_params, source, transform, batch_size, sharding, max_images=0
):
  """(features (N, F), labels (N,)) host numpy over a source's centre crops, with
  `features_fn(params, images)` (jitted, one compile for every batch: eval batches are
  padded to a static size)."""
  feats, labels = [], []
  for host_batch in pipeline.make_eval_iterator(source, transform, batch_size=batch_size):
    batch = mesh_lib.global_batch({k: host_batch[k] for k in EVAL_KEYS}, sharding)
    f = np.asarray(jax.device_get(features_fn(backbone_params, batch[IMAGE_KEY])))
    valid = host_batch["valid"]
    feats.append(f[valid])
    labels.append(host_batch[LABEL_KEY][valid])
    if max_images and sum(len(x) for x in labels) >= max_images:
      break
  feats, labels = np.concatenate(feats), np.concatenate(labels)
  if max_images:
    feats, labels = feats[:max_images], labels[:max_images]
  return feats, labels


KNN_CHUNK = 512  # Queries per k-NN call (the last chunk is padded: one compile).


def knn_eval(
  config,
  model,
  backbone_params,
  train_source,
  eval_source,
  eval_transform,
  block: int,
  num_classes: int,
  sharding,
) -> dict[str, float]:
  """Weighted k-NN top-1 of block `block`'s features (train: up to max_train_images)."""
  features_fn = jax.jit(
    lambda p, x: block_features(model, p, pixels.normalize(x, config.input.norm))[block]
  )
  kw = dict(batch_size=config.eval_batch_size, sharding=sharding)
  train_f, train_y = extract_features(
    features_fn,
    backbone_params,
    train_source,
    eval_transform,
    max_images=config.knn.max_train_images,
    **kw,
  )
  eval_f, eval_y = extract_features(features_fn, backbone_params, eval_source, eval_transform, **kw)
  k = min(config.knn.k, len(train_y))
  predict = jax.jit(
    lambda a, y, q: jnp.argmax(
      knn_predict(a, y, q, k, config.knn.temperature, num_classes), axis=-1
    )
  )
  train_f, train_y = jnp.asarray(train_f), jnp.asarray(train_y)
  correct = 0
  for start in range(0, len(eval_y), KNN_CHUNK):
    chunk = eval_f[start : start + KNN_CHUNK]
    padded = np.zeros((KNN_CHUNK, chunk.shape[1]), chunk.dtype)
    padded[: len(chunk)] = chunk
    pred = np.asarray(predict(train_f, train_y, jnp.asarray(padded)))[: len(chunk)]
    correct += int(np.sum(pred == eval_y[start : start + KNN_CHUNK]))
  return dict(
    knn_top1=correct / max(len(eval_y), 1),
    knn_k=k,
    knn_train_images=len(train_y),
    knn_block=block + 1,
  )


# ----------------------------------------------------------------------------------
# The job.
# ----------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> loop.RunResult:
  """Trains (or resumes) the per-block probes in `workdir`, evaluates, exports them."""
  check_config(config)
  pretrained_meta = downstream.check_pretrained(config.pretrained)

  mesh, batch_sharding, replicated = mesh_lib.task_mesh(config)
  train_source, eval_source, num_classes = downstream.labelled_sources(config)
  inputs = config.input
  transform = transforms.SingleViewTransform(
    inputs.image_size,
    key=IMAGE_KEY,
    scale=tuple(inputs.crop_scale),
    ratio=tuple(inputs.crop_ratio),
    interpolation=inputs.interpolation,
    flip_prob=inputs.flip_prob,
  )
  eval_transform = transforms.CenterCropTransform(
    inputs.image_size,
    key=IMAGE_KEY,
    interpolation=inputs.interpolation,
    crop_pct=inputs.eval_crop_pct,
  )
  data_iter = pipeline.make_task_train_iterator(config, train_source, transform)

  # --- Frozen backbone and the probes ----------------------------------------------
  dtype = precision.compute_dtype(config.model.dtype)
  model = downstream.backbone_model(config, num_classes, pretrained_meta, dtype)
  host_backbone, _ = downstream.backbone_params(model, config.pretrained, config.seed)
  backbone_sharding = jax.tree.map(lambda _: replicated, host_backbone)
  backbone = place(host_backbone, backbone_sharding)
  lr_fn = config_lib.lr_schedule(config)
  tx = optim.make_optimizer(config.optim, lr_fn)
  dim = 2 * model.embed_dim

  def init_fn():
    rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed + 1))
    return TrainState.create(init_probes(rng, model.depth, dim, num_classes), tx, state_rng)

  state, state_sharding = init_sharded(init_fn, mesh)
  logging.info(
    "Linear probes on %d blocks (%d-d features, %d classes) of a frozen backbone from %s",
    model.depth,
    dim,
    num_classes,
    config.pretrained or "random init",
  )
  ckpt = checkpointing.make_checkpointer(workdir, config.ckpt)
  state = ckpt.restore_latest(state, state_sharding, data_iter)

  train_step = loop.compile_train_step(
    make_train_step(model, tx, lr_fn, inputs.norm, config_lib.injected_nonfinite_steps(config)),
    state_sharding,
    batch_sharding,
    backbone_sharding,
  )
  eval_step = jax.jit(
    make_eval_step(model, inputs.norm),
    in_shardings=(state_sharding.eval_params, batch_sharding, backbone_sharding),
    out_shardings=replicated,
  )

  def eval_fn(state: TrainState) -> dict[str, Any]:
    batches = pipeline.make_eval_iterator(
      eval_source, eval_transform, batch_size=config.eval_batch_size
    )
    scalars = summarize_blocks(
      loop.sum_over_batches(
        eval_step, batches, EVAL_KEYS, batch_sharding, state.eval_params, backbone
      )
    )
    if scalars and config.knn.k > 0 and int(jax.device_get(state.step)) >= config.total_steps:
      scalars.update(
        knn_eval(
          config,
          model,
          backbone,
          train_source,
          eval_source,
          eval_transform,
          scalars["best_layer"] - 1,
          num_classes,
          batch_sharding,
        )
      )
    if scalars:
      scalars["chance_top1"] = 1.0 / num_classes
    return scalars

  export_dir = config.export_dir or os.path.join(workdir, "export", "final")

  def describe(result: loop.RunResult) -> list[str]:
    e = result.eval
    figures = []
    if e:
      figures.append(
        f"Eval ({e['num_images']} images): best block {e['best_layer']} of {model.depth}, "
        f"top-1 {100 * e['best_top1']:.2f}%"
        + (f"; k-NN top-1 {100 * e['knn_top1']:.2f}%" if "knn_top1" in e else "")
        + "."
      )
    other = "random init" if config.pretrained else "a pretrained export"
    return downstream.describe_classifier(
      config,
      "linear probes on every block",
      figures,
      num_classes,
      export_dir,
      f"compare with {other} (--config.pretrained=...), or fine-tune: python -m "
      "beit_jax.main --config=configs/finetune_small.py --config.pretrained=...",
    )

  def export(result: loop.RunResult) -> None:
    final = result.eval
    exports.write_linear_probe(
      export_dir,
      result.state.eval_params,
      model,
      backbone=config.pretrained,
      num_classes=num_classes,
      input_norm=inputs.norm,
      step=int(jax.device_get(result.state.step)),
      final_train=result.train,
      eval_metrics=final,
    )
    if final:
      logging.info(
        "Linear probe: best block %d, top-1 %.4f (per block: %s)",
        final["best_layer"],
        final["best_top1"],
        ", ".join(f"{final[f'top1_block_{block + 1}']:.3f}" for block in range(model.depth)),
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
    step_args=lambda _: (backbone,),
    eval_fn=eval_fn if eval_source is not None else None,
    finish=export,
    console_keys=(
      "loss",
      "train_top1_best_block",
      "best_layer",
      "best_top1",
      "knn_top1",
      "chance_top1",
    ),
    describe=describe,
  )
